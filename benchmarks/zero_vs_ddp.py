"""Step time and bytes communicated per step: our optimizers under DDP vs DeepSpeed ZeRO 1/2/3.

Two forked gloo CPU ranks (one intra-op thread each) train an MLP (``--width``, ``--depth``)
on random data, for every backend (torch DDP; DeepSpeed ZeRO-1, -2, -3) and every optimizer
(every algorithm of ``lightning_precond.registry`` at its defaults with lr 3e-3 and, with
eigenbases, ``precondition_frequency=10``; and torch AdamW as the backend's own baseline).
Reported per backend and optimizer:

* ms/step: median over ``--steps`` measured steps (after ``--warmup``) of the wall time of
  forward + backward + optimizer step, the slower rank's;
* opt ms: the part spent inside our ``optimizer.step()`` (the client step under ZeRO);
* CPU ms, opt CPU ms: the same as CPU time of the rank's main thread (gloo communicates
  from its own threads), steadier than wall time on a shared machine;
* KB sent per step and rank by the collectives (with ring / direct algorithms, see
  :func:`_sent`; at 2 ranks an all-reduce of S bytes sends S, a reduce-scatter S/2, an
  all-gather of an S-byte input S, an all-to-all what is addressed to the other rank):
  "backend" is what DDP or DeepSpeed sends for gradients and parameters, "optimizer" what
  our router sends inside ``step()`` (gradient pieces to owners, updates back);
* state MB: the optimizer state this rank holds (``state_bytes()``).

Run ``python benchmarks/zero_vs_ddp.py`` (needs the ``deepspeed`` extra; about 2 minutes for
SOAP and AdamW, ``--optimizers SOAP AdamW``, and longer for every further optimizer).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.distributed import make_model  # noqa: E402  (the same model as DDP/FSDP)
from lightning_precond.registry import ALGORITHMS, names  # noqa: E402

BACKENDS = ("ddp", "zero1", "zero2", "zero3")
OPTIMIZERS = (*names(), "AdamW")


class Counter:
    """Payload bytes of the collectives issued, split by whether our optimizer step is running."""

    def __init__(self) -> None:
        self.in_optimizer = False
        self.backend = 0
        self.optimizer = 0

    def add(self, nbytes: int) -> None:
        if self.in_optimizer:
            self.optimizer += nbytes
        else:
            self.backend += nbytes


COUNTER = Counter()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _sent(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes the collective ``name`` makes this rank send with ring / direct algorithms
    (what must leave the rank, whatever the transport): all_reduce of S bytes 2 S (W-1)/W;
    all_gather of an S-byte input S (W-1); reduce_scatter of S bytes S (W-1)/W; reduce S
    from every rank but the destination; all_to_all the parts addressed to other ranks;
    broadcast S (W-1) from the source. Ranks are global ranks (one group of all ranks here)."""
    group = kwargs.get("group")
    world, rank = dist.get_world_size(group), dist.get_rank(group)

    def arg(position: int, *keys: str):
        for key in keys:
            if key in kwargs:
                return kwargs[key]
        return args[position] if len(args) > position else None

    if name in ("all_reduce", "all_reduce_coalesced"):
        tensors = arg(0, "tensor", "tensors")
        size = sum(_nbytes(t) for t in tensors) if isinstance(tensors, (list, tuple)) else _nbytes(tensors)
        return 2 * size * (world - 1) // world
    if name in ("all_gather_into_tensor", "_all_gather_base"):
        return _nbytes(arg(1, "input_tensor", "input")) * (world - 1)
    if name == "all_gather":
        return _nbytes(arg(1, "tensor")) * (world - 1)
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return _nbytes(arg(1, "input")) * (world - 1) // world
    if name == "reduce_scatter":
        return sum(_nbytes(t) for t in arg(1, "input_list")) * (world - 1) // world
    if name == "reduce":  # direct: every rank but the destination sends its tensor
        return 0 if arg(1, "dst") == dist.get_rank() else _nbytes(arg(0, "tensor"))
    if name == "broadcast":
        return _nbytes(arg(0, "tensor")) * (world - 1) if arg(1, "src") == dist.get_rank() else 0
    if name == "all_to_all_single":
        inp = arg(1, "input")
        splits = arg(3, "input_split_sizes")
        per_element = inp.element_size()
        if not splits:
            return _nbytes(inp) * (world - 1) // world
        return (sum(splits) - splits[rank]) * per_element
    return 0


def _patch_collectives() -> None:
    """Count every collective called through torch.distributed (before DeepSpeed binds them)."""
    import torch.distributed.distributed_c10d as c10d

    names = ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor", "_all_gather_base",
             "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single", "all_gather",
             "reduce_scatter", "all_reduce_coalesced")
    for module in (dist, c10d):
        for name in names:
            original = getattr(module, name, None)
            if original is None or getattr(original, "_counted", False):
                continue

            @functools.wraps(original)
            def counted(*args, _original=original, _name=name, **kwargs):
                COUNTER.add(_sent(_name, args, kwargs))
                return _original(*args, **kwargs)

            counted._counted = True  # type: ignore[attr-defined]
            setattr(module, name, counted)


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=3e-3)
    entry = ALGORITHMS[name]
    return entry.optimizer(groups, lr=3e-3, **({"precondition_frequency": 10} if entry.has_basis else {}))


