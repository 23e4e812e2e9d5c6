"""ASGO vs Shampoo on the benchmarks' char-GPT (width 128, ``benchmarks/tasks.py``).

Usage::

    .venv/bin/python benchmarks/asgo_vs_shampoo.py --steps 150 --shampoo-lrs 3e-4 1e-3 3e-3 \\
        --asgo-lrs 3e-4 1e-3 3e-3 1e-2 --out benchmarks/results/asgo_vs_shampoo.json

Every contender (each optimizer at each lr) has its own copy of the same initial model and
sees the same batch at every step; all advance in lockstep in one process, the order rotated
every step, so machine noise hits all alike. Hidden matrices are preconditioned, embeddings,
head and vectors take AdamW (``lightning_precond.param_groups``); refresh every 10 steps.
Reported: eval loss (the task's held-out windows), ``state_bytes()``, median and mean
``optimizer.step()`` milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import build_task  # noqa: E402

import lightning_precond as lp  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--shampoo-lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--asgo-lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = build_task("chargpt", model_seed=0, data_seed=1)
    contenders = {f"Shampoo lr={lr:g}": (lp.Shampoo, lr) for lr in args.shampoo_lrs}
    contenders |= {f"ASGO lr={lr:g}": (lp.ASGO, lr) for lr in args.asgo_lrs}
    base = task.make_model()
    models = {k: copy.deepcopy(base) for k in contenders}
    opts = {k: cls(lp.param_groups(models[k]), lr=lr, precondition_frequency=10)
            for k, (cls, lr) in contenders.items()}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for step, batch in zip(range(args.steps), task.batches()):
        for k in names[step % len(names):] + names[: step % len(names)]:
            opts[k].zero_grad(set_to_none=True)
            task.loss(models[k], batch).backward()
            started = time.perf_counter()
            opts[k].step()
            times[k].append(time.perf_counter() - started)
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    results = {
        k: {"eval_loss": task.evaluate(models[k]), "state_bytes": opts[k].state_bytes(),
            "median_step_ms": 1e3 * statistics.median(times[k]), "mean_step_ms": 1e3 * statistics.mean(times[k])}
        for k in names
    }
    for k, r in results.items():
        print(f"{k:18s} eval {r['eval_loss']:.4f}  state {r['state_bytes'] / 1e6:.2f} MB "
              f"({r['state_bytes'] / weight_bytes:.2f}x weights)  step median {r['median_step_ms']:.1f} ms")
    if args.out is not None:
        args.out.write_text(json.dumps({"steps": args.steps, "weight_bytes": weight_bytes, "results": results},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
