"""Roofline: each optimizer's step against the matmuls it cannot avoid, in the same run.

Usage
-----
::

    .venv/bin/python benchmarks/roofline.py                       # blocks 512x512, 1024x256, 256x1024, 1024x1024
    .venv/bin/python benchmarks/roofline.py --device cuda         # the same code path on a GPU
    .venv/bin/python benchmarks/roofline.py --quick --out /tmp/r  # small blocks, few rounds (CI)

What is measured (one process, ``--threads`` intra-op threads, default 1)
--------------------------------------------------------------------------
* **Optimizer step vs essential matmuls.** For every registered algorithm, one parameter per
  block shape (``--shapes``) with a fixed random gradient; after ``--warmup`` steps the
  optimizer's ``step()`` and the algorithm's *essential matmuls* on the same shapes alternate
  for ``--rounds`` rounds of ``--steps`` calls each, so machine noise hits both alike. The
  ratio step / essentials is how far the step is from the roofline of its own work:
  1.0 would mean the step is nothing but those products. The essential matmuls per block and
  step (``ESSENTIALS``), refreshes excluded (they are amortized over
  ``precondition_frequency`` steps; ``--refresh-every`` sets it for every optimizer):

  =========================== ==========================================================
  SOAP, KL-SOAP, EC-Shampoo   ``G G^T``, ``G^T G``, two projections into the basis, two out
  KL-Shampoo                  the two one-sided projections, the two weighted statistics
                              products, two projections in, two out
  Shampoo                     ``G G^T``, ``G^T G``, ``L^-p G``, ``(.) R^-p``
  Muon                        5 Newton-Schulz iterations of 3 products on the short side
  ASGO and one-sided presets  ``G G^T``, ``V^-1/2 G`` and (``eigenvalues="current"``, the
                              default) ``V Q`` for ``diag(Q^T V Q)``, on the preconditioned side
  =========================== ==========================================================

  Both are timed in float32 and (``--low-precision``, default bfloat16) the essentials also in
  the low-precision dtype: the roofline a low-precision mode could reach.
* **Peers** (``--peers``, default on when installed): pytorch-optimizer's SOAP and
  ScalableShampoo, heavyball's SOAP, KLShampoo and KLSOAP (eager), pytorch-optimizer's Muon,
  on the same blocks, interleaved with ours; ratio ours / peer for the same algorithm.

Writes ``<out>/roofline.md`` and ``<out>/roofline.json`` (``<out>`` defaults to
``benchmarks/results/roofline``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from lightning_precond.registry import ALGORITHMS  # noqa: E402

DEFAULT_OUT = _HERE / "results" / "roofline"
DEFAULT_SHAPES = ((512, 512), (1024, 256), (256, 1024), (1024, 1024))
QUICK_SHAPES = ((64, 64), (128, 32))
Shape = tuple[int, int]
Matmuls = Callable[[], None]


# --------------------------------------------------------------------------- essentials
def _essentials(name: str, shapes: Sequence[Shape], dtype: torch.dtype, device: torch.device) -> Matmuls:
    """The products one step of ``name`` needs per block, as one callable over all blocks
    (operands allocated once; values are irrelevant to the time)."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    calls: list[Matmuls] = []
    for m, n in shapes:
        g, ql, qr_, u = rand(m, n), rand(m, m), rand(n, n), rand(m, n)
        if name in ("SOAP", "KLSOAP", "EigenvalueCorrectedShampoo"):
            calls.append(lambda g=g, ql=ql, qr_=qr_, u=u: (g @ g.mT, g.mT @ g, ql.mT @ g @ qr_, ql @ u @ qr_.mT))
        elif name == "KLShampoo":
            # G Q_b, Q_a^T G (one-sided projections), (G Q_b) D (G Q_b)^T, (Q_a^T G)^T D (Q_a^T G)
            # (weighted statistics), the momentum in (2) and out (2) of the basis.
            calls.append(lambda g=g, ql=ql, qr_=qr_, u=u: (
                (gq := g @ qr_) @ gq.mT, (qg := ql.mT @ g).mT @ qg, ql.mT @ u @ qr_, ql @ u @ qr_.mT))
        elif name == "Shampoo":
            calls.append(lambda g=g, ql=ql, qr_=qr_: (g @ g.mT, g.mT @ g, ql @ g @ qr_))
        elif name == "Muon":
            x = g if m <= n else g.mT

            def newton_schulz(x: torch.Tensor = x) -> None:
                for _ in range(5):
                    a = x @ x.mT
                    b = a + a @ a
                    x = x + b @ x

            calls.append(newton_schulz)
        else:  # one-sided: the smaller side's statistics, this step's eigenvalues, the application
            x = g if m <= n else g.mT
            v, q = rand(min(m, n), min(m, n)), rand(min(m, n), min(m, n))
            calls.append(lambda x=x, v=v, q=q: (x @ x.mT, v @ q, v @ x))

    def run() -> None:
        for call in calls:
            call()

    return run


