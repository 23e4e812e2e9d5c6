"""Convergence parity of ``matmul_dtype="bfloat16"`` / ``"float16"``: final loss against float32, same protocol.

Usage
-----
::

    .venv/bin/python benchmarks/precision_parity.py                          # SOAP, KL-Shampoo on the char-GPT
    .venv/bin/python benchmarks/precision_parity.py --algorithms SOAP --tasks chargpt,mlp
    .venv/bin/python benchmarks/precision_parity.py --dtype float16          # the scaled float16 products

For each (task, algorithm) the float32 contender's best learning rate and its seeds are read
from the quality suite's cache (``benchmarks/quality.py``; run it first for that task and
algorithm). The same optimizer with ``matmul_dtype=<--dtype>`` then trains at that lr with the
same seeds (same initial weights, same batches), through the suite's own run cache, so an
interrupted run continues. Reported per pair: mean ± spread (half the range) over seeds in
each mode, the difference, and the issue-17 criteria: within the float32 seed spread, and
within 1% of the float32 mean.

Writes ``<out>/precision_parity.md`` (bfloat16) or ``<out>/precision_parity_float16.md``
(``<out>``: the quality suite's directory).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import quality  # noqa: E402
from convergence import Contender, _ours  # noqa: E402

from lightning_precond.registry import ALGORITHMS  # noqa: E402

LOW_DTYPES = ("bfloat16", "float16")


def low_precision(c: Contender, dtype: str = "bfloat16") -> Contender:
    """``c`` (one of ours) with its products in ``dtype``."""
    return Contender(f"{c.name} ({dtype})", c.algorithm, "ours", _ours(ALGORITHMS[c.name], matmul_dtype=dtype),
                     tasks=c.tasks)


def report_name(dtype: str) -> str:
    return "precision_parity.md" if dtype == "bfloat16" else f"precision_parity_{dtype}.md"


def compare(cache: quality.Cache, task: str, c: Contender, steps: int, seeds: int,
            dtype: str = "bfloat16") -> dict | None:
    """The float32 sweep from the cache (never trained here), then the ``dtype`` seeds."""
    base = quality.sweep(cache, task, c, steps=steps, seeds=seeds, rungs=5, max_extensions=4, quick=False,
                         run=False)
    if not base.complete:
        print(f"[parity] {task} {c.name}: float32 sweep not in the cache; run benchmarks/quality.py first")
        return None
    low = low_precision(c, dtype)
    records = [cache.get(low, quality.RunKey(task, low.name, base.best_lr, s, steps, False)) for s in range(seeds)]
    if any(r is None for r in records):
        return None
    f32 = [quality.final_loss(r) for r in base.seeds.values()]
    bf16 = [quality.final_loss(r) for r in records]
    mean32, mean16 = statistics.fmean(f32), statistics.fmean(bf16)
    spread32 = (max(f32) - min(f32)) / 2
    step_ms = [statistics.median(r["step_times"]) * 1e3 for r in records if r["step_times"]]
    return {"task": task, "algorithm": c.name, "lr": base.best_lr, "seeds": seeds,
            "f32": mean32, "f32_spread": spread32, "bf16": mean16, "bf16_spread": (max(bf16) - min(bf16)) / 2,
            "diff": mean16 - mean32, "within_spread": abs(mean16 - mean32) <= spread32,
            "within_1pct": abs(mean16 - mean32) <= 0.01 * abs(mean32),
            "bf16_ms": statistics.fmean(step_ms) if step_ms else None,
            "f32_ms": statistics.fmean(statistics.median(r["step_times"]) * 1e3 for r in base.seeds.values())}


def render(rows: Sequence[dict], command: str, stale: dict, dtype: str = "bfloat16") -> str:
    short = {"bfloat16": "bf16", "float16": "f16"}[dtype]
    lines = [f"# Convergence parity: matmul_dtype=\"{dtype}\" vs float32", "",
             f"Command: `{command}`. Each row: the float32 contender's best lr from the quality suite, "
             "the same seeds in both modes (mean ± half-range of the final eval loss).", ""]
    if stale:
        lines += ["Float32 runs recorded with an earlier code version: "
                  + "; ".join(f"{k} ({', '.join(sorted(v))})" for k, v in sorted(stale.items())) + ".", ""]
    lines += [f"| task | algorithm | lr | float32 | {dtype} | {short} - f32 | within f32 spread | within 1% | "
              f"ms/step f32 / {short} (this CPU) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['algorithm']} | {r['lr']:g} | {r['f32']:.4f} ± {r['f32_spread']:.4f} | "
            f"{r['bf16']:.4f} ± {r['bf16_spread']:.4f} | {r['diff']:+.4f} | {'yes' if r['within_spread'] else 'no'} | "
            f"{'yes' if r['within_1pct'] else 'no'} | {r['f32_ms']:.0f} / {r['bf16_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=quality.DEFAULT_OUT)
    ap.add_argument("--tasks", default="chargpt")
    ap.add_argument("--algorithms", default="SOAP,KLShampoo")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dtype", choices=LOW_DTYPES, default="bfloat16", help="the matmul_dtype compared with float32")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cons = {c.name: c for c in quality.suite_contenders(with_peers=False)[0]}
    wanted = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in wanted if a not in cons or a == quality.BASELINE or a == "Muon"]
    if unknown:
        raise SystemExit(f"--algorithms: {unknown} are not factored algorithms of the registry")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    steps = quality.parse_steps(None, tasks, False)
    cache = quality.Cache(args.out, float("inf"))
    rows = [row for t in tasks for a in wanted
            if (row := compare(cache, t, cons[a], steps[t], args.seeds, args.dtype))]
    command = "python benchmarks/precision_parity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = render(rows, command.strip(), cache.stale, args.dtype)
    (args.out / report_name(args.dtype)).write_text(report)
    print(report)
    return rows


if __name__ == "__main__":
    main()
