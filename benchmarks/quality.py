"""Algorithm quality: every contender at its own best learning rate, over seeds, on real tasks.

Usage
-----
::

    pip install -e '.[bench]' torch==2.13.0        # peers: pytorch-optimizer, heavyball
    .venv/bin/python benchmarks/quality.py                       # the suite (resumable)
    .venv/bin/python benchmarks/quality.py --budget-minutes 60   # stop starting runs after 60 min
    .venv/bin/python benchmarks/quality.py --tasks chargpt --contenders AdamW,SOAP
    .venv/bin/python benchmarks/quality.py --report-only         # tables and plots from the cache
    .venv/bin/python benchmarks/quality.py --quick --out /tmp/q  # seconds: every path, tiny runs

Protocol (the same for every contender, ours and the peers)
-----------------------------------------------------------
* **Runs are the unit of work, cached.** One run = (task, contender, lr, seed): it trains
  ``--steps`` steps and writes ``<out>/runs/<task>/<contender>/lr=<lr>,seed=<seed>.json``
  (eval curve with step and wall-clock, train losses, per-step times, state bytes, status).
  A run whose file exists with the same *fingerprint* is not run again, so an interrupted
  suite continues where it stopped, across sessions. The fingerprint is the run's settings
  plus the contender's code version: for ours a hash of ``lightning_precond``'s sources (any
  change to the package re-runs our contenders, and only them), for a peer its package
  version, for AdamW torch's.
* **Learning rates on one ladder**, a factor ~3 apart (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, ...),
  the same rungs for every contender. The sweep starts at 5 rungs centred on the contender's
  default lr (snapped to the ladder) with seed 0; while the best lr (lowest final eval
  loss) is an end of the sweep, the sweep grows one rung past that end (``--max-extensions``,
  default 4), so the reported optimum is interior or the report says it is not.
* **Seeds**: seeds 1 .. ``--seeds``-1 then run at the best lr. A seed sets the model's
  initialization and the batch order (model seed s, data seed s + 1); at a given seed every
  contender sees the same initial weights and the same batches. Reported: the mean final eval
  loss over the seeds and its spread (half the range).
* **Same settings**: weight decay 0, the schedule of ``convergence.py`` (5% linear warm-up,
  cosine to 10%), bases refreshed every 10 steps by every method with eigenbases (peers
  included), factors blocked at 1024 (256 on the autoencoder). Everything else at each
  implementation's defaults.
* **Wall-clock** is each run's own cumulative training-step time (forward, backward,
  ``step()``, ``zero_grad()``), one intra-op thread. Runs are not interleaved, so on a
  shared machine a run's time can carry another process's load: the step-time column is
  each run's median step, robust to stalls; ``benchmarks/step_time.py`` gives interleaved
  ratios.

Outputs: ``<out>/quality.md`` (per task: contender, best lr, mean ± spread, steps and
wall-clock to AdamW's final loss, ms/step, state), ``<out>/quality.csv`` (one row per task
and contender), ``<out>/quality_<task>.png`` (eval loss vs steps and vs wall-clock at each
contender's best lr, mean over seeds; final loss vs lr at seed 0).

Cost: ``--steps`` x runs. With the defaults a contender costs about 7-9 runs per task
(5 rungs, extensions, 2 more seeds).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from convergence import (BASELINE, REFRESH_EVERY, Contender, contenders, default_lr, lr_factor,  # noqa: E402
                         param_bytes, reach, state_bytes)
from tasks import TASK_NAMES, Task, build_task  # noqa: E402

from lightning_precond.registry import ALGORITHMS  # noqa: E402

DEFAULT_OUT = _HERE / "results" / "quality"
DEFAULT_TASKS = ("chargpt", "autoencoder", "mlp", "convnet", "gpt2")
# Sized so the whole suite fits its ~3 CPU-hour budget on one core (measured per-step costs at
# one thread: char-GPT 0.10-0.24 s, autoencoder 0.06-0.81 s, conv net 0.07-0.31 s, GPT-2 shape
# 0.63-1.2 s; about 7-9 runs per contender and task).
DEFAULT_STEPS = {"chargpt": 200, "autoencoder": 100, "mlp": 200, "convnet": 150, "gpt2": 50}
EVAL_POINTS = 10  # eval points per run (and at step 0)
BLOCK = {"autoencoder": 256}  # factor block size per task; 1024 elsewhere
PACKAGE = _HERE.parent / "lightning_precond"


# --------------------------------------------------------------------------- #
# The learning-rate ladder
# --------------------------------------------------------------------------- #

def rung_lr(rung: int) -> float:
    """Rung ``r`` of the ladder: ``10^(r // 2)``, times 3 when ``r`` is odd (1e-3 is rung -6)."""
    return float(f"{10.0 ** (rung // 2) * (3.0 if rung % 2 else 1.0):.2g}")


def nearest_rung(lr: float) -> int:
    """The rung closest to ``lr`` on a log scale."""
    if not lr > 0:
        raise ValueError(f"a learning rate must be > 0, got {lr!r}")
    guess = round(2 * math.log10(lr))
    return min(range(guess - 2, guess + 3), key=lambda r: abs(math.log(rung_lr(r) / lr)))


# --------------------------------------------------------------------------- #
# Contenders
# --------------------------------------------------------------------------- #

def _peer_muon(params: list[torch.nn.Parameter], lr: float, block: int) -> torch.optim.Optimizer:
    """pytorch-optimizer's Muon with the split ours uses: matrices orthogonalized, vectors on
    AdamW, one lr for both (``use_adjusted_lr``: Moonshot's RMS matching, like our default
    ``update_scale="rms"``)."""
    import pytorch_optimizer as po

    matrices = [p for p in params if p.ndim >= 2]
    vectors = [p for p in params if p.ndim < 2]
    groups = [{"params": matrices, "use_muon": True}]
    if vectors:
        groups.append({"params": vectors, "use_muon": False})
    return po.Muon(groups, lr=lr, weight_decay=0.0, use_adjusted_lr=True, adamw_lr=lr, adamw_wd=0.0)


def suite_contenders(with_peers: bool = True) -> tuple[list[Contender], dict[str, str]]:
    """``convergence.py``'s contenders (AdamW, every registered algorithm, the peers) plus
    pytorch-optimizer's Muon; every one runs on every task unless it cannot (see below)."""
    cons, unavailable = contenders(with_peers=with_peers)
    for c in cons:
        if c.impl == "pytorch-optimizer" and c.algorithm == "SOAP":
            # It cannot block: larger dims fall back to a diagonal (the autoencoder's
            # 1000-wide layers, the 50257-row embedding), which is another algorithm.
            c.tasks = ("chargpt", "mlp", "convnet")
        else:
            c.tasks = TASK_NAMES
    if with_peers and "pytorch-optimizer" not in unavailable:
        # Its Newton-Schulz iteration runs in bfloat16, which a CPU without bfloat16 units
        # emulates: 0.63 s per char-GPT step, over 15 s per autoencoder step (1000-wide layers).
        # The two large-matrix tasks would cost it hours, so it runs on the other three.
        cons.append(Contender("Muon (pytorch-optimizer)", "Muon", "pytorch-optimizer", _peer_muon,
                              tasks=("chargpt", "mlp", "convnet")))
    return cons, unavailable


def anchor_lr(c: Contender) -> float:
    """Where a contender's sweep is centred: its implementation's default lr."""
    if c.impl == "ours":
        return default_lr(ALGORITHMS[c.name])
    if c.impl == "torch":
        return 1e-3
    if c.name.startswith("Muon"):
        return 3e-3  # with RMS matching, Muon's lr is AdamW-like (ours: 1e-3 .. 3e-3)
    return 3e-3  # heavyball's and pytorch-optimizer's SOAP / KL defaults


def package_hash() -> str:
    """A hash of ``lightning_precond``'s sources: our contenders' code version."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def code_version(c: Contender) -> str:
    if c.impl == "ours":
        return f"lightning_precond:{package_hash()}"
    if c.impl == "torch":
        return f"torch:{torch.__version__}"
    from importlib.metadata import version

    return f"{c.impl}:{version(c.impl)}"


# --------------------------------------------------------------------------- #
# One run
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class RunKey:
    task: str
    contender: str
    lr: float
    seed: int
    steps: int
    quick: bool

    def path(self, out: Path) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.contender)
        return out / "runs" / self.task / safe / f"lr={self.lr:g},seed={self.seed}.json"


def train_one(task: Task, c: Contender, key: RunKey) -> dict[str, Any]:
    """Train one run; never raises (a failing contender is a recorded status)."""
    record: dict[str, Any] = {"status": "ok", "error": "", "evals": [], "train_losses": [], "step_times": [],
                              "state_bytes": 0}
    model = task.make_model()
    record["param_bytes"] = param_bytes(model)
    try:
        opt = c.build(list(model.parameters()), key.lr, BLOCK.get(key.task, 1024))
    except Exception as exc:  # noqa: BLE001 - recorded, never hidden
        return {**record, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
    base_lrs = [g["lr"] for g in opt.param_groups]
    eval_every = max(1, key.steps // EVAL_POINTS)
    batches = task.batches()
    elapsed = 0.0

    def evaluate(step: int) -> bool:
        loss = task.evaluate(model)
        record["evals"].append({"step": step, "time": elapsed, "eval_loss": loss})
        return math.isfinite(loss)

    evaluate(0)
    for step in range(key.steps):
        batch = next(batches)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * lr_factor(step, key.steps)
        try:
            t0 = time.perf_counter()
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001
            record.update(status="error", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)[-600:]}")
            break
        elapsed += dt
        record["step_times"].append(dt)
        record["train_losses"].append(float(loss.detach()))
        if step == 0:
            record["state_bytes"] = state_bytes(opt)
        if not math.isfinite(record["train_losses"][-1]):
            record["status"] = "diverged"
            break
        if (step + 1) % eval_every == 0 or step + 1 == key.steps:
            if not evaluate(step + 1):
                record["status"] = "diverged"
                break
    return record


def final_loss(record: dict[str, Any]) -> float:
    """The last eval loss of a completed run; inf for a failed one (it ranks last)."""
    if record["status"] != "ok" or not record["evals"]:
        return math.inf
    return float(record["evals"][-1]["eval_loss"])


class Cache:
    """Runs on disk, keyed by :class:`RunKey` and checked against a fingerprint."""

    def __init__(self, out: Path, deadline: float) -> None:
        self.out = out
        self.deadline = deadline
        self.ran = 0
        self.reused = 0
        self.seconds = 0.0  # wall-clock of every run the report covers (trained now or cached)
        self.out_of_time = False
        self.versions: dict[str, str] = {}
        self.stale: dict[str, set[str]] = {}  # contender -> older code versions its reused runs came from
        self._tasks: dict[tuple[str, int, bool], Task] = {}

    def fingerprint(self, c: Contender, key: RunKey, code: str | None = None) -> str:
        """The run's settings and ``code`` (default: the contender's current code version)."""
        if c.name not in self.versions:
            self.versions[c.name] = code_version(c)
        settings = {**asdict(key), "refresh_every": REFRESH_EVERY, "block": BLOCK.get(key.task, 1024),
                    "eval_points": EVAL_POINTS, "code": self.versions[c.name] if code is None else code}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def get(self, c: Contender, key: RunKey, *, run: bool = True) -> dict[str, Any] | None:
        """The run's record: from disk if current, else trained now (unless out of time).

        Without ``run`` (``--report-only``) a record with the same settings made by another
        version of the contender's code is used too, and listed in :attr:`stale`: a report
        regenerated after a code change shows what was measured, and says with which code.
        """
        path = key.path(self.out)
        fp = self.fingerprint(c, key)
        if path.exists():
            record = json.loads(path.read_text())
            current = record.get("fingerprint") == fp
            same_settings = record.get("fingerprint") == self.fingerprint(c, key, record.get("code", ""))
            if current or (not run and same_settings):
                self.reused += 1
                self.seconds += record.get("wall_seconds", 0.0)
                if not current:
                    self.stale.setdefault(c.name, set()).add(record["code"])
                return record
        if not run or time.monotonic() > self.deadline:
            self.out_of_time = self.out_of_time or run
            return None
        task_key = (key.task, key.seed, key.quick)
        if task_key not in self._tasks:
            self._tasks = {task_key: build_task(key.task, model_seed=key.seed, data_seed=key.seed + 1,
                                                quick=key.quick)}
        t0 = time.perf_counter()
        record = train_one(self._tasks[task_key], c, key)
        record.update(key=asdict(key), fingerprint=fp, code=self.versions[c.name],
                      wall_seconds=time.perf_counter() - t0)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)  # atomic: an interrupted run leaves no half-written record
        self.ran += 1
        self.seconds += record["wall_seconds"]
        print(f"[quality] {key.task} {c.name} lr={key.lr:g} seed={key.seed}: {record['status']} "
              f"final={final_loss(record):.4f} ({record['wall_seconds']:.0f} s)", flush=True)
        return record


# --------------------------------------------------------------------------- #
# The sweep of one contender on one task
# --------------------------------------------------------------------------- #

@dataclass
class Sweep:
    task: str
    contender: Contender
    lrs: list[float] = field(default_factory=list)  # swept at seed 0, ascending
    finals: dict[float, float] = field(default_factory=dict)  # seed-0 final loss per lr
    best_lr: float | None = None
    interior: bool = False
    complete: bool = False  # every run of the protocol is on disk
    seeds: dict[int, dict[str, Any]] = field(default_factory=dict)  # records at the best lr


def sweep(cache: Cache, task: str, c: Contender, *, steps: int, seeds: int, rungs: int, max_extensions: int,
          quick: bool, run: bool = True) -> Sweep:
    """The protocol of the module docstring for one contender on one task."""
    result = Sweep(task, c)
    centre = nearest_rung(anchor_lr(c))
    low, high = centre - rungs // 2, centre + (rungs - 1) // 2

    def at(rung: int) -> bool:
        lr = rung_lr(rung)
        record = cache.get(c, RunKey(task, c.name, lr, 0, steps, quick), run=run)
        if record is None:
            return False
        result.finals[lr] = final_loss(record)
        if lr not in result.lrs:
            result.lrs.append(lr)
            result.lrs.sort()
        return True

    if not all([at(r) for r in range(low, high + 1)]):
        return result
    extensions = 0
    while True:
        finite = {lr: v for lr, v in result.finals.items() if math.isfinite(v)}
        if not finite:
            return result  # every rung failed: reported as such
        result.best_lr = min(finite, key=finite.get)
        if extensions == max_extensions:
            break
        if result.best_lr == rung_lr(high):
            high += 1
            grown = high
        elif result.best_lr == rung_lr(low):
            low -= 1
            grown = low
        else:
            break
        extensions += 1
        if not at(grown):
            return result
    result.interior = rung_lr(low) < result.best_lr < rung_lr(high)
    for s in range(seeds):
        record = cache.get(c, RunKey(task, c.name, result.best_lr, s, steps, quick), run=run)
        if record is None:
            return result
        result.seeds[s] = record
    result.complete = True
    return result


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #

def mean_curve(records: Iterable[dict[str, Any]], axis: str) -> tuple[list[float], list[float]]:
    """Mean eval loss over seeds at each eval point (completed runs only), against ``axis``
    ("step", or "time": the mean wall-clock at that point)."""
    done = [r for r in records if r["status"] == "ok"]
    if not done:
        return [], []
    n = min(len(r["evals"]) for r in done)
    xs = [statistics.fmean(r["evals"][i][axis] for r in done) for i in range(n)]
    ys = [statistics.fmean(r["evals"][i]["eval_loss"] for r in done) for i in range(n)]
    return xs, ys


def summarize(sweeps: Sequence[Sweep]) -> list[dict[str, Any]]:
    """One row per contender: best lr, mean ± spread over seeds, reach of AdamW's final loss."""
    base = next((s for s in sweeps if s.contender.name == BASELINE and s.complete), None)
    target = None
    if base is not None:
        target = statistics.fmean(final_loss(r) for r in base.seeds.values())
    rows = []
    for s in sweeps:
        finals = [final_loss(r) for r in s.seeds.values()]
        ok = [v for v in finals if math.isfinite(v)]
        steps_to = times_to = None
        if target is not None and ok:
            hits = [reach(r["evals"], target) for r in s.seeds.values() if r["status"] == "ok"]
            if hits and all(h is not None for h in hits):
                steps_to = statistics.fmean(h[0] for h in hits)
                times_to = statistics.fmean(h[1] for h in hits)
        step_ms = [statistics.median(r["step_times"]) * 1e3 for r in s.seeds.values() if r["step_times"]]
        first = next(iter(s.seeds.values()), None)
        rows.append({
            "contender": s.contender.name, "algorithm": s.contender.algorithm, "impl": s.contender.impl,
            "complete": s.complete, "best_lr": s.best_lr, "interior": s.interior,
            "lrs": ",".join(f"{lr:g}" for lr in s.lrs),
            "seeds": len(finals), "seeds_ok": len(ok),
            "mean": statistics.fmean(ok) if ok else None,
            "spread": (max(ok) - min(ok)) / 2 if len(ok) > 1 else None,
            "steps_to_adamw": steps_to, "seconds_to_adamw": times_to,
            "ms_per_step": statistics.fmean(step_ms) if step_ms else None,
            "state_ratio": (first["state_bytes"] / first["param_bytes"]) if first and first["param_bytes"] else None,
            "statuses": ",".join(sorted({r["status"] for r in s.seeds.values()})),
        })
    return rows


