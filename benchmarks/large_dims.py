"""State size, step time and refresh failures for large-vocabulary embeddings and hidden matrices.

The measurements behind ``max_factor_dim``'s default (README, "Large dimensions"). Each case
runs in its own process (peak memory is that process's maximum resident set), one thread:

* a matrix of the given shape, trained through an embedding lookup (``--tokens`` tokens drawn
  uniformly from the rows, so rows that never get a gradient are the common case, as in a
  language model's vocabulary) or, with ``--dense``, a dense random gradient (a hidden matrix);
* reported: ``state_bytes() / weight bytes``, the first ``step()``'s seconds, the slowest of
  the following ``--steps - 1`` steps (a refresh step), peak RSS, refresh failures and the
  number of warnings raised.

Examples (the numbers in the README came from these)::

    python benchmarks/large_dims.py --shape 50000 64 --optimizer SOAP KLShampoo Shampoo
    python benchmarks/large_dims.py --shape 50257 768 --optimizer SOAP --option max_factor_dim=None
    python benchmarks/large_dims.py --shape 4096 4096 --dense --optimizer SOAP --steps 3

``--option name=value`` passes an optimizer option (Python literal; ``None`` allowed), so the
same command measures any commit (options it does not know are refused by that commit).

``--plan-table`` instead prints, for the matrix shapes of common language models and a few
``max_factor_dim`` values, the optimizer-state bytes over the weight bytes that the block
plan implies (exact: the engine's own ``plan_blocks`` and ``state_shapes``, nothing
allocated, so 8192 x 28672 costs nothing to measure)::

    python benchmarks/large_dims.py --plan-table
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import resource
import subprocess
import sys
import time
import warnings

import torch


def run_case(name: str, rows: int, cols: int, dense: bool, tokens: int, steps: int, options: dict) -> dict:
    import lightning_precond as lp
    from lightning_precond.registry import ALGORITHMS

    torch.set_num_threads(1)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(rows, cols) * 0.02)
    opt = ALGORITHMS[name].optimizer([weight], **options)
    gen = torch.Generator().manual_seed(1)
    times: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            if dense:
                weight.grad = torch.randn(rows, cols, generator=gen) * 1e-2
            else:
                index = torch.randint(0, rows, (tokens,), generator=gen)
                target = torch.randn(tokens, cols, generator=gen)
                weight.grad = None
                loss = ((torch.nn.functional.embedding(index, weight) - target) ** 2).mean()
                loss.backward()
            started = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - started)
    stats = opt.preconditioner_stats()
    return {
        "optimizer": name,
        "shape": [rows, cols],
        "gradient": "dense" if dense else f"embedding lookup of {tokens} tokens",
        "options": {k: repr(v) for k, v in options.items()},
        "lightning_precond": lp.__file__,
        "state_over_weight": opt.state_bytes() / (weight.numel() * weight.element_size()),
        "first_step_s": times[0],
        "slowest_later_step_s": max(times[1:]) if len(times) > 1 else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "factors": len(stats),
        "refresh_failures": sum(s.failure_count for s in stats),
        "warnings": len(caught),
        "first_warning": str(caught[0].message)[:160] if caught else None,
    }


# (name, rows, cols): matrices of language models (hidden, MLP, embedding / head).
LM_SHAPES = [
    ("GPT-2 small attention", 768, 768), ("GPT-2 small MLP", 768, 3072),
    ("Llama-2-7B MLP", 4096, 11008), ("Llama-3-8B MLP", 4096, 14336), ("4096-wide 4x MLP", 4096, 16384),
    ("Llama-3-70B MLP", 8192, 28672), ("8192-wide 4x MLP", 8192, 32768),
    ("BERT embedding", 30522, 768), ("Llama-2 embedding", 32000, 4096), ("GPT-2 embedding / tied head", 50257, 768),
    ("issue 15: Embedding(50000, 64)", 50000, 64), ("Llama-3 embedding", 128256, 4096),
]


def plan_table(thresholds: list[int | None], optimizers: list[str]) -> None:
    """State bytes / weight bytes implied by the block plan (float32 state, one process)."""
    from lightning_precond.blocks import PlanLimits, plan_blocks
    from lightning_precond.registry import ALGORITHMS

    header = " | ".join(f"max_factor_dim={t}" for t in thresholds)
    for name in optimizers:
        probe = ALGORITHMS[name].optimizer([torch.nn.Parameter(torch.zeros(2, 2))])
        algorithm, config = probe.algorithm, probe._config(0)
        print(f"\n{name}: state bytes / weight bytes (max_preconditioner_dim=1024)\n")
        print(f"| matrix | shape | {header} |\n|---|---|" + "---|" * len(thresholds))
        for label, rows, cols in LM_SHAPES:
            cells = []
            for threshold in thresholds:
                plan = plan_blocks([(rows, cols)], [0], PlanLimits(1024, threshold))
                numel = 0
                for block in plan.blocks:
                    shapes = algorithm.state_shapes(*block.shape, config, block.factored(algorithm.sides))
                    numel += sum(math.prod(shape) for shape in shapes.values())
                sides = {block.identity for block in plan.blocks}
                mark = "" if sides == {()} else f" (identity: {', '.join(s for ident in sides for s in ident)})"
                cells.append(f"{numel / (rows * cols):.2f}{mark}")
            print(f"| {label} | {rows} x {cols} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[50000, 64])
    parser.add_argument("--optimizer", nargs="+", default=["SOAP", "KLShampoo", "Shampoo"])
    parser.add_argument("--dense", action="store_true", help="dense random gradients (a hidden matrix)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step of the embedding lookup")
    parser.add_argument("--steps", type=int, default=11, help="steps (the default refreshes once, at step 10/11)")
    parser.add_argument("--option", action="append", default=[], help="name=value (a Python literal)")
    parser.add_argument("--plan-table", action="store_true", help="state implied by the plan for LM shapes")
    parser.add_argument("--thresholds", default="8192,16384,30000,None", help="max_factor_dim values of the table")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, JSON on stdout
    args = parser.parse_args()
    if args.plan_table:
        plan_table([ast.literal_eval(t) for t in args.thresholds.split(",")], args.optimizer)
        return
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = ast.literal_eval(value)
    if args.case:
        print(json.dumps(run_case(args.case, *args.shape, args.dense, args.tokens, args.steps, options)))
        return
    for name in args.optimizer:
        command = [sys.executable, __file__, "--case", name, "--shape", *map(str, args.shape),
                   "--tokens", str(args.tokens), "--steps", str(args.steps)]
        command += ["--dense"] if args.dense else []
        for item in args.option:
            command += ["--option", item]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}")
            continue
        print(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