def _count_step(opt: torch.optim.Optimizer) -> list[tuple[float, float]]:
    """Wrap ``opt.step`` (the call DeepSpeed or the loop makes) to flag and time it
    (wall seconds, and CPU seconds of the calling thread)."""
    seconds: list[tuple[float, float]] = []
    original = opt.step

    def step(*args, **kwargs):
        COUNTER.in_optimizer = True
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append((time.perf_counter() - start, time.thread_time() - cpu))
            COUNTER.in_optimizer = False

    opt.step = step  # type: ignore[method-assign]
    return seconds


def run(backend: str, name: str, rank: int, world: int, args: argparse.Namespace) -> dict:
    import deepspeed

    model = make_model(args.width, args.depth)
    opt = make_optimizer(name, model)
    per_rank = args.batch // world
    if backend == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp = torch.nn.parallel.DistributedDataParallel(model)

        # DDP's default all-reduce, but through torch.distributed.all_reduce, so it is counted.
        ddp.register_comm_hook(None, allreduce_hook)
        forward, engine = ddp, None
    else:
        config = {
            "train_micro_batch_size_per_gpu": per_rank,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": int(backend[-1])},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        forward = engine
    opt_seconds = _count_step(opt)
    gen = torch.Generator().manual_seed(rank)
    times: list[float] = []
    cpu_times: list[float] = []
    inner: list[float] = []
    inner_cpu: list[float] = []
    backend_bytes: list[int] = []
    optimizer_bytes: list[int] = []
    for step in range(args.warmup + args.steps):
        x = torch.randn(per_rank, 64, generator=gen)
        y = torch.randn(per_rank, 10, generator=gen)
        dist.barrier()
        COUNTER.backend = COUNTER.optimizer = 0
        calls = len(opt_seconds)
        start, cpu = time.perf_counter(), time.thread_time()
        loss = ((forward(x) - y) ** 2).mean()
        if engine is None:
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            engine.backward(loss)
            engine.step()
        elapsed, elapsed_cpu = time.perf_counter() - start, time.thread_time() - cpu
        if step >= args.warmup:
            times.append(elapsed)
            cpu_times.append(elapsed_cpu)
            inner.append(sum(wall for wall, _ in opt_seconds[calls:]))  # ZeRO: one call per (sub-)group
            inner_cpu.append(sum(cpu for _, cpu in opt_seconds[calls:]))
            backend_bytes.append(COUNTER.backend)
            optimizer_bytes.append(COUNTER.optimizer)
    state = opt.state_bytes() if hasattr(opt, "state_bytes") else sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "times": times,
        "opt_ms": 1e3 * statistics.median(inner),
        "cpu_ms": 1e3 * statistics.median(cpu_times),
        "opt_cpu_ms": 1e3 * statistics.median(inner_cpu),
        "backend_bytes": statistics.median(backend_bytes),
        "optimizer_bytes": statistics.median(optimizer_bytes),
        "state_bytes": state,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    _patch_collectives()
    import deepspeed

    deepspeed.init_distributed("gloo")
    assert dist.get_world_size() == world
    results = {}
    for backend in args.backends:
        for name in args.optimizers:
            results[f"{backend}/{name}"] = run(backend, name, rank, world, args)
    torch.save(results, Path(out) / f"bench{rank}.pt")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--out", default="runs/zero_vs_ddp")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_worker, args=(2, port, args, str(out)), nprocs=2, start_method="fork")
    ranks = [torch.load(out / f"bench{r}.pt", weights_only=False) for r in range(2)]
    rows = []
    lines = [
        f"MLP 64 -> {args.width} x{args.depth + 1} -> 10 ({ranks[0][next(iter(ranks[0]))]['params']:,} params), "
        f"batch {args.batch}, 2 gloo CPU ranks x 1 thread, median of {args.steps} steps after {args.warmup}",
        "",
        "| backend | optimizer | ms/step | opt ms/step | CPU ms/step | opt CPU ms/step "
        "| backend KB sent/step | optimizer KB sent/step | state MB/rank |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ranks[0]:
        backend, name = key.split("/")
        slowest = [max(a, b) for a, b in zip(ranks[0][key]["times"], ranks[1][key]["times"])]
        row = {
            "backend": backend,
            "optimizer": name,
            "ms_per_step": 1e3 * statistics.median(slowest),
            "opt_ms_per_step": max(r[key]["opt_ms"] for r in ranks),
            "cpu_ms_per_step": max(r[key]["cpu_ms"] for r in ranks),
            "opt_cpu_ms_per_step": max(r[key]["opt_cpu_ms"] for r in ranks),
            "backend_bytes": max(r[key]["backend_bytes"] for r in ranks),
            "optimizer_bytes": max(r[key]["optimizer_bytes"] for r in ranks),
            "state_bytes": max(r[key]["state_bytes"] for r in ranks),
        }
        rows.append(row)
        lines.append(
            f"| {backend} | {name} | {row['ms_per_step']:.1f} | {row['opt_ms_per_step']:.1f} | "
            f"{row['cpu_ms_per_step']:.1f} | {row['opt_cpu_ms_per_step']:.1f} | "
            f"{row['backend_bytes'] / 1024:.0f} | {row['optimizer_bytes'] / 1024:.0f} | "
            f"{row['state_bytes'] / 2**20:.2f} |"
        )
    report = "\n".join(lines)
    print(report)
    (out / "zero_vs_ddp.md").write_text(report + "\n")
    (out / "zero_vs_ddp.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