def essential_flops(name: str, shapes: Sequence[Shape]) -> float:
    """Multiply-adds x 2 of :func:`_essentials` (for GFLOP/s in the report)."""
    total = 0.0
    for m, n in shapes:
        if name in ("SOAP", "KLSOAP", "EigenvalueCorrectedShampoo"):
            total += (m * m * n + n * n * m) + 2 * (m * m * n + m * n * n)
        elif name == "KLShampoo":
            total += (m * n * n + m * m * n) + (m * m * n + n * n * m) + 2 * (m * m * n + m * n * n)
        elif name == "Shampoo":
            total += (m * m * n + n * n * m) + (m * m * n + m * n * n)
        elif name == "Muon":
            s, l_ = min(m, n), max(m, n)
            total += 5 * (s * s * l_ + s * s * s + s * s * l_)
        else:
            s, l_ = min(m, n), max(m, n)
            total += 2 * s * s * l_ + s**3
    return 2.0 * total


# --------------------------------------------------------------------------- contenders
@dataclass
class Timed:
    label: str
    algorithm: str
    call: Matmuls


def _params(shapes: Sequence[Shape], device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for m, n in shapes:
        p = torch.nn.Parameter(torch.randn(m, n, generator=gen).to(device) * 0.02)
        p.grad = torch.randn(m, n, generator=gen).to(device) * 1e-2
        params.append(p)
    return params


def _stepper(opt: torch.optim.Optimizer) -> Matmuls:
    """``opt.step()`` with every gradient in place first (some optimizers clear ``.grad``)."""
    pairs = [(p, p.grad) for group in opt.param_groups for p in group["params"]]

    def step() -> None:
        for p, g in pairs:
            p.grad = g
        opt.step()

    return step


def ours(name: str, shapes: Sequence[Shape], device: torch.device, refresh_every: int,
         matmul_dtype: str | None = None) -> Timed:
    """Our optimizer on the blocks; ``matmul_dtype``: its low-precision mode."""
    entry = ALGORITHMS[name]
    kwargs: dict[str, Any] = {"lr": 1e-4, "max_preconditioner_dim": 1024, "weight_decay": 0.0}
    if entry.has_basis:
        kwargs["precondition_frequency"] = refresh_every
    if "start_preconditioning_step" in inspect.signature(entry.optimizer).parameters:
        # Precondition from the first step (pytorch-optimizer's ScalableShampoo below too):
        # the timed steps must be preconditioned ones, whatever --warmup is.
        kwargs["start_preconditioning_step"] = 1
    if matmul_dtype is not None:
        kwargs["matmul_dtype"] = matmul_dtype
    opt = entry.optimizer(_params(shapes, device), **kwargs)
    return Timed(name if matmul_dtype is None else f"{name} matmul_dtype={matmul_dtype}", name, _stepper(opt))


def has_matmul_dtype(name: str) -> bool:
    return "matmul_dtype" in inspect.signature(ALGORITHMS[name].optimizer).parameters


def peers(shapes: Sequence[Shape], device: torch.device, refresh_every: int) -> tuple[list[Timed], dict[str, str]]:
    out: list[Timed] = []
    missing: dict[str, str] = {}
    try:
        import pytorch_optimizer as po

        out.append(Timed("SOAP (pytorch-optimizer)", "SOAP", _stepper(po.SOAP(
            _params(shapes, device), lr=1e-4, weight_decay=0.0, precondition_frequency=refresh_every,
            max_precond_dim=1024))))
        out.append(Timed("Muon (pytorch-optimizer)", "Muon", _stepper(po.Muon(
            [{"params": _params(shapes, device), "use_muon": True}], lr=1e-4, use_adjusted_lr=True))))
        out.append(Timed("Shampoo (pytorch-optimizer ScalableShampoo)", "Shampoo", _stepper(po.ScalableShampoo(
            _params(shapes, device), lr=1e-4, start_preconditioning_step=1, preconditioning_compute_steps=refresh_every,
            block_size=1024))))
    except Exception as exc:  # noqa: BLE001 - recorded in the report
        missing["pytorch-optimizer"] = f"{type(exc).__name__}: {exc}"
    try:
        import heavyball

        heavyball.utils.compile_mode = None  # eager, as the convergence benchmarks run it
        for cls, algorithm in ((heavyball.SOAP, "SOAP"), (heavyball.KLShampoo, "KLShampoo"),
                               (heavyball.KLSOAP, "KLSOAP")):
            out.append(Timed(f"{algorithm} (heavyball)", algorithm, _stepper(cls(
                _params(shapes, device), lr=1e-4, weight_decay=0.0, precondition_frequency=refresh_every,
                use_precond_schedule=False, max_precond_dim=1024, split=True))))
    except Exception as exc:  # noqa: BLE001
        missing["heavyball"] = f"{type(exc).__name__}: {exc}"
    return out, missing


# --------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(items: Sequence[Timed], rounds: int, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median over rounds of the mean seconds per call, the items rotated every round."""
    for item in items:
        for _ in range(warmup):
            item.call()
    _sync(device)
    samples: dict[str, list[float]] = {item.label: [] for item in items}
    for r in range(rounds):
        for k in range(len(items)):
            item = items[(r + k) % len(items)]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                item.call()
            _sync(device)
            samples[item.label].append((time.perf_counter() - t0) / steps)
    return {label: statistics.median(v) for label, v in samples.items()}


# --------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else tuple(args.shapes)
    low = getattr(torch, args.low_precision)
    names = [n for n in ALGORITHMS if not args.algorithms or n in args.algorithms]
    rows = []
    for name in names:
        items = [ours(name, shapes, device, args.refresh_every),
                 Timed(f"{name} essentials float32", name, _essentials(name, shapes, torch.float32, device)),
                 Timed(f"{name} essentials {args.low_precision}", name, _essentials(name, shapes, low, device))]
        low_step = has_matmul_dtype(name)
        if low_step:  # the optimizer's own low-precision mode (matmul_dtype)
            items.append(ours(name, shapes, device, args.refresh_every, matmul_dtype=args.low_precision))
        times = interleave(items, args.rounds, args.steps, args.warmup, device)
        step, f32, lp = (times[i.label] for i in items[:3])
        step_low = times[items[3].label] if low_step else None
        flops = essential_flops(name, shapes)
        rows.append({"algorithm": name, "step_ms": step * 1e3, "essentials_f32_ms": f32 * 1e3,
                     "essentials_low_ms": lp * 1e3, "ratio_f32": step / f32, "ratio_low": step / lp,
                     "step_low_ms": None if step_low is None else step_low * 1e3,
                     "low_over_f32_step": None if step_low is None else step_low / step,
                     "low_step_over_low_essentials": None if step_low is None else step_low / lp,
                     "gflops_f32": flops / f32 / 1e9, "gflops_low": flops / lp / 1e9})
        print(f"[roofline] {name}: step {step * 1e3:.1f} ms = {step / f32:.2f}x its float32 matmuls "
              f"({f32 * 1e3:.1f} ms), {step / lp:.2f}x its {args.low_precision} matmuls"
              + (f"; matmul_dtype={args.low_precision}: {step_low * 1e3:.1f} ms ({step_low / step:.2f}x)"
                 if step_low is not None else ""), flush=True)
    peer_rows, missing = [], {}
    if args.peers:
        their, missing = peers(shapes, device, args.refresh_every)
        for peer in their:
            if peer.algorithm not in names:
                continue
            mine = ours(peer.algorithm, shapes, device, args.refresh_every)
            try:
                times = interleave([mine, peer], args.rounds, args.steps, args.warmup, device)
            except Exception as exc:  # noqa: BLE001 - a peer failing is a row, not a crash
                peer_rows.append({"peer": peer.label, "algorithm": peer.algorithm, "error": f"{type(exc).__name__}: {exc}"})
                continue
            peer_rows.append({"peer": peer.label, "algorithm": peer.algorithm, "ours_ms": times[mine.label] * 1e3,
                              "peer_ms": times[peer.label] * 1e3, "ratio": times[mine.label] / times[peer.label]})
            print(f"[roofline] {peer.algorithm}: ours / {peer.label} = {peer_rows[-1]['ratio']:.2f}", flush=True)
    return {"shapes": [list(s) for s in shapes], "device": str(device), "threads": torch.get_num_threads(),
            "low_precision": args.low_precision, "refresh_every": args.refresh_every, "rounds": args.rounds,
            "steps": args.steps, "rows": rows, "peers": peer_rows, "unavailable": missing,
            "torch": torch.__version__, "platform": platform.platform(),
            "command": "python benchmarks/roofline.py " + " ".join(args.argv)}


def render(result: dict[str, Any]) -> str:
    low = result["low_precision"]
    lines = ["# Roofline: optimizer step vs its essential matmuls", "",
             f"Command: `{result['command']}`; device {result['device']}, {result['threads']} thread(s), "
             f"blocks {', '.join('x'.join(map(str, s)) for s in result['shapes'])}, "
             f"refresh every {result['refresh_every']} steps (amortized in the step), medians of "
             f"{result['rounds']} interleaved rounds of {result['steps']} calls; torch {result['torch']}.", "",
             f"| algorithm | step ms | essentials float32 ms | step / float32 essentials | essentials {low} ms | "
             f"step, matmul_dtype={low}, ms | its ratio to the float32 step | its ratio to the {low} essentials | "
             f"float32 GFLOP/s | {low} GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def opt(x: Any, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    for r in result["rows"]:
        lines.append(f"| {r['algorithm']} | {r['step_ms']:.1f} | {r['essentials_f32_ms']:.1f} | {r['ratio_f32']:.2f} | "
                     f"{r['essentials_low_ms']:.1f} | {opt(r['step_low_ms'], '.1f')} | {opt(r['low_over_f32_step'], '.2f')} | "
                     f"{opt(r['low_step_over_low_essentials'], '.2f')} | {r['gflops_f32']:.0f} | {r['gflops_low']:.0f} |")
    if result["peers"]:
        lines += ["", "## Ours vs peers, same blocks, interleaved", "",
                  "| algorithm | peer | ours ms | peer ms | ours / peer |", "|---|---|---|---|---|"]
        for p in result["peers"]:
            if "error" in p:
                lines.append(f"| {p['algorithm']} | {p['peer']} | — | — | failed: {p['error'][:80]} |")
            else:
                lines.append(f"| {p['algorithm']} | {p['peer']} | {p['ours_ms']:.1f} | {p['peer_ms']:.1f} | {p['ratio']:.2f} |")
    if result["unavailable"]:
        lines += ["", "Unavailable: " + "; ".join(f"{k}: {v}" for k, v in result["unavailable"].items())]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def shape(text: str) -> Shape:
        m, sep, n = text.partition("x")
        if not sep or not m.isdigit() or not n.isdigit():
            raise argparse.ArgumentTypeError(f"a shape is MxN, got {text!r}")
        return int(m), int(n)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--shapes", type=shape, nargs="+", default=list(DEFAULT_SHAPES), help="block shapes MxN")
    ap.add_argument("--algorithms", nargs="*", default=None, help=f"subset of {', '.join(ALGORITHMS)}")
    ap.add_argument("--low-precision", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--refresh-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-peers", dest="peers", action="store_false")
    ap.add_argument("--quick", action="store_true", help="small blocks, 2 rounds of 2 calls")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    unknown = sorted(set(args.algorithms or ()) - set(ALGORITHMS))
    if unknown:
        ap.error(f"--algorithms: unknown {unknown}; choose from {', '.join(ALGORITHMS)}")
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 2, 1
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "roofline.json").write_text(json.dumps(result, indent=1))
    report = render(result)
    (args.out / "roofline.md").write_text(report)
    print(report)
    return result


if __name__ == "__main__":
    main()
