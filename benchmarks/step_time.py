"""Step-time, state-size and refresh-count benchmark for the preconditioned optimizers.

What it measures (all in one process, CPU):

1. **Threads, 1 vs 2** -- a short interleaved probe (AdamW and SOAP on both models) at
   1 and 2 intra-op threads; ``--threads auto`` (default) runs the main timing with the
   thread count that had the lower geometric-mean time per step.
2. **Full training-step time** -- forward, backward, ``optimizer.step()`` and ``zero_grad()``
   for AdamW (``torch.optim``) and every algorithm of ``lightning_precond.registry`` (SOAP,
   Shampoo, KLShampoo, KLSOAP, EigenvalueCorrectedShampoo, ...) on a small MLP and a small
   transformer (CharGPT). Every
   contender is warmed up, then the contenders are run round-robin for ``--rounds`` rounds
   of ``--steps`` consecutive steps each (rotating the order every round), so machine
   noise hits everyone alike. All optimizers with eigenbases use ``precondition_frequency=10``
   (the default); with ``--steps`` a multiple of 10 every round holds the same number of
   refreshes, so the per-round mean is the amortized cost. Reported: the median over
   rounds of the round's mean step time ("amortized ms/step"), its ratio to AdamW, the
   median single step (a typical step without refresh), p90 and max, and the median of
   the ``optimizer.step()`` part alone.
3. **Optimizer state** -- ``opt.state_bytes()`` (summed tensor bytes of ``opt.state`` for
   AdamW) and its ratio to the parameters' bytes.
4. **Adaptive vs periodic refresh** -- CharGPT trained on Shakespeare for
   ``--refresh-steps`` steps with ``refresh="periodic"`` (every 10 steps) and
   ``refresh="adaptive"`` for every optimizer with eigenbases (and AdamW as a loss
   reference), all runs in lockstep on the same batches. Reported: the total refresh count
   (sum of ``refresh_count`` over the factors of ``preconditioner_stats()``, including
   the initial basis), final train loss (mean of the last 20 steps), eval loss on held-out
   text, and the summed step time.

Output: a markdown report on stdout and in ``<out>/step_time.md``, raw numbers in
``<out>/step_time.json``; ``--profile`` also writes ``<out>/profile_soap.txt``.

Run ``python benchmarks/step_time.py`` (about 7 minutes on an idle 2-vCPU machine) or
``python benchmarks/step_time.py --quick`` (a few steps of every path, for tests).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_REPO_ROOT = Path(__file__).resolve().parent.parent
_EXAMPLES = _REPO_ROOT / "examples"
if str(_EXAMPLES) not in sys.path:
    sys.path.insert(0, str(_EXAMPLES))

import data as example_data  # noqa: E402  (examples/data.py)
from models import MLP, CharGPT  # noqa: E402  (examples/models.py)

from lightning_precond.registry import ALGORITHMS, names  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PRECONDITION_FREQUENCY = 10
BASELINE = "AdamW"
# Ours: every registered algorithm; the refresh experiment runs those with eigenbases.
OPTIMIZER_NAMES = (BASELINE, *names())
WITH_BASIS = tuple(names(has_basis=True))
PROBE_OPTIMIZERS = ("AdamW", "SOAP")
TRAIN_LOSS_WINDOW = 20


def make_optimizer(name: str, params: Any, **options: Any) -> torch.optim.Optimizer:
    """Each optimizer with its own default hyperparameters (``precondition_frequency=10`` for
    those with eigenbases, their default too)."""
    if name == BASELINE:
        return torch.optim.AdamW(params)
    entry = ALGORITHMS[name]
    if entry.has_basis:
        options = {"precondition_frequency": PRECONDITION_FREQUENCY, **options}
    return entry.optimizer(params, **options)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    method = getattr(opt, "state_bytes", None)
    if callable(method):
        return int(method())
    total = 0
    for entry in opt.state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------- workloads
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Workload:
    key: str
    title: str
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    batches: list[Batch]


def _mlp_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _gpt_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    _, loss = model(x, y)
    return loss


@dataclass
class TextData:
    source: str  # "shakespeare" or "random tokens"
    vocab_size: int
    train: torch.Tensor
    eval: torch.Tensor


def load_text(kind: str) -> TextData:
    """Shakespeare tokens, or uniformly random tokens (``kind='random'`` or on failure in auto)."""
    if kind in ("auto", "shakespeare"):
        try:
            text = example_data.load_shakespeare()
        except example_data.DataError as exc:
            if kind == "shakespeare":
                raise
            print(f"[step_time] Shakespeare unavailable ({exc}); using random tokens", file=sys.stderr)
        else:
            stoi, _ = example_data.char_vocab(text)
            train, held_out = example_data.train_eval_split(example_data.encode(text, stoi))
            return TextData("shakespeare", len(stoi), train, held_out)
    generator = torch.Generator().manual_seed(1234)
    vocab = 84  # the Shakespeare character vocabulary size, so model shapes match
    tokens = torch.randint(0, vocab, (200_000,), generator=generator)
    return TextData("random tokens", vocab, tokens[:190_000], tokens[190_000:])


def mlp_workload(seed: int, pool: int) -> Workload:
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [
        (torch.randn(128, 784, generator=generator), torch.randint(0, 10, (128,), generator=generator))
        for _ in range(pool)
    ]

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return MLP(784, (512, 512), 10)

    return Workload("mlp", "MLP 784-512-512-10, batch 128 (random inputs)", build, _mlp_loss, batches)


GPT_CONFIG = dict(block_size=64, n_layer=2, n_head=4, n_embd=128)
GPT_BATCH = 16


def build_gpt(vocab_size: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return CharGPT(vocab_size, **GPT_CONFIG)  # type: ignore[arg-type]


def gpt_workload(text: TextData, seed: int, pool: int) -> Workload:
    generator = torch.Generator().manual_seed(seed + 2)
    batches = list(
        example_data.random_batches(text.train, GPT_BATCH, GPT_CONFIG["block_size"], generator, pool)
    )
    title = (
        f"CharGPT 2 layers, n_embd 128, 4 heads, block 64, batch {GPT_BATCH} "
        f"({text.source}, vocab {text.vocab_size})"
    )
    return Workload("transformer", title, lambda: build_gpt(text.vocab_size, seed), _gpt_loss, batches)


# --------------------------------------------------------------------------- timing
@dataclass
class Contender:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    workload: Workload
    cursor: int = 0

    def step(self) -> tuple[float, float, torch.Tensor]:
        """One full training step; returns (total seconds, optimizer.step seconds, loss)."""
        batch = self.workload.batches[self.cursor % len(self.workload.batches)]
        self.cursor += 1
        start = time.perf_counter()
        loss = self.workload.loss(self.model, batch)
        loss.backward()
        before_step = time.perf_counter()
        self.opt.step()
        after_step = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return end - start, after_step - before_step, loss.detach()


def make_contender(name: str, workload: Workload) -> Contender:
    model = workload.build()
    return Contender(name, model, make_optimizer(name, model.parameters()), workload)


def run_block(contender: Contender, steps: int) -> tuple[list[float], list[float]]:
    """``steps`` consecutive timed steps with the garbage collector held off."""
    gc.collect()
    gc.disable()
    try:
        totals, opt_times = [], []
        for _ in range(steps):
            total, opt_time, _ = contender.step()
            totals.append(total)
            opt_times.append(opt_time)
    finally:
        gc.enable()
    return totals, opt_times


def warm_up(contenders: Sequence[Contender], steps: int) -> None:
    for contender in contenders:
        run_block(contender, steps)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(rounds_total: Sequence[Sequence[float]], rounds_opt: Sequence[Sequence[float]]) -> dict[str, float]:
    steps = [t for r in rounds_total for t in r]
    opt_steps = [t for r in rounds_opt for t in r]
    round_means = [statistics.fmean(r) for r in rounds_total if r]
    return {
        "amortized_ms": 1e3 * statistics.median(round_means),
        "mean_ms": 1e3 * statistics.fmean(steps),
        "median_step_ms": 1e3 * statistics.median(steps),
        "p90_ms": 1e3 * _quantile(steps, 0.9),
        "max_ms": 1e3 * max(steps),
        "median_opt_step_ms": 1e3 * statistics.median(opt_steps),
        "mean_opt_step_ms": 1e3 * statistics.fmean(opt_steps),
    }


def interleaved(
    contenders: Sequence[Contender], rounds: int, steps: int
) -> dict[str, tuple[list[list[float]], list[list[float]]]]:
    """Round-robin: every round runs ``steps`` steps of each contender, order rotated per round."""
    times: dict[str, tuple[list[list[float]], list[list[float]]]] = {
        c.name: ([], []) for c in contenders
    }
    k = len(contenders)
    for r in range(rounds):
        order = [contenders[(r + j) % k] for j in range(k)]
        for contender in order:
            totals, opt_times = run_block(contender, steps)
            times[contender.name][0].append(totals)
            times[contender.name][1].append(opt_times)
    return times


# --------------------------------------------------------------------------- thread probe
def thread_probe(
    workloads: Sequence[Workload],
    counts: Sequence[int],
    rounds: int,
    steps: int,
    warmup: int,
    margin: float,
    optimizers: Sequence[str] = PROBE_OPTIMIZERS,
) -> dict[str, Any]:
    """Interleave 1 and 2 threads (alternating which goes first) over AdamW and SOAP."""
    contenders = [make_contender(name, w) for w in workloads for name in optimizers]
    previous = torch.get_num_threads()
    raw: dict[int, dict[str, list[list[float]]]] = {
        t: {f"{c.workload.key}/{c.name}": [] for c in contenders} for t in counts
    }
    try:
        for t in counts:
            torch.set_num_threads(t)
            warm_up(contenders, warmup)
        for r in range(rounds):
            order = list(counts) if r % 2 == 0 else list(reversed(counts))
            for t in order:
                torch.set_num_threads(t)
                for c in contenders:
                    totals, _ = run_block(c, steps)
                    raw[t][f"{c.workload.key}/{c.name}"].append(totals)
    finally:
        torch.set_num_threads(previous)
    summary: dict[int, dict[str, dict[str, float]]] = {}
    geo: dict[int, float] = {}
    for t in counts:
        summary[t] = {}
        logs = []
        for key, rounds_total in raw[t].items():
            steps_flat = [x for r in rounds_total for x in r]
            round_means = [statistics.fmean(r) for r in rounds_total]
            entry = {
                "amortized_ms": 1e3 * statistics.median(round_means),
                "median_step_ms": 1e3 * statistics.median(steps_flat),
                "max_ms": 1e3 * max(steps_flat),
            }
            summary[t][key] = entry
            logs.append(math.log(entry["amortized_ms"]))
        geo[t] = math.exp(statistics.fmean(logs))
    # Fewer threads unless more are clearly faster: extra threads on a shared 2-vCPU box
    # stall whenever a co-tenant holds the other vCPU (see the max column).
    ordered = sorted(counts)
    best = ordered[0]
    for t in ordered[1:]:
        if geo[t] < (1.0 - margin) * geo[best]:
            best = t
    return {
        "counts": list(counts),
        "rounds": rounds,
        "steps_per_round": steps,
        "summary": {str(t): v for t, v in summary.items()},
        "geomean_ms": {str(t): v for t, v in geo.items()},
        "best": best,
        "margin": margin,
        "raw_seconds": {str(t): v for t, v in raw.items()},
    }


# --------------------------------------------------------------------------- refresh experiment
@dataclass
class RefreshRun:
    name: str
    mode: str  # "periodic", "adaptive" or "-" (AdamW)
    tolerance: float | None
    model: nn.Module
    opt: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    opt_seconds: list[float] = field(default_factory=list)


@torch.no_grad()
def eval_loss(model: nn.Module, tokens: torch.Tensor, batches: int) -> float:
    model.eval()
    losses = []
    for x, y in example_data.eval_batches(tokens, GPT_BATCH, GPT_CONFIG["block_size"], batches):
        _, loss = model(x, y)
        losses.append(float(loss))
    model.train()
    return statistics.fmean(losses)


def refresh_experiment(
    text: TextData,
    steps: int,
    eval_batch_count: int,
    seed: int,
    tolerances: Sequence[float],
    check_interval: int,
) -> dict[str, Any]:
    """Periodic vs adaptive refresh (one run per tolerance) for every optimizer with
    eigenbases, all runs in lockstep on the same batches."""
    runs: list[RefreshRun] = []
    model = build_gpt(text.vocab_size, seed)
    runs.append(RefreshRun(BASELINE, "-", None, model, make_optimizer(BASELINE, model.parameters())))
    variants: list[tuple[str, float | None]] = [("periodic", None)]
    variants += [("adaptive", tol) for tol in tolerances]
    for name in WITH_BASIS:
        for mode, tol in variants:
            model = build_gpt(text.vocab_size, seed)
            options: dict[str, Any] = {"refresh": mode}
            if tol is not None:
                options.update(refresh_tolerance=tol, refresh_check_interval=check_interval)
            opt = make_optimizer(name, model.named_parameters(), **options)
            runs.append(RefreshRun(name, mode, tol, model, opt))
    generator = torch.Generator().manual_seed(seed + 3)
    batches = list(
        example_data.random_batches(text.train, GPT_BATCH, GPT_CONFIG["block_size"], generator, steps)
    )
    for step, (x, y) in enumerate(batches):
        order = runs[step % len(runs):] + runs[: step % len(runs)]
        for run in order:
            start = time.perf_counter()
            _, loss = run.model(x, y)
            loss.backward()
            before_step = time.perf_counter()
            run.opt.step()
            run.opt_seconds.append(time.perf_counter() - before_step)
            run.opt.zero_grad(set_to_none=True)
            run.seconds.append(time.perf_counter() - start)
            run.losses.append(float(loss.detach()))
    results = []
    for run in runs:
        entry: dict[str, Any] = {
            "optimizer": run.name,
            "refresh": run.mode,
            "refresh_tolerance": run.tolerance,
            "train_loss": statistics.fmean(run.losses[-TRAIN_LOSS_WINDOW:]),
            "eval_loss": eval_loss(run.model, text.eval, eval_batch_count),
            "step_seconds_total": sum(run.seconds),
            "opt_step_seconds_total": sum(run.opt_seconds),
            "losses": run.losses,
            "step_seconds": run.seconds,
        }
        stats_fn = getattr(run.opt, "preconditioner_stats", None)
        if callable(stats_fn):
            records = stats_fn()
            entry["factors"] = len(records)
            entry["refreshes"] = sum(r.refresh_count for r in records)
            entry["failures"] = sum(r.failure_count for r in records)
            entry["mean_staleness"] = statistics.fmean(r.staleness for r in records) if records else 0.0
        results.append(entry)
    return {
        "steps": steps,
        "data": text.source,
        "precondition_frequency": PRECONDITION_FREQUENCY,
        "refresh_tolerances": list(tolerances),
        "refresh_check_interval": check_interval,
        "eval_batches": eval_batch_count,
        "train_loss_window": TRAIN_LOSS_WINDOW,
        "runs": results,
    }


# --------------------------------------------------------------------------- profiling
def profile_soap(workloads: Sequence[Workload], steps: int, warmup: int) -> str:
    """Where SOAP training steps spend their time: torch.profiler ops and cProfile functions.

    ``steps`` consecutive steps (10 = one refresh included) after ``warmup`` steps.
    """
    from torch.profiler import ProfilerActivity, profile

    out = io.StringIO()
    for workload in workloads:
        contender = make_contender("SOAP", workload)
        run_block(contender, warmup)
        out.write(
            f"## SOAP on {workload.title}: {steps} steps after {warmup} warm-up steps "
            f"(a refresh every {PRECONDITION_FREQUENCY} steps)\n\n"
        )
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run_block(contender, steps)
        out.write("### torch.profiler, top ops by self CPU time\n\n")
        out.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        out.write("\n### torch.profiler, top ops by self CPU time, grouped by input shape\n\n")
        out.write(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=12
            )
        )
        profiler = cProfile.Profile()
        profiler.enable()
        run_block(contender, steps)
        profiler.disable()
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer)
        stats.sort_stats("cumulative").print_stats(r"lightning_precond|step_time|torch/nn/modules", 30)
        out.write("\n### cProfile, cumulative time (package, model and benchmark functions)\n\n")
        out.write(buffer.getvalue())
        out.write("\n\n")
    return out.getvalue()


# --------------------------------------------------------------------------- report
def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def _mode_label(run: dict[str, Any]) -> str:
    if run["refresh"] == "adaptive":
        return f"adaptive, tol {run['refresh_tolerance']}"
    return run["refresh"]


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    env = report["environment"]
    lines = ["# Step-time benchmark", ""]
    lines.append(f"Command: `{cfg['command']}`  ")
    lines.append(
        f"Date: {report['date']}; torch {env['torch']}, {env['cpu_count']} CPUs "
        f"({env['processor'] or env['machine']}), python {env['python']}."
    )
    lines.append("")
    if report["timing"]:
        lines += _timing_protocol(cfg)
    threads = report["threads"]
    lines.append(f"**Threads: {threads['used']}** ({threads['reason']}).")
    lines.append("")
    probe = report.get("thread_probe")
    if probe:
        lines += _probe_lines(probe)
    for key, result in report["timing"].items():
        lines += _timing_lines(result)
    refresh = report.get("refresh")
    if refresh:
        lines += _refresh_lines(refresh)
    if report.get("notes"):
        lines.append("## Notes")
        lines.append("")
        lines.extend(f"- {note}" for note in report["notes"])
        lines.append("")
    return "\n".join(lines)


def _timing_protocol(cfg: dict[str, Any]) -> list[str]:
    lines = []
    lines.append(
        f"Protocol: every contender has its own model (same initialization) and is warmed up "
        f"for {cfg['warmup']} steps; then {cfg['rounds']} rounds, each running {cfg['steps']} "
        f"consecutive full training steps (forward, backward, optimizer.step, zero_grad) of every "
        f"contender in turn, order rotated each round. All our optimizers use their default "
        f"hyperparameters, those with eigenbases precondition_frequency={PRECONDITION_FREQUENCY} (the "
        f"default), so refresh cost is included: with {cfg['steps']} steps per round every round "
        f"holds {cfg['steps'] // PRECONDITION_FREQUENCY} refresh(es) per factor. "
        f"**ms/step** is the median over rounds of the round's mean step time (amortized); "
        f"**median step** is the median single step (typically no refresh); **opt.step** is the "
        f"median and mean time of optimizer.step() alone. AdamW is torch.optim.AdamW with defaults "
        f"(foreach). Optimizer state is `state_bytes()` (AdamW: its state tensors)."
    )
    lines.append("")
    return lines


def _probe_lines(probe: dict[str, Any]) -> list[str]:
    lines = []
    if probe:
        counts = probe["counts"]
        lines.append(
            f"## Threads: {' vs '.join(str(c) for c in counts)} (probe: {probe['rounds']} rounds x "
            f"{probe['steps_per_round']} steps, interleaved)"
        )
        lines.append("")
        header = "| workload / optimizer | " + " | ".join(
            f"{c} thr ms/step | {c} thr max ms" for c in counts
        ) + " |"
        lines.append(header)
        lines.append("|" + "---|" * (1 + 2 * len(counts)))
        keys = list(probe["summary"][str(counts[0])].keys())
        for key in keys:
            cells = []
            for c in counts:
                entry = probe["summary"][str(c)][key]
                cells += [_fmt(entry["amortized_ms"]), _fmt(entry["max_ms"])]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        geo = " / ".join(f"{c} thr {probe['geomean_ms'][str(c)]:.1f} ms" for c in counts)
        lines.append("")
        lines.append(
            f"Geometric mean ms/step: {geo}; chosen for `--threads auto`: {probe['best']} "
            f"(more threads only if >= {100 * probe['margin']:.0f}% faster)."
        )
        lines.append("")
    return lines


def _timing_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    if result:
        lines.append(f"## Step time: {result['title']}")
        lines.append("")
        lines.append(
            f"Parameters: {result['param_count']:,} ({result['param_bytes'] / 2**20:.2f} MiB)."
        )
        lines.append("")
        lines.append(
            "| optimizer | ms/step | x AdamW | median step ms | p90 ms | max ms "
            "| opt.step ms median / mean "
            "| state MiB | state / params |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        base = result["optimizers"].get(BASELINE)
        for name, entry in result["optimizers"].items():
            ratio = entry["amortized_ms"] / base["amortized_ms"] if base else float("nan")
            lines.append(
                f"| {name} | {_fmt(entry['amortized_ms'])} | {ratio:.2f} | "
                f"{_fmt(entry['median_step_ms'])} | {_fmt(entry['p90_ms'])} | {_fmt(entry['max_ms'])} | "
                f"{_fmt(entry['median_opt_step_ms'])} / {_fmt(entry['mean_opt_step_ms'])} | "
                f"{entry['state_bytes'] / 2**20:.2f} | "
                f"{entry['state_ratio']:.2f} |"
            )
        lines.append("")
    return lines


def _refresh_lines(refresh: dict[str, Any]) -> list[str]:
    lines = []
    if refresh:
        lines.append(
            f"## Adaptive vs periodic refresh: CharGPT on {refresh['data']}, {refresh['steps']} steps"
        )
        lines.append("")
        lines.append(
            f"periodic: refresh every {refresh['precondition_frequency']} steps (each optimizer's "
            f"own method); adaptive: every {refresh['refresh_check_interval']} steps refresh, with the "
            f"optimizer's own method started from the check's product F Q, only the factors whose "
            f"staleness ||offdiag(Q^T F Q)||/||Q^T F Q|| exceeds the tolerance ({', '.join(str(t) for t in refresh['refresh_tolerances'])}). "
            f"Refreshes = sum of `refresh_count` over factors (incl. the initial basis). Train loss "
            f"= mean of the last {refresh['train_loss_window']} training losses; eval loss over "
            f"{refresh['eval_batches']} held-out batches. All runs share batches and step in "
            f"lockstep; step s = summed full-step time, opt.step s = summed optimizer.step() time "
            f"(noisy, indicative)."
        )
        lines.append("")
        lines.append(
            "| optimizer | refresh | refreshes | factors | refreshes / factor | mean staleness "
            "| train loss | eval loss | step s | opt.step s | opt.step x periodic |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        periodic = {run["optimizer"]: run["opt_step_seconds_total"] for run in refresh["runs"]
                    if run["refresh"] == "periodic"}
        for run in refresh["runs"]:
            base = periodic.get(run["optimizer"])
            versus = f"{run['opt_step_seconds_total'] / base:.2f}" if base else "-"
            if "refreshes" in run:
                per = run["refreshes"] / run["factors"] if run["factors"] else 0.0
                counts = (
                    f"{run['refreshes']} | {run['factors']} | {per:.1f} | {run['mean_staleness']:.3f}"
                )
            else:
                counts = "- | - | - | -"
            lines.append(
                f"| {run['optimizer']} | {_mode_label(run)} | {counts} | {run['train_loss']:.3f} | "
                f"{run['eval_loss']:.3f} | {run['step_seconds_total']:.2f} | "
                f"{run['opt_step_seconds_total']:.2f} | {versus} |"
            )
        lines.append("")
    return lines


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-3 steps of every path (for tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument(
        "--threads", default="auto",
        help="intra-op threads for the timing: an int, or 'auto' (the thread probe's winner)",
    )
    parser.add_argument("--probe-threads", default="1,2", help="thread counts the probe compares")
    parser.add_argument("--skip-thread-probe", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 10)")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 20)")
    parser.add_argument("--refresh-steps", type=int, default=None, help="default 200; 0 skips")
    parser.add_argument(
        "--refresh-tolerances", default=None,
        help="comma list of adaptive tolerances, one run each (default 0.1,0.3; --quick: 0.1)",
    )
    parser.add_argument(
        "--thread-margin", type=float, default=0.1,
        help="--threads auto takes more threads only if the probe is this fraction faster",
    )
    parser.add_argument("--refresh-check-interval", type=int, default=10)
    parser.add_argument("--eval-batches", type=int, default=None, help="default 32")
    parser.add_argument("--models", default="mlp,transformer", help="comma list: mlp, transformer")
    parser.add_argument(
        "--optimizers", default=",".join(OPTIMIZER_NAMES), help="comma list (AdamW is always kept)"
    )
    parser.add_argument(
        "--data", choices=("auto", "shakespeare", "random"), default=None,
        help="transformer tokens (default: auto = Shakespeare, else random; --quick: random)",
    )
    parser.add_argument("--profile", action="store_true", help="also profile SOAP steps")
    parser.add_argument(
        "--refresh-only", action="store_true",
        help="only the adaptive-vs-periodic experiment (4.), to <out>/refresh.md and refresh.json",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "rounds": (1, 10), "steps": (2, 20), "warmup": (1, 20), "refresh_steps": (2, 200),
        "eval_batches": (1, 32), "data": ("random", "auto"), "refresh_tolerances": ("0.1", "0.1,0.3"),
    }
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if quick else full_value)
    args.probe_rounds, args.probe_steps, args.probe_warmup = (1, 1, 1) if quick else (4, 10, 3)
    args.profile_steps, args.profile_warmup = (2, 1) if quick else (PRECONDITION_FREQUENCY, 12)
    return args


def _environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "default_threads": torch.get_num_threads(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python benchmarks/step_time.py", *given])
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"mlp", "transformer"}
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}")
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = set(names) - set(OPTIMIZER_NAMES)
    if unknown:
        raise SystemExit(f"unknown optimizers {sorted(unknown)}; choose from {OPTIMIZER_NAMES}")
    names = [BASELINE] + [n for n in names if n != BASELINE]

    text = load_text(args.data)
    workloads: list[Workload] = []
    pool = 4 if args.quick else 16
    if "mlp" in models:
        workloads.append(mlp_workload(args.seed, pool))
    if "transformer" in models:
        workloads.append(gpt_workload(text, args.seed, pool))

    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": _environment(),
        "config": {
            "command": command,
            "quick": args.quick,
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup": args.warmup,
            "precondition_frequency": PRECONDITION_FREQUENCY,
            "seed": args.seed,
            "models": models,
            "optimizers": names,
        },
        "notes": [],
    }

    # 1. threads
    probe = None
    if args.refresh_only:
        workloads = []  # sections 1-3 skipped
        if args.threads == "auto":
            args.threads = "1"
    if not args.skip_thread_probe and workloads:
        counts = [int(c) for c in args.probe_threads.split(",") if c.strip()]
        probe = thread_probe(
            workloads, counts, args.probe_rounds, args.probe_steps, args.probe_warmup,
            args.thread_margin, ("AdamW",) if args.quick else PROBE_OPTIMIZERS,
        )
        report["thread_probe"] = probe
    if args.threads == "auto":
        if probe is not None:
            used = probe["best"]
            reason = (
                "chosen by the probe (more threads only if >= "
                f"{100 * args.thread_margin:.0f}% faster in geometric-mean ms/step): "
                + ", ".join(f"{t} thr {v:.1f} ms" for t, v in probe["geomean_ms"].items())
            )
        else:
            used = torch.get_num_threads()
            reason = "torch default (probe skipped)"
    else:
        used = int(args.threads)
        reason = "set by --threads"
    torch.set_num_threads(used)
    report["threads"] = {"used": used, "reason": reason}
    print(f"[step_time] threads={used} ({reason})", file=sys.stderr)

    # 2-3. interleaved step times and state bytes
    report["timing"] = {}
    for workload in workloads:
        contenders = [make_contender(name, workload) for name in names]
        warm_up(contenders, args.warmup)
        times = interleaved(contenders, args.rounds, args.steps)
        entry: dict[str, Any] = {
            "title": workload.title,
            "param_count": sum(p.numel() for p in contenders[0].model.parameters()),
            "param_bytes": param_bytes(contenders[0].model),
            "optimizers": {},
        }
        for contender in contenders:
            totals, opt_times = times[contender.name]
            summary = summarize(totals, opt_times)
            summary["state_bytes"] = state_bytes(contender.opt)
            summary["state_ratio"] = summary["state_bytes"] / entry["param_bytes"]
            summary["raw_step_seconds"] = totals
            summary["raw_opt_step_seconds"] = opt_times
            entry["optimizers"][contender.name] = summary
        base = entry["optimizers"][BASELINE]["amortized_ms"]
        for summary in entry["optimizers"].values():
            summary["ratio_to_adamw"] = summary["amortized_ms"] / base
        report["timing"][workload.key] = entry
        print(f"[step_time] timed {workload.key}", file=sys.stderr)
        del contenders

    # 4. adaptive vs periodic refresh
    if args.refresh_steps > 0 and ("transformer" in models or args.refresh_only):
        if text.source != "shakespeare":
            report["notes"].append(
                f"Refresh experiment ran on {text.source}, not Shakespeare (losses are not meaningful)."
            )
        report["refresh"] = refresh_experiment(
            text, args.refresh_steps, args.eval_batches, args.seed,
            [float(t) for t in args.refresh_tolerances.split(",") if t.strip()],
            args.refresh_check_interval,
        )
        print("[step_time] refresh experiment done", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile_text = profile_soap(workloads, args.profile_steps, args.profile_warmup)
        (args.out / "profile_soap.txt").write_text(profile_text)
        report["notes"].append(f"SOAP profile written to {args.out / 'profile_soap.txt'}.")

    report["total_seconds"] = time.perf_counter() - started
    report["notes"].append(f"Total benchmark wall time: {report['total_seconds']:.0f} s.")
    markdown = render_markdown(report)
    stem = "refresh" if args.refresh_only else "step_time"
    (args.out / f"{stem}.md").write_text(markdown + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(markdown)
    return report


if __name__ == "__main__":
    main()
