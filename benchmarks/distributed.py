"""Distributed cost of block ownership: step time at 1 and 2 processes (DDP), FSDP2 and
FSDP1 at 2, bytes our optimizer communicates per step, and per-rank optimizer-state bytes.

    .venv/bin/python benchmarks/distributed.py [--steps 30] [--algorithm SOAP] [--quick]

``--algorithm``: any algorithm of ``lightning_precond.registry`` (each at its defaults,
lr 1e-3), or AdamW, the baseline: what each backend costs without us.

Ranks are forked gloo CPU processes with one thread each (this machine has 2 cores, so
2 ranks use both). Step time = forward + backward + optimizer step, median over the timed
steps after warm-up. Optimizer step CPU ms = the process CPU time of ``opt.step()`` alone
(its gloo threads included, waits for other ranks not), median, the slowest rank: less
sensitive than wall time to other load on the machine. Bytes are what the optimizer's router sends and receives on rank 0
(DDP: the all-gather of packed updates; FSDP: the all-to-all of gradient pieces to owners
and of update pieces back); the backend's own gradient all-reduce / reduce-scatter is not
counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from integration_tests.launch import launch  # noqa: E402
from lightning_precond.registry import ALGORITHMS as REGISTERED  # noqa: E402
from lightning_precond.registry import names  # noqa: E402

ALGORITHMS: dict[str, type[torch.optim.Optimizer]] = {
    **{name: REGISTERED[name].optimizer for name in names()},
    "AdamW": torch.optim.AdamW,  # the baseline: what each backend costs without us
}


def make_model(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(64, width), torch.nn.GELU()]
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


def _worker(rank: int, world: int, backend: str, name: str, cfg: dict, out: str) -> None:
    model = make_model(cfg["width"], cfg["depth"])
    kwargs = {}
    if backend == "ddp":
        net = DistributedDataParallel(model) if world > 1 else model
    elif backend == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
    else:  # fsdp1
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        net = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True,
                   auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}))
        if name != "AdamW":
            kwargs["distributed"] = net
    opt = ALGORITHMS[name](net.parameters(), lr=1e-3, **kwargs)
    gen = torch.Generator().manual_seed(rank)
    batch = cfg["batch"] // world
    times, step_cpu = [], []
    for step in range(cfg["warmup"] + cfg["steps"]):
        x = torch.randn(batch, 64, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        torch.distributed.barrier()
        start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        cpu = time.process_time()
        opt.step()
        if step >= cfg["warmup"]:
            step_cpu.append(time.process_time() - cpu)
            times.append(time.perf_counter() - start)
    result = {
        "median_ms": 1000 * statistics.median(times),
        "step_cpu_ms": 1000 * statistics.median(step_cpu),
        "comm_bytes": getattr(getattr(opt, "_router", None), "bytes_last_step", 0),
        "state_bytes": opt.state_bytes() if hasattr(opt, "state_bytes") else sum(
            t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
            if isinstance(t, torch.Tensor) and type(t).__name__ != "DTensor") + sum(
            t.to_local().numel() * t.element_size() for st in opt.state.values() for t in st.values()
            if type(t).__name__ == "DTensor"),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    torch.save(result, Path(out) / f"{backend}{world}_rank{rank}.pt")


def run(cfg: dict, name: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for backend, world in (("ddp", 1), ("ddp", 2), ("fsdp2", 2), ("fsdp1", 2)):
            launch(_worker, world, backend, name, cfg, out)
            per_rank = [torch.load(Path(out) / f"{backend}{world}_rank{r}.pt") for r in range(world)]
            rows.append({
                "backend": backend, "world_size": world,
                "step_ms": max(r["median_ms"] for r in per_rank),
                "optimizer_cpu_ms": max(r["step_cpu_ms"] for r in per_rank),
                "comm_bytes_per_step": per_rank[0]["comm_bytes"],
                "state_bytes_per_rank": max(r["state_bytes"] for r in per_rank),
                "param_bytes": per_rank[0]["param_bytes"],
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", default="SOAP", choices=[*ALGORITHMS, "all"],
                        help="one of them, or all (every registered algorithm, then AdamW)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    cfg = {"width": 256, "depth": 6, "batch": 256, "warmup": 5, "steps": args.steps}
    if args.quick:
        cfg.update(width=32, depth=2, batch=16, warmup=1, steps=2)
    for name in ALGORITHMS if args.algorithm == "all" else [args.algorithm]:
        report(name, cfg, run(cfg, name), Path(args.out))


def report(name: str, cfg: dict, rows: list[dict], out: Path) -> None:
    base = rows[0]
    lines = [
        f"## {name}: MLP 64-{cfg['width']}x{cfg['depth']}-10, global batch {cfg['batch']}, "
        f"{cfg['steps']} timed steps, 1 thread per rank",
        "",
        "| backend | ranks | step ms | vs 1 process | optimizer step CPU ms | optimizer bytes/step (rank 0) "
        "| state bytes/rank | vs 1 process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['world_size']} | {r['step_ms']:.1f} | {r['step_ms'] / base['step_ms']:.2f} | "
            f"{r['optimizer_cpu_ms']:.1f} | "
            f"{r['comm_bytes_per_step']:,} | {r['state_bytes_per_rank']:,} | "
            f"{r['state_bytes_per_rank'] / base['state_bytes_per_rank']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"distributed_{name}.md").write_text(text + "\n")
    (out / f"distributed_{name}.json").write_text(json.dumps({"config": cfg, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