def _f(x: Any, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def render(task_rows: dict[str, list[dict[str, Any]]], steps: dict[str, int], meta: dict[str, Any]) -> str:
    lines = ["# Algorithm quality: best learning rate, mean ± spread over seeds", "",
             f"Command: `{meta['command']}`. {meta['note']}", ""]
    for task, rows in task_rows.items():
        base = next((r for r in rows if r["contender"] == BASELINE), None)
        target = base["mean"] if base else None
        lines += [f"## {task} ({steps[task]} steps)", "",
                  f"AdamW's final loss (the target): {_f(target, '.4f')}.", "",
                  "| contender | best lr | interior | final eval loss | seeds | steps to AdamW's loss | "
                  "s to AdamW's loss | ms/step | state / params | lrs swept |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["mean"] is None, r["mean"] or 0.0)):
            final = "incomplete" if not r["complete"] else (
                f"{r['mean']:.4f} ± {r['spread']:.4f}" if r["spread"] is not None else _f(r["mean"], ".4f"))
            if r["complete"] and r["mean"] is None:
                final = f"failed ({r['statuses']})"
            ratio = ""
            if r["steps_to_adamw"] is not None:
                ratio = f"{r['steps_to_adamw']:.0f} ({r['steps_to_adamw'] / steps[task]:.2f}x)"
            lines.append(
                f"| {r['contender']} | {_f(r['best_lr'], 'g')} | {'yes' if r['interior'] else 'no'} | {final} | "
                f"{r['seeds_ok']}/{r['seeds']} | {ratio or '—'} | {_f(r['seconds_to_adamw'], '.1f')} | "
                f"{_f(r['ms_per_step'], '.1f')} | {_f(r['state_ratio'], '.2f')} | {r['lrs']} |")
        lines.append("")
    return "\n".join(lines)


def plot(task: str, sweeps: Sequence[Sweep], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the dev and bench extras
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for s in sweeps:
        style = "-" if s.contender.impl in ("ours", "torch") else "--"
        label = f"{s.contender.name} (lr {s.best_lr:g})" if s.best_lr else s.contender.name
        for ax, axis in zip(axes[:2], ("step", "time")):
            xs, ys = mean_curve(s.seeds.values(), axis)
            if xs:
                ax.plot(xs, ys, style, label=label)
        lrs = [lr for lr in s.lrs if math.isfinite(s.finals.get(lr, math.inf))]
        if lrs:
            axes[2].plot(lrs, [s.finals[lr] for lr in lrs], style + "o", ms=3, label=s.contender.name)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall-clock of training steps (s)")
    axes[2].set_xlabel("learning rate (seed 0)")
    axes[2].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
    finite = [v for s in sweeps for v in s.finals.values() if math.isfinite(v)]
    if finite:
        lo = min(finite)
        axes[2].set_ylim(lo - 0.02 * abs(lo), lo + 0.5 * (statistics.median(finite) - lo) + 0.05 * abs(lo) + 1e-3)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{task}: mean over seeds at each contender's best lr")
    fig.tight_layout()
    path = out / f"quality_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #

def parse_steps(spec: str | None, tasks: Sequence[str], quick: bool) -> dict[str, int]:
    steps = {t: (3 if quick else DEFAULT_STEPS[t]) for t in tasks}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            steps = {t: int(name) for t in tasks}
        elif name.strip() in steps:
            steps[name.strip()] = int(value)
        else:
            raise SystemExit(f"--steps {spec!r}: task {name.strip()!r} is not one of {', '.join(tasks)}")
    return steps


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma list of {TASK_NAMES}")
    ap.add_argument("--contenders", default=None, help="comma list of contender names (default: all)")
    ap.add_argument("--steps", default=None, help="N, or task=N,... (default " +
                    ",".join(f"{k}={v}" for k, v in DEFAULT_STEPS.items()) + ")")
    ap.add_argument("--seeds", type=int, default=3, help="seeds at the best lr (default 3)")
    ap.add_argument("--rungs", type=int, default=5, help="initial sweep: rungs around the default lr (default 5)")
    ap.add_argument("--max-extensions", type=int, default=4, help="rungs added past an end at most (default 4)")
    ap.add_argument("--budget-minutes", type=float, default=math.inf, help="start no run after this many minutes")
    ap.add_argument("--no-peers", action="store_true", help="skip pytorch-optimizer and heavyball")
    ap.add_argument("--report-only", action="store_true", help="tables and plots from the cache, no training")
    ap.add_argument("--quick", action="store_true", help="tiny tasks, 3 steps, 3 rungs, 2 seeds")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASK_NAMES:
            raise SystemExit(f"--tasks: {t!r} is not one of {', '.join(TASK_NAMES)}")
    if args.seeds < 1 or args.rungs < 3 or args.max_extensions < 0:
        raise SystemExit("--seeds must be >= 1, --rungs >= 3 and --max-extensions >= 0")
    if args.quick:
        args.rungs, args.seeds, args.max_extensions = 3, 2, 1
    steps = parse_steps(args.steps, tasks, args.quick)
    torch.set_num_threads(1)

    cons, unavailable = suite_contenders(with_peers=not args.no_peers)
    if args.contenders:
        wanted = [x.strip() for x in args.contenders.split(",") if x.strip()]
        unknown = sorted(set(wanted) - {c.name for c in cons})
        if unknown:
            raise SystemExit(f"--contenders: unknown {unknown}; choose from {', '.join(c.name for c in cons)}")
        cons = [c for c in cons if c.name in wanted]
    started = time.monotonic()
    cache = Cache(args.out, started + args.budget_minutes * 60)
    task_rows: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        sweeps = [sweep(cache, task, c, steps=steps[task], seeds=args.seeds, rungs=args.rungs,
                        max_extensions=args.max_extensions, quick=args.quick, run=not args.report_only)
                  for c in cons if task in c.tasks]
        task_rows[task] = summarize(sweeps)
        args.out.mkdir(parents=True, exist_ok=True)
        plot(task, sweeps, args.out)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    incomplete = sum(not r["complete"] for rows in task_rows.values() for r in rows)
    note = (f"{cache.ran} runs trained now, {cache.reused} reused from the cache "
            f"({cache.seconds / 60:.0f} min of runs in all); "
            + (f"{incomplete} sweeps incomplete (re-run the command to continue)." if incomplete
               else "every sweep complete."))
    if cache.stale:
        grouped: dict[tuple[str, str], list[str]] = {}
        for name, codes in sorted(cache.stale.items()):
            grouped.setdefault((", ".join(sorted(codes)), cache.versions[name]), []).append(name)
        older = (f"{', '.join(names)} with {codes} (the checkout: {now})" for (codes, now), names in grouped.items())
        note += " Recorded with an earlier code version: " + "; ".join(older) + "."
    if unavailable:
        note += " Unavailable: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()) + "."
    report = render(task_rows, steps, {"command": command, "note": note})
    (args.out / "quality.md").write_text(report + "\n")
    with open(args.out / "quality.csv", "w", newline="") as fh:
        fields = ["task", *next(iter(task_rows.values()))[0].keys()] if any(task_rows.values()) else ["task"]
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for task, rows in task_rows.items():
            for r in rows:
                w.writerow({"task": task, **r})
    print(report)
    print(f"[quality] {note} ({(time.monotonic() - started) / 60:.1f} min)", flush=True)
    return task_rows


if __name__ == "__main__":
    main()
