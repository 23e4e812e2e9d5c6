"""Learning-rate transfer across widths: char-GPT on Shakespeare, with and without muP.

Usage
-----
::

    .venv/bin/python benchmarks/transfer.py                      # the full sweep (estimate below)
    .venv/bin/python benchmarks/transfer.py --report-only        # re-render table + plots from the runs
    .venv/bin/python benchmarks/transfer.py --quick --out /tmp/t # tiny widths and steps: every path
    .venv/bin/python benchmarks/transfer.py --optimizers SOAP Muon --widths 64 128 256 512

Every run (optimizer, mode, width, lr, seed, steps) is one line of ``<out>/runs.jsonl``,
appended as soon as it finishes: an interrupted sweep resumes where it stopped (runs already
recorded are skipped), and a later session can extend it (more widths, seeds, steps) without
redoing anything. ``<out>`` defaults to ``benchmarks/results/transfer``. The report is
``<out>/transfer.md`` (the optimal lr per width and its drift in grid steps from the base
width, with and without the rules) and ``<out>/transfer_<optimizer>.png`` (final eval loss vs
lr, one curve per width, the two modes side by side).

What is run
-----------
The benchmarks' CharGPT (``examples/models.py``: 2 pre-LN blocks, 4 heads, context 64) at
widths 64, 128, 256 on the complete Shakespeare (``examples/data.py``, last 5% held out; eval
on 4 x 32 fixed held-out windows), batch 16, every optimizer on the same batches and the same
seeds; SOAP, Shampoo (Adam-grafted), Muon (``update_scale="rms"``) from this package, every
matrix refreshed every 10 steps, and ``torch.optim.AdamW``; linear warm-up over 5% of the
steps, then cosine decay to 10%. Two modes:

* ``standard``: one lr for every layer, the model's own initialization (N(0, 0.02)), no
  output multiplier: what users do today;
* ``mup``: :mod:`lightning_precond.transfer` with the smallest width as the base: per-layer
  lr and ``1 / width`` independent weight decay (``transfer.param_groups``), muP init
  (``transfer.init_``), the readout multiplier (``transfer.output_multiplier``).

Both modes use independent weight decay (1e-4 of the weights per step at the base width;
unscaled in ``standard``). The lr grid is the optimizer's base lr times ``2^k``,
``k = -4 .. 3`` (8 points, factor 2). The optimal lr of a width is the grid point with the
lowest mean eval loss over seeds; its drift is ``log2(lr*(width) / lr*(base width))`` grid steps.

Cost
----
One CPU core per run (``torch.set_num_threads(1)``). Seconds per step by optimizer and width
are in ``SECONDS_PER_STEP`` (one 40-step run each, on the shared 2-vCPU box under load);
``--estimate`` prints a sweep's estimated cost without running it. Without ``--steps`` the
steps are fitted to ``--budget-minutes`` (60): the default sweep (4 optimizers x 2 modes x 3
widths x 8 lrs x 2 seeds = 384 runs, 179 CPU-seconds per step of all of them) gets 20 steps,
which probes the early phase only; ``--steps 200`` is about 10 CPU-hours, width 512 (cubic
cost, 5.8 s per SOAP step) about 8x a width-256 run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parent.parent
for path in (_ROOT, _ROOT / "examples"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import data as example_data  # noqa: E402  (examples/data.py)
from models import CharGPT  # noqa: E402  (examples/models.py)

import lightning_precond as lp  # noqa: E402
from lightning_precond import transfer  # noqa: E402

OPTIMIZERS = ("SOAP", "Shampoo", "Muon", "AdamW")
MODES = ("standard", "mup")
BASE_LR = {"SOAP": 3e-3, "Shampoo": 1e-3, "Muon": 3e-3, "AdamW": 3e-3}
GRID_EXPONENTS = tuple(range(-4, 4))  # 8 points, factor 2
WEIGHT_DECAY = 1e-4  # independent: a fraction of the weights per step, at the base width
BLOCK, BATCH, LAYERS, HEADS, VOCAB_PAD = 64, 16, 2, 4, 0
# Seconds per training step (eval amortized) by optimizer and width: one 40-step muP run
# each at the base lr, one thread, on the shared 2-vCPU box under a load average of 5-6
# (two other workers): an idle machine is faster. SOAP at 512 measured; the others at 512
# are extrapolated by SOAP's 256 -> 512 ratio (8x).
SECONDS_PER_STEP: dict[str, dict[int, float]] = {
    "SOAP": {64: 0.111, 128: 0.379, 256: 0.726, 512: 5.81},
    "Shampoo": {64: 0.131, 128: 0.319, 256: 1.282},
    "Muon": {64: 0.115, 128: 0.191, 256: 1.265},
    "AdamW": {64: 0.106, 128: 0.142, 256: 0.842},
}
BUDGET_MINUTES = 60.0


def seconds_per_step(optimizer: str, width: int) -> float:
    """The table's value, else extrapolated: cubic above the widest measured width (SOAP's
    256 -> 512 ratio is 8), flat below the narrowest."""
    table = SECONDS_PER_STEP[optimizer]
    if width in table:
        return table[width]
    widest, narrowest = max(table), min(table)
    if width > widest:
        return table[widest] * (width / widest) ** 3
    return table[narrowest] if width < narrowest else table[min(w for w in table if w >= width)]


def estimate_seconds_per_step(plan: list[tuple[str, str, int, float, int]]) -> float:
    """CPU seconds of one training step of every run in ``plan`` together."""
    return sum(seconds_per_step(optimizer, width) for optimizer, _, width, _, _ in plan)


def lr_grid(optimizer: str, exponents: Iterable[int] = GRID_EXPONENTS) -> list[float]:
    return [BASE_LR[optimizer] * 2.0**k for k in exponents]


def _optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr)
    cls = {"SOAP": lp.SOAP, "Shampoo": lp.Shampoo, "Muon": lp.Muon}[name]
    extra = {} if name == "Muon" else {"precondition_frequency": 10}
    return cls(groups, lr=lr, weight_decay_mode="independent", **extra)


class Data:
    """Shakespeare, tokenized once; the same batches for every run of a seed."""

    def __init__(self) -> None:
        text = example_data.load_shakespeare()
        stoi, self.itos = example_data.char_vocab(text)
        tokens = example_data.encode(text, stoi)
        self.train, held_out = example_data.train_eval_split(tokens, 0.05)
        self.eval_set = list(example_data.eval_batches(held_out, 32, BLOCK, max_batches=4))

    def batches(self, seed: int):
        return example_data.random_batches(self.train, BATCH, BLOCK, torch.Generator().manual_seed(1000 + seed))


def run_one(data: Data, optimizer: str, mode: str, width: int, base_width: int, lr: float, seed: int,
            steps: int) -> dict[str, Any]:
    """Train one model; returns the run's record (final eval loss, or ``diverged``)."""
    torch.manual_seed(seed)
    model = CharGPT(len(data.itos), block_size=BLOCK, n_layer=LAYERS, n_head=HEADS, n_embd=width)
    widths = {width: base_width, 3 * width: 3 * base_width, 4 * width: 4 * base_width}
    if mode == "mup":
        transfer.init_(model, base_widths=widths)
        transfer.scale_output(model.head, transfer.output_multiplier(model, base_widths=widths))
    else:
        widths = {width: width}  # every multiplier 1: one lr, unscaled decay
    groups = transfer.param_groups(model, base_widths=widths, lr=lr, weight_decay=WEIGHT_DECAY, optimizer=optimizer)
    opt = _optimizer(optimizer, groups, lr)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    started = time.perf_counter()
    losses: list[float] = []
    diverged = False
    for step, (x, y) in zip(range(steps), data.batches(seed)):
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        if not torch.isfinite(loss) or loss.item() > 1e3:
            diverged = True
            break
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    eval_loss = math.inf
    if not diverged:
        model.eval()
        with torch.no_grad():
            eval_loss = sum(model(x, y)[1].item() for x, y in data.eval_set) / len(data.eval_set)
        diverged = not math.isfinite(eval_loss)
    return {
        "optimizer": optimizer, "mode": mode, "width": width, "base_width": base_width, "lr": lr, "seed": seed,
        "steps": steps, "eval_loss": eval_loss if not diverged else None, "diverged": diverged,
        "train_loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None,
        "seconds": time.perf_counter() - started,
    }


