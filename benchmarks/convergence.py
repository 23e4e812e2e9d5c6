"""Convergence and cost benchmark: our optimizers vs AdamW and vs peer implementations.

Usage
-----
::

    pip install -e '.[bench]' torch==2.13.0     # peers: pytorch-optimizer, heavyball (+ matplotlib, tqdm)
    .venv/bin/python benchmarks/convergence.py                 # full suite: 23.8 min on a shared 2-vCPU box
    .venv/bin/python benchmarks/convergence.py --report-only   # re-render report + plots from the JSON
    .venv/bin/python benchmarks/convergence.py --quick --out /tmp/conv   # a few steps of every path
    .venv/bin/python benchmarks/convergence.py --tasks chargpt --steps 1000 --sweep 3e-4,1e-3,3e-3,1e-2

Writes ``<out>/convergence.json`` (every run of the sweep: eval curve, per-step times, state
bytes, staleness), ``<out>/convergence_sweep.csv`` (one row per run), ``<out>/convergence.md``
(the report) and ``<out>/convergence_<task>.png`` (eval loss vs steps and vs wall-clock, best
learning rate of each contender) plus ``<out>/convergence_staleness.png``. ``<out>`` defaults to
``benchmarks/results``.

Recorded results (``benchmarks/results/``)
------------------------------------------
``convergence.md``: the default run (sweep 3e-4, 1e-3, 3e-3; 23.8 min). Our basis-first
optimizers preferred the top of that sweep on the CharGPT and the MLP, so
``convergence_hi_lr/convergence.md`` repeats those two tasks with 1e-3, 3e-3, 1e-2 (14.6 min).
On the autoencoder our SOAP, KLShampoo, KLSOAP and EigenvalueCorrectedShampoo produce a
non-finite initial basis for ``decoder.6.weight`` (784x1000; about half of its gradient's
columns are exactly zero because of dead ReLUs, entries ~1e-5) and diverge at every learning
rate; the report shows them as failed rather than hiding them.

What is run
-----------
Tasks (``benchmarks/tasks.py``; offline data from ``examples/data.py``): CharGPT on
Shakespeare (last 5% held out), an MLP on Fashion-MNIST and the 784-1000-500-250-30 deep
autoencoder on Fashion-MNIST.

Contenders: ``torch.optim.AdamW``; every algorithm of ``lightning_precond.registry`` (SOAP,
Shampoo (Adam-grafted), KLShampoo, KLSOAP, EigenvalueCorrectedShampoo, and any registered
later); and the peers installed by the ``bench`` extra, when importable:
pytorch-optimizer's ``SOAP`` and ``ScalableShampoo`` (its grafted, blocked Shampoo; its plain
``Shampoo`` is ungrafted with no moving averages, so it is not the same algorithm as ours) and
heavyball's ``SOAP``, ``KLShampoo`` and ``KLSOAP``. heavyball is run eager
(``heavyball.utils.compile_mode = None``): its default ``torch.compile`` in max-autotune mode
costs minutes of compilation per shape on CPU. A peer that fails to import or raises during a
run is recorded as such in the JSON and the report, never silently dropped.

Common settings, identical for every contender: the same initial weights and the same batch
at each step (all contenders of a learning rate advance in lockstep, one step each, in an
order rotated every step, so machine noise is spread evenly); weight decay 0; learning-rate
schedule = linear warm-up over the first 5% of steps, then cosine decay to 10%;
preconditioner refresh every 10 steps for every matrix method with eigenbases (peers included;
heavyball's refresh schedule is switched off); other hyperparameters at each implementation's
defaults.
On the autoencoder the Kronecker factors are blocked at 256 (``--ae-block``): ours via
``max_preconditioner_dim``, heavyball via ``max_precond_dim`` + ``split=True``,
ScalableShampoo via ``block_size``. pytorch-optimizer's SOAP cannot block (it falls back to a
diagonal for larger dims), so it is not run there.

Learning rates: one log-spaced sweep shared by the contenders of the recorded results (default
3e-4, 1e-3, 3e-3; ``--sweep``): AdamW, the peers and our algorithms in ``SHARED_SWEEP``. Any
other registered algorithm has nothing recorded, so it gets its own sweep of 5 values around
its default learning rate, a factor ~3 apart (``default_sweep``; ``--quick``: its default alone);
``--sweep-for NAME=LR,LR,...`` sets any contender's sweep. At each learning rate the contenders
that sweep it train in lockstep. The best learning rate (lowest final eval loss) is reported;
every run is kept in the raw results.

Metrics (per task, best learning rate of each contender):

* target = AdamW's final eval loss (its best run).
* steps to target: first step at which the eval loss is <= target, linearly interpolated
  between eval points (eval every ``--eval-every`` steps on a fixed eval subset); ratio to AdamW.
* wall-clock to target: the contender's own cumulative training-step time (forward,
  backward, ``step()``, ``zero_grad()``; eval and statistics excluded) at that step; ratio.
* time per step: mean over all steps (refreshes amortized); ratio to AdamW.
* state bytes / param bytes: ours ``state_bytes()``; AdamW and peers: unique tensor storages
  reachable from ``optimizer.state``.
* final eval loss.
* ours vs peer (same algorithm): step-time ratio ours/peer and both final losses.
* staleness: for our optimizers, mean and max ``staleness`` and the summed ``refresh_count``
  from ``preconditioner_stats()`` at every eval point.

Threads: ``--threads auto`` (default) times AdamW and SOAP on the CharGPT for a few steps at
1 and at 2 intra-op threads, interleaved, and uses 2 only if they are >= 10% faster; on a
shared 2-vCPU box 1 thread usually wins (another process holding the second vCPU stalls
2-thread kernels). The probe and the choice are recorded in the report.

Scaling up: ``--steps N`` (all tasks) or ``--steps chargpt=1000,mlp=500``; ``--sweep`` with more
values; ``--eval-every``. Cost grows linearly in steps x sweep size x contenders.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from tasks import TASK_NAMES, Task, build_task  # noqa: E402

from lightning_precond import PreconditionedOptimizer  # noqa: E402
from lightning_precond.registry import ALGORITHMS, AlgorithmEntry, names  # noqa: E402

DEFAULT_OUT = _HERE / "results"
DEFAULT_SWEEP = (3e-4, 1e-3, 3e-3)
# The tasks of the recorded results (benchmarks/quality.py also runs the conv net and the GPT-2-shaped model).
DEFAULT_TASKS = ("chargpt", "mlp", "autoencoder")
DEFAULT_EVAL_EVERY = {"chargpt": 20, "mlp": 10, "autoencoder": 10, "convnet": 10, "gpt2": 10}
REFRESH_EVERY = 10
BASELINE = "AdamW"
OURS = tuple(names())  # every registered algorithm
# Our algorithms whose learning rates the recorded results swept with DEFAULT_SWEEP (shared with
# AdamW and the peers); any other registered algorithm gets default_sweep() of its default lr.
SHARED_SWEEP = ("SOAP", "Shampoo", "KLShampoo", "KLSOAP", "EigenvalueCorrectedShampoo")

try:  # progress bars are optional
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


# --------------------------------------------------------------------------- #
# Contenders
# --------------------------------------------------------------------------- #

@dataclass
class Contender:
    name: str            # unique label in the report
    algorithm: str       # algorithm family, used to pair ours with peers
    impl: str            # "ours", "torch", "pytorch-optimizer", "heavyball"
    build: Callable[[list[nn.Parameter], float, int], torch.optim.Optimizer]  # (params, lr, block)
    tasks: tuple[str, ...] = TASK_NAMES
    sweep: tuple[float, ...] | None = None  # its own learning rates; None: the shared sweep


def default_lr(entry: AlgorithmEntry) -> float:
    """The optimizer's default learning rate (its constructor's; else its short-run one)."""
    default = inspect.signature(entry.optimizer).parameters.get("lr")
    if default is not None and isinstance(default.default, float):
        return default.default
    return float(entry.short_run.get("lr", 1e-3))


def default_sweep(lr: float) -> tuple[float, ...]:
    """5 learning rates around ``lr``, a factor ~3 apart: on the 1-3-10 ladder of the shared
    sweep when ``lr`` is on it (1e-3: 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), else ``lr * 3**k``."""
    exponent = math.floor(math.log10(lr))
    mantissa = lr / 10.0**exponent
    if not (math.isclose(mantissa, 1.0, rel_tol=1e-6) or math.isclose(mantissa, 3.0, rel_tol=1e-6)):
        return tuple(float(f"{lr * 3.0 ** k:.2g}") for k in (-2, -1, 0, 1, 2))
    rung = 2 * exponent + (mantissa > 2.0)  # rung r is 10^(r // 2), times 3 if r is odd

    def value(r: int) -> float:
        return float(f"{10.0 ** (r // 2) * (3.0 if r % 2 else 1.0):.2g}")

    return tuple(value(r) for r in range(rung - 2, rung + 3))


def _ours(entry: AlgorithmEntry, **kw: Any) -> Callable[..., torch.optim.Optimizer]:
    """The registered optimizer at its defaults, but weight decay 0, a refresh every
    REFRESH_EVERY steps (with eigenbases) and factors blocked at ``block``."""
    cls = entry.optimizer
    accepts = inspect.signature(cls).parameters

    def build(params: list[nn.Parameter], lr: float, block: int) -> torch.optim.Optimizer:
        extra = dict(kw)
        if "grafting" in accepts:  # Shampoo: Adam grafting (its default)
            extra.setdefault("grafting", "adam")
        extra["weight_decay"] = 0.0
        if entry.has_basis:
            extra["precondition_frequency"] = REFRESH_EVERY
        if issubclass(cls, PreconditionedOptimizer):  # an engine option
            extra["max_preconditioner_dim"] = block
        return cls(params, lr=lr, **extra)

    return build


def _adamw(params: list[nn.Parameter], lr: float, block: int) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def contenders(with_peers: bool = True) -> tuple[list[Contender], dict[str, str]]:
    """Return the contenders and, per peer package, why it is unavailable (if it is)."""
    out = [Contender("AdamW", "AdamW", "torch", _adamw)]
    for name, entry in ALGORITHMS.items():
        sweep = None if name in SHARED_SWEEP else default_sweep(default_lr(entry))
        out.append(Contender(name, name, "ours", _ours(entry), sweep=sweep))
    unavailable: dict[str, str] = {}
    if not with_peers:
        unavailable["peers"] = "disabled with --no-peers"
        return out, unavailable
    try:
        import pytorch_optimizer as po
        from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

        def po_soap(params, lr, block):
            return po.SOAP(params, lr=lr, weight_decay=0.0, precondition_frequency=REFRESH_EVERY)

        def po_shampoo(params, lr, block):
            # AdaGrad grafting: its RMSProp grafting has no bias correction, so its first steps
            # are ~1/sqrt(1 - beta2) = 31x too large and the loss explodes (seen in testing).
            return po.ScalableShampoo(
                params, lr=lr, weight_decay=0.0, graft_type=LayerWiseGrafting.ADAGRAD,
                start_preconditioning_step=REFRESH_EVERY, preconditioning_compute_steps=REFRESH_EVERY,
                block_size=block,
            )

        out += [
            Contender("SOAP (pytorch-optimizer)", "SOAP", "pytorch-optimizer", po_soap,
                      tasks=("chargpt", "mlp")),
            Contender("Shampoo (pytorch-optimizer ScalableShampoo)", "Shampoo", "pytorch-optimizer",
                      po_shampoo),
        ]
    except Exception as exc:  # noqa: BLE001 - any import problem means "unavailable"
        unavailable["pytorch-optimizer"] = f"{type(exc).__name__}: {exc}"
    try:
        import heavyball

        heavyball.utils.compile_mode = None  # eager: no torch.compile on CPU

        def hb(cls):
            def build(params, lr, block):
                return cls(params, lr=lr, weight_decay=0.0, precondition_frequency=REFRESH_EVERY,
                           use_precond_schedule=False, max_precond_dim=block, split=True)
            return build

        out += [
            Contender("SOAP (heavyball)", "SOAP", "heavyball", hb(heavyball.SOAP)),
            Contender("KLShampoo (heavyball)", "KLShampoo", "heavyball", hb(heavyball.KLShampoo)),
            Contender("KLSOAP (heavyball)", "KLSOAP", "heavyball", hb(heavyball.KLSOAP)),
        ]
    except Exception as exc:  # noqa: BLE001
        unavailable["heavyball"] = f"{type(exc).__name__}: {exc}"
    return out, unavailable


# --------------------------------------------------------------------------- #
# Measurement helpers
# --------------------------------------------------------------------------- #

def _tensor_storage_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_storage_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_storage_bytes(v, seen) for v in obj)
    return 0


def state_bytes(opt: torch.optim.Optimizer) -> int:
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes())
    seen: set[int] = set()
    return sum(_tensor_storage_bytes(s, seen) for s in opt.state.values())


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def staleness_summary(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, float] | None:
    if not hasattr(opt, "preconditioner_stats"):
        return None
    records = opt.preconditioner_stats(model.named_parameters())
    if not records:
        return None
    vals = [r.staleness for r in records if math.isfinite(r.staleness)]
    return {
        "mean_staleness": statistics.fmean(vals) if vals else float("nan"),
        "max_staleness": max(vals) if vals else float("nan"),
        "refresh_count": int(sum(r.refresh_count for r in records)),
        "factors": len(records),
    }


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% (step is 0-based)."""
    warm = max(1, round(0.05 * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class Run:
    contender: Contender
    lr: float
    model: nn.Module
    opt: torch.optim.Optimizer | None
    base_lrs: list[float] = field(default_factory=list)
    status: str = "ok"
    error: str = ""
    step_times: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    staleness: list[dict[str, float]] = field(default_factory=list)
    state_bytes: int = 0

    @property
    def active(self) -> bool:
        return self.status == "ok"


def _fail(run: Run, status: str, exc: BaseException | None = None) -> None:
    run.status = status
    if exc is not None:
        run.error = f"{type(exc).__name__}: {exc}"
        tb = traceback.format_exc(limit=3)
        run.error += "\n" + tb[-800:]
    run.opt = None  # free memory


def run_lr(task: Task, cons: Sequence[Contender], lr: float, steps: int, eval_every: int,
           block: int, desc: str) -> list[Run]:
    """Train every contender at learning rate ``lr`` in lockstep on identical batches."""
    runs: list[Run] = []
    for c in cons:
        model = task.make_model()
        run = Run(c, lr, model, None)
        try:
            run.opt = c.build(list(model.parameters()), lr, block)
            run.base_lrs = [g["lr"] for g in run.opt.param_groups]
        except Exception as exc:  # noqa: BLE001
            _fail(run, "error", exc)
        runs.append(run)

    def record_staleness(run: Run, step: int, phase: str) -> None:
        if run.opt is None:
            return
        try:
            s = staleness_summary(run.opt, run.model)
        except Exception:  # noqa: BLE001 - stats must never kill a run
            s = None
        if s is not None:
            run.staleness.append({"step": step, "phase": phase, **s})

    def do_eval(step: int) -> None:
        for run in runs:
            if not run.active:
                continue
            loss = task.evaluate(run.model)
            run.evals.append({"step": step, "time": sum(run.step_times), "eval_loss": loss})
            record_staleness(run, step, "eval")
            if not math.isfinite(loss):
                _fail(run, "diverged")

    batches = task.batches()
    do_eval(0)
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True) if tqdm else range(steps)
    for step in bar:
        batch = next(batches)
        factor = lr_factor(step, steps)
        order = [runs[(step + k) % len(runs)] for k in range(len(runs))]
        for run in order:
            if not run.active:
                continue
            for g, base in zip(run.opt.param_groups, run.base_lrs):
                g["lr"] = base * factor
            try:
                t0 = time.perf_counter()
                loss = task.loss(run.model, batch)
                loss.backward()
                run.opt.step()
                run.opt.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - a peer crashing must not stop the suite
                _fail(run, "error", exc)
                continue
            run.step_times.append(dt)
            lv = float(loss.detach())
            run.train_losses.append(lv)
            if not math.isfinite(lv):
                _fail(run, "diverged")
            elif step == 0:
                run.state_bytes = state_bytes(run.opt)
        if (step + 1) % REFRESH_EVERY == REFRESH_EVERY - 1:
            # Eval points fall on refresh steps; also sample the staleness late in each
            # refresh cycle (just before the next refresh), where it is largest.
            for run in runs:
                if run.active and run.contender.impl == "ours":
                    record_staleness(run, step + 1, "before_refresh")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            do_eval(step + 1)
    for run in runs:
        if run.opt is not None:
            run.state_bytes = state_bytes(run.opt)
    if tqdm:
        bar.close()
    return runs


# --------------------------------------------------------------------------- #
# Analysis
# --------------------------------------------------------------------------- #

def reach(evals: list[dict[str, float]], target: float) -> tuple[float, float] | None:
    """(step, seconds) at which the eval curve first reaches ``target``, interpolated."""
    prev = None
    for e in evals:
        if e["eval_loss"] <= target:
            if prev is None or prev["eval_loss"] == e["eval_loss"]:
                return float(e["step"]), float(e["time"])
            w = (prev["eval_loss"] - target) / (prev["eval_loss"] - e["eval_loss"])
            return (prev["step"] + w * (e["step"] - prev["step"]),
                    prev["time"] + w * (e["time"] - prev["time"]))
        prev = e
    return None


def final_loss(r: dict[str, Any]) -> float:
    if r["status"] != "ok" or not r["evals"]:
        return float("inf")
    return r["evals"][-1]["eval_loss"]


def summarize(task_result: dict[str, Any]) -> dict[str, Any]:
    """Best run of each contender and its metrics relative to AdamW."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in task_result["runs"]:
        by_name.setdefault(r["contender"], []).append(r)
    best = {n: min(rs, key=final_loss) for n, rs in by_name.items()}
    rows: dict[str, dict[str, Any]] = {}
    base = best.get(BASELINE)
    target = final_loss(base) if base else float("nan")
    base_reach = reach(base["evals"], target) if base and math.isfinite(target) else None
    base_tps = statistics.fmean(base["step_times"]) if base and base["step_times"] else float("nan")
    for n, r in best.items():
        ok = math.isfinite(final_loss(r))
        tps = statistics.fmean(r["step_times"]) if r["step_times"] else float("nan")
        hit = reach(r["evals"], target) if ok and math.isfinite(target) else None
        row = {
            "contender": n, "algorithm": r["algorithm"], "impl": r["impl"], "best_lr": r["lr"],
            "status": r["status"] if ok else "all learning rates failed: "
            + ", ".join(f"{x['lr']:g}={x['status']}" for x in by_name[n]),
            "final_eval_loss": final_loss(r) if ok else None,
            "time_per_step_s": tps, "time_per_step_ratio": tps / base_tps if base_tps else None,
            "state_ratio": r["state_bytes"] / r["param_bytes"] if r["param_bytes"] else None,
            "state_bytes": r["state_bytes"], "steps_run": len(r["step_times"]),
            "steps_to_target": hit[0] if hit else None,
            "seconds_to_target": hit[1] if hit else None,
            "steps_ratio": hit[0] / base_reach[0] if hit and base_reach and base_reach[0] else None,
            "time_ratio": hit[1] / base_reach[1] if hit and base_reach and base_reach[1] else None,
            "sweep": {f"{x['lr']:g}": (final_loss(x) if math.isfinite(final_loss(x)) else x["status"])
                      for x in by_name[n]},
        }
        rows[n] = row
    return {"target": target, "rows": rows}


def _fmt(x: Any, spec: str = ".3f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:{spec}}{suffix}"


def render_report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Convergence and cost benchmark",
        "",
        f"Generated {meta['date']} by `{meta['command']}` in {meta['total_seconds'] / 60:.1f} min "
        f"(torch {meta['torch']}, {meta['threads']} thread(s), {meta['platform']}).",
        "",
        f"Learning-rate sweep: {_sweeps_text(meta)}; "
        "best final eval loss reported. Warm-up 5% + cosine to 10%, weight decay 0, refresh every "
        f"{REFRESH_EVERY} steps, same init and batches for all. Wall-clock = the contender's own "
        "summed train-step time (eval excluded); steps/time to target interpolated between eval points.",
        "",
        f"Threads: {meta['thread_choice']}",
        "",
    ]
    if meta["unavailable"]:
        lines += ["Peers not run: " + "; ".join(f"{k}: {v}" for k, v in meta["unavailable"].items()), ""]
    for tname, tres in result["tasks"].items():
        s = tres["summary"]
        lines += [
            f"## {tname}",
            "",
            f"{tres['description']}. {tres['steps']} steps, eval every {tres['eval_every']}; "
            f"parameters: {tres['param_bytes'] / 4:,.0f} ({tres['param_bytes'] / 1e6:.2f} MB); "
            f"target = AdamW's final eval loss **{_fmt(s['target'], '.4f')}**.",
            "",
            "| optimizer | impl | best lr | steps to target (x AdamW) | wall-clock to target (x AdamW) "
            "| ms/step (x AdamW) | state / params | final eval loss |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, row in s["rows"].items():
            steps = (f"{row['steps_to_target']:.0f} ({_fmt(row['steps_ratio'], '.2f')}x)"
                     if row["steps_to_target"] is not None else "not reached")
            secs = (f"{row['seconds_to_target']:.1f} s ({_fmt(row['time_ratio'], '.2f')}x)"
                    if row["seconds_to_target"] is not None else "not reached")
            final = _fmt(row["final_eval_loss"], ".4f") if row["final_eval_loss"] is not None else row["status"]
            ms = f"{_fmt(row['time_per_step_s'] * 1e3, '.1f')} ({_fmt(row['time_per_step_ratio'], '.2f')}x)"
            if row["final_eval_loss"] is None:
                ms += f" over {row['steps_run']} step(s) before failing"
            lines.append(
                f"| {n} | {row['impl']} | {row['best_lr']:g} | {steps} | {secs} | {ms} | "
                f"{_fmt(row['state_ratio'], '.2f')} | {final} |"
            )
        # ours vs peers
        pairs = []
        for n, row in s["rows"].items():
            if row["impl"] not in ("pytorch-optimizer", "heavyball"):
                continue
            ours = s["rows"].get(row["algorithm"])
            if ours is None:
                continue
            ratio = _pair_ratio(ours, row)
            verdict = ("n/a (a side failed at every lr; its few steps are not comparable)" if ratio is None
                       else "yes" if ratio < 1 else "no")
            pairs.append(
                f"| {row['algorithm']} | {n} | {_fmt(ratio, '.2f')} | "
                f"{_fmt(ours['final_eval_loss'], '.4f')} | {_fmt(row['final_eval_loss'], '.4f')} | {verdict} |"
            )
        if pairs:
            lines += ["", "Ours vs peer (same algorithm, each at its best lr):", "",
                      "| algorithm | peer | ms/step ours / peer | final loss ours | final loss peer | ours faster |",
                      "|---|---|---|---|---|---|", *pairs]
        swept = sorted({r["lr"] for r in tres["runs"]})
        lines += ["", "Sweep (final eval loss per learning rate; `diverged`/`error` when a run failed, "
                  "`·` not in that contender's sweep):", "",
                  "| optimizer | " + " | ".join(f"lr {x:g}" for x in swept) + " |",
                  "|---|" + "---|" * len(swept)]
        for n, row in s["rows"].items():
            cells = []
            for x in swept:
                v = row["sweep"].get(f"{x:g}", "·")
                cells.append(_fmt(v, ".4f") if isinstance(v, float) else str(v))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        errors = [r for r in tres["runs"] if r["status"] == "error"]
        if errors:
            lines += ["", "Errors:", ""]
            lines += [f"- {r['contender']} lr {r['lr']:g}: `{r['error'].splitlines()[0]}`" for r in errors]
        lines += ["", f"![{tname}](convergence_{tname}.png)", ""]
    lines += ["## Targets", ""]
    lines += [f"- {t}" for t in result["targets"]]
    lines += ["", "Staleness plot: mean `staleness` over all factors of our optimizers (best lr), sampled "
              "one step before each refresh (runs recorded before that sampling existed show the "
              "eval points, which coincide with refresh steps).", "",
              "![staleness](convergence_staleness.png)", ""]
    return "\n".join(lines)


def _sweeps_text(meta: dict[str, Any]) -> str:
    """The shared sweep, and the contenders with their own (results before per-contender
    sweeps existed have only the shared one)."""
    shared = [float(x) for x in meta["sweep"]]
    own = {n: lrs for n, lrs in meta.get("sweeps", {}).items() if [float(x) for x in lrs] != shared}
    text = ", ".join(f"{x:g}" for x in shared) + (" (every contender)" if not own else " (shared)")
    for n, lrs in own.items():
        text += f"; {n}: " + ", ".join(f"{x:g}" for x in lrs)
    return text


def _pair_ratio(ours: dict[str, Any], peer: dict[str, Any]) -> float | None:
    """ms/step ours / peer, or None when either side failed at every learning rate."""
    if ours["final_eval_loss"] is None or peer["final_eval_loss"] is None:
        return None
    if not peer["time_per_step_s"] or not math.isfinite(peer["time_per_step_s"]):
        return None
    return ours["time_per_step_s"] / peer["time_per_step_s"]


def check_targets(result: dict[str, Any]) -> list[str]:
    out = []
    g = result["tasks"].get("chargpt")
    if g is not None:
        for name in ("SOAP", "KLShampoo"):
            row = g["summary"]["rows"].get(name)
            if row is None:
                continue
            sr, tr = row["steps_ratio"], row["time_ratio"]
            ok_s = sr is not None and sr <= 0.6
            ok_t = tr is not None and tr <= 0.8
            out.append(
                f"chargpt {name}: steps {_fmt(sr, '.2f')}x (target <= 0.6x: {'met' if ok_s else 'MISSED'}), "
                f"wall-clock {_fmt(tr, '.2f')}x (target <= 0.8x: {'met' if ok_t else 'MISSED'})"
            )
    for tname, tres in result["tasks"].items():
        rows = tres["summary"]["rows"]
        for n, row in rows.items():
            if row["impl"] not in ("pytorch-optimizer", "heavyball"):
                continue
            ours = rows.get(row["algorithm"])
            if ours is None:
                continue
            r = _pair_ratio(ours, row)
            if r is None:
                out.append(f"{tname} {row['algorithm']} step faster than {n}: not comparable "
                           "(a side failed at every learning rate)")
                continue
            out.append(f"{tname} {row['algorithm']} step faster than {n}: ours/peer = {_fmt(r, '.2f')} "
                       f"({'met' if r < 1 else 'MISSED'})")
    return out


# --------------------------------------------------------------------------- #
# Plots
# --------------------------------------------------------------------------- #

def plot(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = sorted({r["contender"] for t in result["tasks"].values() for r in t["runs"]})
    cmap = plt.get_cmap("tab20")
    color = {n: cmap(i % 20) for i, n in enumerate(names)}

    def style(r):
        return "-" if r["impl"] in ("ours", "torch") else "--"

    for tname, tres in result["tasks"].items():
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        rows = tres["summary"]["rows"]
        for r in tres["runs"]:
            row = rows[r["contender"]]
            if r["lr"] != row["best_lr"] or not r["evals"]:
                continue
            st = [e["step"] for e in r["evals"]]
            tm = [e["time"] for e in r["evals"]]
            ls = [e["eval_loss"] for e in r["evals"]]
            label = f"{r['contender']} (lr {r['lr']:g})"
            lw = 2.2 if r["contender"] == BASELINE else 1.4
            axes[0].plot(st, ls, style(r), color=color[r["contender"]], label=label, lw=lw)
            axes[1].plot(tm, ls, style(r), color=color[r["contender"]], label=label, lw=lw)
        target = tres["summary"]["target"]
        for ax, xl in zip(axes, ("step", "train wall-clock (s)")):
            if math.isfinite(target):
                ax.axhline(target, color="gray", lw=0.8, ls=":")
            ax.set_xlabel(xl)
            ax.set_ylabel("eval loss")
            ax.grid(alpha=0.3)
        finite = [e["eval_loss"] for r in tres["runs"] for e in r["evals"] if math.isfinite(e["eval_loss"])]
        if finite:
            lo = min(finite)
            first = [r["evals"][min(1, len(r["evals"]) - 1)]["eval_loss"] for r in tres["runs"] if r["evals"]]
            hi = max(x for x in first if math.isfinite(x)) if any(math.isfinite(x) for x in first) else max(finite)
            for ax in axes:
                ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo) + 1e-6)
        axes[0].set_title(f"{tname}: eval loss vs steps (dotted: AdamW final)")
        axes[1].set_title(f"{tname}: eval loss vs wall-clock")
        axes[1].legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        p = out / f"convergence_{tname}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)

    fig, axes = plt.subplots(1, max(1, len(result["tasks"])), figsize=(5 * max(1, len(result["tasks"])), 4),
                             squeeze=False)
    for ax, (tname, tres) in zip(axes[0], result["tasks"].items()):
        rows = tres["summary"]["rows"]
        for r in tres["runs"]:
            if r["impl"] != "ours" or r["lr"] != rows[r["contender"]]["best_lr"] or not r["staleness"]:
                continue
            late = [s for s in r["staleness"] if s.get("phase") == "before_refresh"]
            series = late or r["staleness"]
            ax.plot([s["step"] for s in series], [s["mean_staleness"] for s in series],
                    "-o", ms=3, color=color[r["contender"]], label=r["contender"])
        ax.set_title(f"{tname}: mean factor staleness (best lr)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("staleness")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "convergence_staleness.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)
    return paths


# --------------------------------------------------------------------------- #
# Threads
# --------------------------------------------------------------------------- #

def probe_threads(steps: int = 12) -> tuple[int, dict[str, float]]:
    """Interleaved 1- vs 2-thread timing of AdamW and SOAP on the CharGPT; returns the choice."""
    task = build_task("chargpt", quick=True)
    it = task.batches()
    batches = [next(it) for _ in range(steps)]
    times: dict[int, list[float]] = {1: [], 2: []}
    setups = []
    for th in (1, 2):
        for c in (_adamw, _ours(ALGORITHMS["SOAP"])):
            m = task.make_model()
            setups.append((th, m, c(list(m.parameters()), 1e-3, 1024)))
    for i, b in enumerate(batches):
        for k in range(len(setups)):
            th, m, opt = setups[(i + k) % len(setups)]
            torch.set_num_threads(th)
            t0 = time.perf_counter()
            task.loss(m, b).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:  # skip warm-up steps
                times[th].append(time.perf_counter() - t0)
    med = {f"{th}_thread_median_ms": statistics.median(v) * 1e3 for th, v in times.items()}
    choice = 2 if med["2_thread_median_ms"] < 0.9 * med["1_thread_median_ms"] else 1
    return choice, med


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #

def _parse_steps(spec: str | None, tasks: Sequence[str], quick: bool) -> dict[str, int]:
    defaults = {"chargpt": 200, "mlp": 120, "autoencoder": 80, "convnet": 120, "gpt2": 60}
    if quick:
        defaults = {t: 3 for t in defaults}
    if not spec:
        return {t: defaults[t] for t in tasks}
    if "=" not in spec:
        return {t: int(spec) for t in tasks}
    out = {t: defaults[t] for t in tasks}
    for part in spec.split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v)
    return out


def contender_sweeps(cons: Sequence[Contender], shared: Sequence[float], sweep_for: Sequence[str],
                     quick: bool) -> dict[str, tuple[float, ...]]:
    """Each contender's learning rates: ``--sweep-for``, else its own (``--quick``: the middle
    one, its default lr), else the shared sweep."""
    given: dict[str, tuple[float, ...]] = {}
    for spec in sweep_for:
        name, _, values = spec.partition("=")
        if name.strip() not in {c.name for c in cons} or not values:
            raise SystemExit(f"--sweep-for {spec!r}: expected NAME=LR,LR,... with NAME one of "
                             f"{', '.join(c.name for c in cons)}")
        given[name.strip()] = tuple(float(x) for x in values.split(","))
    out = {}
    for c in cons:
        if c.name in given:
            out[c.name] = given[c.name]
        elif c.sweep is not None:
            out[c.name] = (c.sweep[len(c.sweep) // 2],) if quick else c.sweep
        else:
            out[c.name] = tuple(shared)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma list of {TASK_NAMES}")
    ap.add_argument("--steps", default=None,
                    help="steps per run: N for all tasks or task=N,... (default chargpt=200,mlp=120,autoencoder=80)")
    ap.add_argument("--sweep", default=None,
                    help="comma list of learning rates shared by AdamW, the peers and SHARED_SWEEP "
                         "(default 3e-4,1e-3,3e-3)")
    ap.add_argument("--sweep-for", action="append", default=[], metavar="NAME=LR,LR,...",
                    help="the learning rates of contender NAME (repeatable); others not in SHARED_SWEEP "
                         "default to 5 values around their default lr")
    ap.add_argument("--eval-every", type=int, default=None, help="eval interval (default 20 chargpt, 10 others)")
    ap.add_argument("--threads", default="auto", help="'auto' (probe 1 vs 2) or an int")
    ap.add_argument("--ae-block", type=int, default=256, help="factor block size on the autoencoder")
    ap.add_argument("--block", type=int, default=1024, help="factor block size on the other tasks")
    ap.add_argument("--optimizers", default=None, help="comma list of contender names to run (default all)")
    ap.add_argument("--no-peers", action="store_true", help="skip pytorch-optimizer and heavyball")
    ap.add_argument("--fashion-root", default=None, help="directory with the Fashion-MNIST idx .gz files")
    ap.add_argument("--seed", type=int, default=0, help="model-init seed (data seed = seed + 1)")
    ap.add_argument("--quick", action="store_true",
                    help="3 steps, one learning rate per contender, small eval sets")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render the report and plots from <out>/convergence.json without training")
    args = ap.parse_args(argv)
    if args.report_only:
        return _rerender(args.out)

    started = time.perf_counter()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    steps = _parse_steps(args.steps, tasks, args.quick)
    if args.sweep:
        sweep = [float(x) for x in args.sweep.split(",")]
    else:
        sweep = [1e-3] if args.quick else list(DEFAULT_SWEEP)

    if args.threads == "auto" and not args.quick:
        threads, probe = probe_threads()
        thread_choice = (f"probe (AdamW+SOAP on CharGPT, interleaved, median ms/step): "
                         f"1 thread {probe['1_thread_median_ms']:.1f}, 2 threads {probe['2_thread_median_ms']:.1f} "
                         f"-> {threads} thread(s) (2 only if >= 10% faster)")
    else:
        threads = 1 if args.threads == "auto" else int(args.threads)
        probe = {}
        thread_choice = f"{threads} (set explicitly{' / --quick' if args.quick else ''})"
    torch.set_num_threads(threads)
    print(f"[convergence] threads: {thread_choice}", flush=True)

    cons, unavailable = contenders(with_peers=not args.no_peers)
    if args.optimizers:
        keep = {x.strip() for x in args.optimizers.split(",")}
        cons = [c for c in cons if c.name in keep or c.name == BASELINE]
    sweeps = contender_sweeps(cons, sweep, args.sweep_for, args.quick)

    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"tasks": {}}
    for tname in tasks:
        task = build_task(tname, model_seed=args.seed, data_seed=args.seed + 1, quick=args.quick,
                          fashion_root=args.fashion_root)
        eval_every = args.eval_every or (1 if args.quick else DEFAULT_EVAL_EVERY[tname])
        block = args.ae_block if tname == "autoencoder" else args.block
        tcons = [c for c in cons if tname in c.tasks]
        pbytes = param_bytes(task.make_model())
        runs = []
        lrs = sorted({lr for c in tcons for lr in sweeps[c.name]})
        for i, lr in enumerate(lrs):
            t0 = time.perf_counter()
            batch = run_lr(task, [c for c in tcons if lr in sweeps[c.name]], lr, steps[tname], eval_every, block,
                           desc=f"{tname} lr={lr:g} ({i + 1}/{len(lrs)})")
            print(f"[convergence] {tname} lr={lr:g}: {time.perf_counter() - t0:.0f} s; "
                  + ", ".join(f"{r.contender.name}={r.evals[-1]['eval_loss']:.3f}" if r.active and r.evals
                              else f"{r.contender.name}={r.status}" for r in batch), flush=True)
            for r in batch:
                runs.append({
                    "contender": r.contender.name, "algorithm": r.contender.algorithm,
                    "impl": r.contender.impl, "lr": lr, "status": r.status, "error": r.error,
                    "param_bytes": pbytes, "state_bytes": r.state_bytes,
                    "step_times": r.step_times, "train_losses": r.train_losses,
                    "evals": r.evals, "staleness": r.staleness,
                })
        tres = {"description": task.description, "steps": steps[tname], "eval_every": eval_every,
                "block": block, "param_bytes": pbytes, "runs": runs,
                "skipped": [c.name for c in cons if tname not in c.tasks]}
        tres["summary"] = summarize(tres)
        result["tasks"][tname] = tres

    result["targets"] = check_targets(result)
    result["meta"] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "threads": threads, "thread_probe": probe,
        "thread_choice": thread_choice, "platform": platform.platform(), "sweep": sweep,
        "sweeps": {name: list(lrs) for name, lrs in sweeps.items()},
        "steps": steps, "unavailable": unavailable, "quick": args.quick,
        "peer_versions": _peer_versions(),
        "total_seconds": time.perf_counter() - started,
    }
    (args.out / "convergence.json").write_text(json.dumps(result, indent=1, default=str))
    with open(args.out / "convergence_sweep.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "contender", "impl", "lr", "status", "final_eval_loss", "steps_run",
                    "mean_step_ms", "state_bytes", "param_bytes"])
        for tname, tres in result["tasks"].items():
            for r in tres["runs"]:
                w.writerow([tname, r["contender"], r["impl"], r["lr"], r["status"],
                            r["evals"][-1]["eval_loss"] if r["evals"] else "",
                            len(r["step_times"]),
                            f"{statistics.fmean(r['step_times']) * 1e3:.2f}" if r["step_times"] else "",
                            r["state_bytes"], r["param_bytes"]])
    plot(result, args.out)
    report = render_report(result)
    (args.out / "convergence.md").write_text(report + "\n")
    print(report)
    print(f"[convergence] done in {result['meta']['total_seconds'] / 60:.1f} min; wrote {args.out}", flush=True)
    return result


def _rerender(out: Path) -> dict[str, Any]:
    result = json.loads((out / "convergence.json").read_text())
    for tres in result["tasks"].values():
        tres["summary"] = summarize(tres)
    result["targets"] = check_targets(result)
    (out / "convergence.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, out)
    report = render_report(result)
    (out / "convergence.md").write_text(report + "\n")
    print(report)
    return result


def _peer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("pytorch-optimizer", "heavyball"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


if __name__ == "__main__":
    main()
