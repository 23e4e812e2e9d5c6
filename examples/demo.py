"""Demo: a character-level GPT on the complete works of Shakespeare, AdamW vs SOAP vs KL-Shampoo.

Every optimizer trains the same small transformer (:class:`models.CharGPT`) from the same
initial weights on the same sequence of random 64-character windows (fixed seeds), under
PyTorch Lightning on the CPU, with the same learning-rate schedule shape (linear warm-up,
then cosine decay to 10%). Every ``eval_every`` steps the loss on a fixed set of windows
from the held-out last 5% of the text is logged. The preconditioned runs also carry an
:class:`~lightning_precond.callbacks.EigenStalenessMonitor`, which logs how far each
Kronecker factor has drifted from the eigenbasis the optimizer is using.

Outputs (under ``--out``, default ``runs/demo``):

* ``<optimizer>/metrics.csv`` -- Lightning ``CSVLogger`` logs (train/eval loss, lr, staleness);
* ``demo.png`` -- (a) eval loss vs step, (b) eval loss vs training wall-clock, (c) mean
  eigenbasis staleness vs step;
* ``summary.csv`` -- the table printed at the end (optimizer, final eval loss, seconds, steps);
  README.md's demo table is this file of the run recorded with ``--record``
  (``examples/results/``, written by :func:`record`);
* ``curves.csv`` -- every eval point: optimizer, step, seconds of training steps, eval loss.

Learning rates and betas were chosen by a short sweep of this exact run (300 steps, one
seed, on this 2-core machine), keeping each optimizer's lowest final eval loss. The sweep
predates the defaults chosen by measurement in issue 16 (SOAP betas (0.9, 0.95), the shifted
refresh, KL-Shampoo's debiased statistics with ``shampoo_beta=0.9``), which the demo now runs;
``benchmarks/quality.py``'s char-GPT sweep (200 steps, 3 seeds) puts SOAP's and KL-Shampoo's
optimum at 1e-2 with these defaults too, so the rates stand:

* AdamW, betas (0.9, 0.999): lr 1e-3 -> 2.30, 3e-3 -> 2.13, 1e-2 -> 2.36;
  betas (0.9, 0.95): 3e-3 -> 2.10, **6e-3 -> 2.06**, 1e-2 -> 2.23.
* SOAP, its defaults (betas (0.95, 0.95)): 1e-3 -> 2.47, 3e-3 -> 1.91, **1e-2 -> 1.79**,
  2e-2 -> 1.81.
* KL-Shampoo, shampoo_beta 0.98 (its default): 1e-3 -> 2.51, 3e-3 -> 2.40, 1e-2 -> 2.34,
  3e-2 -> 2.25; shampoo_beta 0.95: **1e-2 -> 1.96**, 3e-2 -> 1.97.
* Muon, its defaults (update RMS matched to AdamW's, every matrix orthogonalized, vectors on
  AdamW at the same lr): 1e-3 -> 2.65, 3e-3 -> 2.04, **1e-2 -> 1.81**, 3e-2 -> 1.83.

So AdamW runs with lr 6e-3 and betas (0.9, 0.95) (the usual GPT setting), SOAP, Muon and
KL-Shampoo with 1e-2. In that sweep KL-Shampoo needed ``shampoo_beta=0.95``: with the
reference's 0.98 its eigenvalue estimates, which started at 0.1, took much of a 300-step run to
reach the gradients' scale; its defaults now start them from the first gradient and debias
the averages (``shampoo_beta=0.9``), so the demo runs them. Weight decay is 0 for all. Replacing the periodic basis refresh
(every 10 steps) by ``--adaptive-refresh 0.1`` or ``0.2`` (AdaptiveEigenbasisRefresh)
changed the final losses by less than 0.01 and the wall-clock time not at all (refreshes
take well under 1% of the run here; the per-step statistics dominate), so the demo keeps
each optimizer's own schedule. Every other optimizer of the registry
(``lightning_precond.registry``: ``shampoo``, ``klsoap``, ``ecshampoo``, and any registered
later) can be run with ``--optimizers`` but was not tuned: those listed in ``LEARNING_RATES``
run at the rate given there, any other at its constructor's default; ``--lr NAME=VALUE``
overrides any learning rate. The staleness monitor (and ``--adaptive-refresh``) applies to the
optimizers with eigenbases.

The eval set is the first 8 x 64 windows of 64 characters (32,768 characters) of the
held-out text, identical for every optimizer and every eval. The wall-clock column times
``trainer.fit`` (training plus the periodic evals, the same eval work for every optimizer).

Run ``python examples/demo.py`` (about 3.5 minutes on 2 vCPUs shared with other work) or
``python examples/demo.py --quick`` (a tiny model for a few steps, used by the tests).
Exits with status 1 and the reason if the Shakespeare text cannot be obtained.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

_EXAMPLES_DIR = str(Path(__file__).resolve().parent)
if _EXAMPLES_DIR not in sys.path:  # sibling modules (data, models, lightning_gpt)
    sys.path.insert(0, _EXAMPLES_DIR)

import torch
from data import DataError
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from lightning_gpt import OPTIMIZERS, REGISTRY_NAMES, CharCorpus, CharGPTModule, ShakespeareDataModule

from lightning_precond.callbacks import AdaptiveEigenbasisRefresh, EigenStalenessMonitor
from lightning_precond.registry import ALGORITHMS

#: What ``make demo`` trains: the four compared (and tuned) in the module docstring.
DEFAULT_OPTIMIZERS = ("adamw", "soap", "klshampoo", "muon")
#: Every choice of ``--optimizers``: AdamW and every registered algorithm (by short name).
CHOICES = tuple(OPTIMIZERS)
#: Peak learning rates (see the module docstring for how the tuned ones were chosen); an
#: optimizer not listed runs at its constructor's default (:func:`learning_rate`).
LEARNING_RATES = {
    "adamw": 6e-3,
    "soap": 1e-2,
    "klshampoo": 1e-2,
    "muon": 1e-2,
    "shampoo": 3e-3,
    "klsoap": 3e-3,
    "ecshampoo": 1e-3,
}
#: Constructor arguments besides lr and weight decay (the rest are each optimizer's defaults).
OPTIMIZER_KWARGS: dict[str, dict[str, object]] = {
    "adamw": {"betas": (0.9, 0.95)},
}
LABELS = {
    "adamw": "AdamW",
    "soap": "SOAP",
    "klshampoo": "KL-Shampoo",
    "shampoo": "Shampoo",
    "klsoap": "KL-SOAP",
    "ecshampoo": "EC-Shampoo",
    "muon": "Muon",
}
COLORS = {
    "adamw": "tab:gray",
    "soap": "tab:blue",
    "klshampoo": "tab:red",
    "shampoo": "tab:green",
    "klsoap": "tab:purple",
    "ecshampoo": "tab:orange",
    "muon": "tab:cyan",
}
# Colours for optimizers without one above, in order of first use.
_SPARE_COLORS = ("tab:brown", "tab:pink", "tab:olive", "black")
STALENESS_KEY = "precond/staleness_mean"


def label(name: str) -> str:
    """The table's and the plot's name of optimizer ``name`` (the registry's, if not in LABELS)."""
    return LABELS.get(name) or REGISTRY_NAMES[name]


def color(name: str) -> str:
    if name in COLORS:
        return COLORS[name]
    spare = [n for n in CHOICES if n not in COLORS]
    return _SPARE_COLORS[spare.index(name) % len(_SPARE_COLORS)]


def has_basis(name: str) -> bool:
    """Whether ``name`` keeps eigenbases (the staleness monitor and adaptive refresh apply)."""
    return name in REGISTRY_NAMES and ALGORITHMS[REGISTRY_NAMES[name]].has_basis


def learning_rate(name: str) -> float:
    """The demo's peak learning rate for ``name``: LEARNING_RATES, else the constructor's default."""
    if name in LEARNING_RATES:
        return LEARNING_RATES[name]
    default = inspect.signature(OPTIMIZERS[name]).parameters["lr"].default
    if not isinstance(default, float):
        raise ValueError(f"{name}: no learning rate in LEARNING_RATES and no default; pass --lr {name}=VALUE")
    return default


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one demo run except the optimizer."""

    steps: int = 300
    block_size: int = 64
    batch_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    eval_every: int = 25
    eval_batches: int = 8
    eval_batch_size: int = 64
    staleness_every: int = 2
    train_log_every: int = 5
    warmup_steps: int = 30
    weight_decay: float = 0.0
    seed: int = 1234
    # AdaptiveEigenbasisRefresh: None = the optimizers' own periodic refresh.
    adaptive_tolerance: float | None = None
    adaptive_check_every: int = 5


FULL = RunConfig()
QUICK = RunConfig(
    steps=6, block_size=32, batch_size=8, n_layer=1, n_head=2, n_embd=32,
    eval_every=3, eval_batches=2, eval_batch_size=16, staleness_every=1, train_log_every=1,
    warmup_steps=2,
)


@dataclass
class RunResult:
    optimizer: str
    lr: float
    final_eval_loss: float
    seconds: float
    steps: int
    log_dir: Path
    # (global step, seconds of training steps so far) at every eval: the wall-clock axis.
    clock: tuple[tuple[int, float], ...] = ()


class TrainingClock(Callback):
    """Seconds spent in training batches (forward, backward, optimizer step; evals excluded),
    read at every validation: the x axis of the loss-vs-wall-clock panel."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.points: list[tuple[int, float]] = []
        self._started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._started

    def on_validation_end(self, trainer, pl_module) -> None:
        self.points.append((trainer.global_step, self.seconds))


# --------------------------------------------------------------------------- arguments
def _lr_override(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in CHOICES:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME in {', '.join(CHOICES)}, got {text!r}")
    try:
        lr = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"learning rate {value!r} is not a number") from None
    if not lr > 0.0:
        raise argparse.ArgumentTypeError(f"learning rate must be > 0, got {lr}")
    return name, lr


def _optimizer_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CHOICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CHOICES)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"optimizer listed twice in {text!r}")
    return names


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a character-level GPT on Shakespeare with AdamW, SOAP, KL-Shampoo and Muon.",
    )
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help=f"optimizer steps per run (default {FULL.steps}, or {QUICK.steps} with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny model and a few steps (for tests)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    parser.add_argument("--optimizers", type=_optimizer_list, default=DEFAULT_OPTIMIZERS,
                        help=f"comma-separated, from {', '.join(CHOICES)} (default {','.join(DEFAULT_OPTIMIZERS)})")
    parser.add_argument("--lr", type=_lr_override, action="append", default=[], metavar="NAME=VALUE",
                        help="override an optimizer's peak learning rate (repeatable)")
    parser.add_argument("--adaptive-refresh", type=float, default=None, metavar="TOL",
                        help="refresh eigenbases only when their staleness exceeds TOL "
                             "(AdaptiveEigenbasisRefresh) instead of every 10 steps")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch intra-op threads (default 1; see the comment in main)")
    parser.add_argument("--seed", type=int, default=FULL.seed, help="seed of the weights and the batch order")
    parser.add_argument("--record", action="store_true",
                        help=f"also copy summary.csv, curves.csv and demo.png to {RECORDED} and rewrite "
                             "README.md's demo table from that summary (the full run only)")
    args = parser.parse_args(argv)
    if args.record and (args.quick or args.steps is not None):
        parser.error("--record records the full run: it takes neither --quick nor --steps")
    return args