def _key(record: dict[str, Any]) -> tuple:
    return (record["optimizer"], record["mode"], record["width"], record["base_width"], round(record["lr"], 12),
            record["seed"], record["steps"])


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- report
def optimal(runs: list[dict[str, Any]], optimizer: str, mode: str, width: int, steps: int) -> tuple[float | None, dict]:
    """The grid lr with the lowest mean eval loss over seeds (diverged runs count as inf)."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        if (r["optimizer"], r["mode"], r["width"], r["steps"]) == (optimizer, mode, width, steps):
            by_lr.setdefault(r["lr"], []).append(math.inf if r["diverged"] else r["eval_loss"])
    means = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
    finite = {lr: m for lr, m in means.items() if math.isfinite(m)}
    return (min(finite, key=finite.get) if finite else None), means


def report(runs: list[dict[str, Any]], out: Path, steps: int, widths: list[int], optimizers: list[str]) -> str:
    lines = [f"# Learning-rate transfer across widths (char-GPT, {steps} steps)", "",
             "Optimal lr per width (grid factor 2; mean eval loss over seeds) and its drift from the "
             "base (smallest) width in grid steps; `-`: no finite run.", "",
             "| optimizer | mode | " + " | ".join(f"lr* @ {w}" for w in widths) + " | drift (grid steps) | "
             + " | ".join(f"loss @ {w}" for w in widths) + " |",
             "|---|---|" + "---|" * (2 * len(widths) + 1)]
    for optimizer in optimizers:
        for mode in MODES:
            best = [optimal(runs, optimizer, mode, w, steps) for w in widths]
            lrs = [b[0] for b in best]
            drift = [round(math.log2(lr / lrs[0])) if lr is not None and lrs[0] is not None else None for lr in lrs]
            losses = [b[1].get(lr) if lr is not None else None for b, lr in zip(best, lrs)]
            lines.append(
                f"| {optimizer} | {mode} | " + " | ".join("-" if lr is None else f"{lr:.2e}" for lr in lrs)
                + " | " + ", ".join("-" if d is None else f"{d:+d}" for d in drift) + " | "
                + " | ".join("-" if x is None else f"{x:.4f}" for x in losses) + " |")
    seconds = sum(r["seconds"] for r in runs if r["steps"] == steps)
    lines += ["", f"{sum(r['steps'] == steps for r in runs)} runs, {seconds / 60:.1f} CPU-minutes."]
    text = "\n".join(lines) + "\n"
    (out / "transfer.md").write_text(text)
    _plot(runs, out, steps, widths, optimizers)
    return text


def _plot(runs: list[dict[str, Any]], out: Path, steps: int, widths: list[int], optimizers: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for optimizer in optimizers:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, mode in zip(axes, MODES):
            for width in widths:
                _, means = optimal(runs, optimizer, mode, width, steps)
                points = sorted((lr, m) for lr, m in means.items() if math.isfinite(m))
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"width {width}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{optimizer}, {mode}")
            ax.set_xlabel("lr (base)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"eval loss after {steps} steps")
        axes[1].legend()
        fig.tight_layout()
        fig.savefig(out / f"transfer_{optimizer}.png", dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results" / "transfer")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--grid", nargs="+", type=int, default=list(GRID_EXPONENTS),
                        help="lr exponents k: base lr * 2^k")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per run (default: what fits --budget-minutes, {BUDGET_MINUTES:g})")
    parser.add_argument("--budget-minutes", type=float, default=BUDGET_MINUTES,
                        help="CPU-minutes the default --steps is fitted to (from SECONDS_PER_STEP)")
    parser.add_argument("--estimate", action="store_true", help="print the sweep's estimated cost and exit")
    parser.add_argument("--quick", action="store_true", help="widths 16 32, 2 lrs, 1 seed, 3 steps")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.seeds, args.grid, args.steps = [16, 32], [0], [0, 1], 3
    if any(w < HEADS or w % HEADS for w in args.widths) or len(set(args.widths)) < 2:
        parser.error(f"--widths must be at least two distinct multiples of {HEADS}")
    if not args.budget_minutes > 0:
        parser.error("--budget-minutes must be > 0")
    widths = sorted(args.widths)
    base_width = widths[0]
    plan = [(o, m, w, lr, s) for s in args.seeds for o in args.optimizers for m in MODES for w in widths
            for lr in lr_grid(o, args.grid)]
    per_step = estimate_seconds_per_step(plan)
    if args.steps is None:
        args.steps = max(1, int(args.budget_minutes * 60 / per_step))
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    print(f"{len(plan)} runs x {args.steps} steps: about {per_step * args.steps / 60:.0f} CPU-minutes "
          f"({per_step:.1f} s per step of every run, SECONDS_PER_STEP)", flush=True)
    if args.estimate:
        return 0
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "runs.jsonl"
    if not args.report_only:
        done = {_key(r) for r in load_runs(path)}
        data = Data()
        todo = [p for p in plan if (p[0], p[1], p[2], base_width, round(p[3], 12), p[4], args.steps) not in done]
        print(f"{len(plan)} runs planned, {len(plan) - len(todo)} already in {path}", flush=True)
        for i, (o, m, w, lr, s) in enumerate(todo, 1):
            record = run_one(data, o, m, w, base_width, lr, s, args.steps)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            result = "diverged" if record["diverged"] else f"{record['eval_loss']:.4f}"
            print(f"[{i}/{len(todo)}] {o} {m} width {w} lr {lr:.2e} seed {s}: {result} ({record['seconds']:.1f} s)",
                  flush=True)
    print(report(load_runs(path), args.out, args.steps, widths, args.optimizers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