# --------------------------------------------------------------------------- training
def _quiet_lightning() -> None:
    """Keep the console to progress bars and the final table."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Benign here: the demo runs on purpose on CPU, single process, without workers (so the
    # training set's __len__, which only feeds the progress bar, is exact).
    for pattern in (
        r".*does not have many workers.*",
        r".*`IterableDataset` has `__len__` defined.*",
        r".*GPU available but not used.*",
        r".*Consider setting `persistent_workers=True`.*",
        # lightning 2.6 calling a torch 2.13 pytree API it has not caught up with yet
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _clear_old_logs(log_dir: Path) -> None:
    """Remove the files a previous demo run left in ``log_dir`` (only those the demo writes)."""
    for name in ("metrics.csv", "hparams.yaml"):
        (log_dir / name).unlink(missing_ok=True)


def train_one(name: str, lr: float, cfg: RunConfig, corpus: CharCorpus, out: Path) -> RunResult:
    """Train with optimizer ``name`` and return the final eval loss and the wall-clock time."""
    log_dir = out / name
    _clear_old_logs(log_dir)
    seed_everything(cfg.seed, verbose=False)
    datamodule = ShakespeareDataModule(
        corpus, block_size=cfg.block_size, batch_size=cfg.batch_size, train_batches=cfg.steps,
        eval_batches=cfg.eval_batches, eval_batch_size=cfg.eval_batch_size, seed=cfg.seed,
    )
    module = CharGPTModule(
        corpus.vocab_size, optimizer=name, lr=lr, weight_decay=cfg.weight_decay,
        optimizer_kwargs=OPTIMIZER_KWARGS.get(name),
        block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
        warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, init_seed=cfg.seed,
    )
    clock = TrainingClock()
    callbacks: list[Callback] = [clock]
    if has_basis(name):
        callbacks.append(EigenStalenessMonitor(log_every_n_steps=cfg.staleness_every, per_layer=False))
        if cfg.adaptive_tolerance is not None:
            callbacks.append(AdaptiveEigenbasisRefresh(tolerance=cfg.adaptive_tolerance,
                                                       check_every=cfg.adaptive_check_every))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg.steps,
        logger=CSVLogger(save_dir=out, name=name, version=""),  # -> <out>/<name>/metrics.csv
        callbacks=callbacks,
        enable_progress_bar=True,
        enable_checkpointing=False,  # nothing to resume; keeps the output directory small
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=cfg.eval_every,
        check_val_every_n_epoch=None,
        log_every_n_steps=cfg.train_log_every,
    )
    print(f"\n=== {label(name)} (lr {lr:g}) ===", flush=True)
    # Eval loss of the initial weights (step 0), so every curve starts from the same point.
    trainer.validate(module, datamodule=datamodule, verbose=False)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - started
    if trainer.global_step % cfg.eval_every:  # the last step was not an eval step
        trainer.validate(module, datamodule=datamodule, verbose=False)
    final = float(trainer.callback_metrics["eval_loss"])
    return RunResult(name, lr, final, seconds, trainer.global_step, log_dir, tuple(clock.points))


# --------------------------------------------------------------------------- reporting
def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` as ``{column: [(step, value), ...]}``, skipping empty cells.

    Lightning writes one row per ``log_metrics`` call, so a step may appear in several rows
    with different columns filled in.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            step = int(float(row["step"]))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    for values in series.values():
        values.sort(key=lambda sv: sv[0])
    return series


def plot(results: Sequence[RunResult], cfg: RunConfig, path: Path) -> None:
    """Three panels: (a) eval loss vs step, (b) eval loss vs training wall-clock, (c) mean
    staleness vs step (preconditioned runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_clock, ax_stale) = plt.subplots(1, 3, figsize=(17, 4.6), constrained_layout=True)
    any_staleness = False
    eval_series: list[list[tuple[int, float]]] = []
    for r in results:
        series = read_metrics(r.log_dir / "metrics.csv")
        line_color, line_label = color(r.optimizer), f"{label(r.optimizer)} (lr {r.lr:g})"
        train = series.get("train_loss", [])
        if train:
            ax_loss.plot(*zip(*train), color=line_color, alpha=0.25, linewidth=0.8)
        evals = series.get("eval_loss", [])
        eval_series.append(evals)
        if evals:
            ax_loss.plot(*zip(*evals), color=line_color, marker="o", markersize=3.5, linewidth=1.8,
                         label=line_label)
            seconds_at = dict(r.clock)
            timed = [(seconds_at[step], v) for step, v in evals if step in seconds_at]
            if timed:
                ax_clock.plot(*zip(*timed), color=line_color, marker="o", markersize=3.5, linewidth=1.8,
                              label=line_label)
        stale = series.get(STALENESS_KEY, [])
        if stale:
            any_staleness = True
            ax_stale.plot(*zip(*stale), color=line_color, linewidth=1.2, label=label(r.optimizer))
    ax_loss.set_title("(a) held-out eval loss (faint: train loss)", fontsize=11)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("cross-entropy (nats / character)")
    ax_loss.grid(alpha=0.3)
    # Zoom in past the first eval: every curve starts at the same step-0 loss, near log(vocab).
    later = [v for vals in eval_series for _, v in vals[1:] if math.isfinite(v)]
    starts = [vals[0][1] for vals in eval_series if vals]
    if later and starts and max(later) < min(starts):
        low, high = min(later), max(later)
        pad = 0.05 * (high - low) + 0.02
        ax_loss.set_ylim(low - pad, high + pad)
        ax_loss.annotate(f"all start at {starts[0]:.2f} (step 0)", xy=(0.03, 0.03), xycoords="axes fraction",
                         ha="left", va="bottom", fontsize=9, color="dimgray")
    ax_loss.legend(loc="upper right")
    ax_clock.set_title("(b) held-out eval loss vs wall-clock", fontsize=11)
    ax_clock.set_xlabel("seconds in training steps (evals excluded)")
    ax_clock.set_ylabel("cross-entropy (nats / character)")
    ax_clock.set_ylim(ax_loss.get_ylim())
    ax_clock.grid(alpha=0.3)

    refresh = (f"adaptive refresh, tolerance {cfg.adaptive_tolerance:g}" if cfg.adaptive_tolerance is not None
               else "refreshed every 10 steps")
    ax_stale.set_title(f"(c) eigenbasis staleness, mean over factors ({refresh})", fontsize=11)
    ax_stale.set_xlabel("optimizer step")
    ax_stale.set_ylabel(r"$\|\mathrm{offdiag}(Q^\top A Q)\|_F\,/\,\|Q^\top A Q\|_F$")
    ax_stale.grid(alpha=0.3)
    if cfg.adaptive_tolerance is not None:
        ax_stale.axhline(cfg.adaptive_tolerance, color="black", linestyle="--", linewidth=0.8, label="tolerance")
    if any_staleness:
        ax_stale.set_ylim(bottom=0.0)
        ax_stale.legend()
    else:
        ax_stale.text(0.5, 0.5, "no optimizer with eigenbases in this run", ha="center", va="center",
                      transform=ax_stale.transAxes)
    fig.suptitle(
        f"CharGPT ({cfg.n_layer} layer{'s' if cfg.n_layer != 1 else ''}, width {cfg.n_embd}) on Shakespeare, "
        f"batch {cfg.batch_size} x {cfg.block_size} characters, same init and batches for every optimizer",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results: Sequence[RunResult]) -> str:
    header = ("optimizer", "lr", "final eval loss", "wall-clock s", "steps")
    rows = [(label(r.optimizer), f"{r.lr:g}", f"{r.final_eval_loss:.4f}", f"{r.seconds:.1f}", str(r.steps))
            for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [header, tuple("-" * w for w in widths), *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def write_curves(results: Sequence[RunResult], path: Path) -> None:
    """Every eval point with its step and training seconds (the data of panels (a) and (b))."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["optimizer", "step", "train_seconds", "eval_loss"])
        for r in results:
            seconds_at = dict(r.clock)
            for step, loss in read_metrics(r.log_dir / "metrics.csv").get("eval_loss", []):
                writer.writerow([r.optimizer, step, f"{seconds_at.get(step, float('nan')):.3f}", f"{loss:.6f}"])


# The recorded run README.md's demo table is made from (``--record``).
ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "examples" / "results"
README_TABLE = ("<!-- demo-table: generated by `python examples/demo.py --record` from "
                "examples/results/summary.csv -->", "<!-- demo-table: end -->")


def readme_table(summary: Sequence[dict[str, str]]) -> str:
    """README.md's demo table from the rows of a ``summary.csv``, between its markers."""
    lines = [README_TABLE[0], "| optimizer | lr | final eval loss | wall-clock s |", "|---|---|---|---|"]
    lines += [f"| {label(r['optimizer'])} | {float(r['lr']):g} | {float(r['final_eval_loss']):.3f} | "
              f"{float(r['wall_clock_s']):.0f} |" for r in summary]
    return "\n".join([*lines, README_TABLE[1]])


def rewrite_readme_table(readme: Path, summary: Sequence[dict[str, str]]) -> None:
    """Replace the table between README.md's markers (a ValueError if they are missing)."""
    text = readme.read_text()
    start, end = text.find(README_TABLE[0]), text.find(README_TABLE[1])
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no demo-table markers {README_TABLE}")
    end += len(README_TABLE[1])
    readme.write_text(text[:start] + readme_table(summary) + text[end:])


def record(out: Path) -> None:
    """``--record``: the run's summary, curves and figure into :data:`RECORDED`, and README.md's
    table from that summary, so the two cannot disagree (tests/test_demo.py checks it)."""
    RECORDED.mkdir(parents=True, exist_ok=True)
    for name in ("summary.csv", "curves.csv", "demo.png"):
        (RECORDED / name).write_bytes((out / name).read_bytes())
    with (RECORDED / "summary.csv").open() as fh:
        rewrite_readme_table(ROOT / "README.md", list(csv.DictReader(fh)))


def write_summary(results: Sequence[RunResult], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["optimizer", "lr", "final_eval_loss", "wall_clock_s", "steps"])
        for r in results:
            writer.writerow([r.optimizer, r.lr, f"{r.final_eval_loss:.6f}", f"{r.seconds:.3f}", r.steps])


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    cfg = replace(cfg, seed=args.seed, adaptive_tolerance=args.adaptive_refresh)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps, warmup_steps=min(cfg.warmup_steps, args.steps // 10),
                      eval_every=max(1, min(cfg.eval_every, args.steps // 4)))
    overrides = dict(args.lr)
    _quiet_lightning()

    try:
        corpus = CharCorpus.shakespeare()
    except DataError as exc:
        print(f"error: cannot load the Shakespeare text for the demo:\n{exc}", file=sys.stderr)
        return 1

    # One intra-op thread by default. This 2-vCPU machine gives about one core of float
    # throughput and the work here is small (matmuls of at most 2048 x 128 x 512, eigen/QR
    # steps on 64..512-sized factors). Measured on it, interleaved: a second thread was at
    # best ~1.6x faster, in a moment when nothing else ran, and 3-5x *slower* whenever another
    # process was busy, since both threads then wait on each other at every small op. One
    # thread keeps the wall-clock column predictable and comparable across optimizers;
    # pass --threads 2 on an otherwise idle machine.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = [train_one(name, overrides[name] if name in overrides else learning_rate(name), cfg, corpus,
                             args.out) for name in args.optimizers]
    finally:
        torch.set_num_threads(previous_threads)

    png = args.out / "demo.png"
    plot(results, cfg, png)
    write_summary(results, args.out / "summary.csv")
    write_curves(results, args.out / "curves.csv")
    print()
    print(format_table(results))
    print(f"\nlogs: {args.out}/<optimizer>/metrics.csv   plot: {png}   table: {args.out / 'summary.csv'}")
    if args.record:
        record(args.out)
        print(f"recorded in {RECORDED}; README.md's demo table rewritten from it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
