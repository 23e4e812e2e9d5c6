"""Checkpoint cost per rank at world sizes 1, 2, 4: state held, peak RSS growth during save
and load, seconds, bytes on disk (SOAP, bias-free Linear(1024, 1024) layers, gloo on CPU).

Paths:
  ddp_full   DDP, every rank calls opt.state_dict(), rank 0 torch.saves it (Accelerate's way);
             loaded by torch.load + load_state_dict on every rank (Lightning DDP's way)
  ddp_dcp    DDP, get_optimizer_state_dict + dcp.save; dcp.load into a fresh optimizer's template
  fsdp2_dcp  FSDP2 (fully_shard), the same DCP idiom
  zero2      DeepSpeed ZeRO-2, engine.save_checkpoint / engine.load_checkpoint

    python benchmarks/checkpoint.py --out benchmarks/results/checkpoint            # ~10 min
    python benchmarks/checkpoint.py --quick --out /tmp/checkpoint                 # seconds

Growth is the rank's peak resident memory during the operation minus its resident memory
just before it (sampled every 2 ms by a thread), so it counts every temporary copy,
collective buffer and pickled object. Every row's figures are the worst rank's; for saves
also the worst rank other than 0 (rank 0 writes full checkpoints, so it holds what it writes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning_precond as lp  # noqa: E402

MIB = 2**20
PATHS = ("ddp_full", "ddp_dcp", "fsdp2_dcp", "zero2")


class PeakRSS:
    """Peak resident set size while the block runs, minus the RSS at its start (bytes)."""

    def __enter__(self) -> PeakRSS:
        self.start = _rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.began = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.began
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.growth = self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def _train(model: torch.nn.Module, step: "callable", width: int, steps: int = 2) -> None:
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(16, width, generator=gen)
        loss = model(x).square().mean()
        step(loss)


def _disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _ds_config() -> dict:
    return {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "gradient_clipping": 0.0}


def _build(path: str, layers: int, width: int, world: int):
    """(model, optimizer, step(loss), save(dir), load(dir)) for one path."""
    model = _model(layers, width)
    if path == "zero2":
        import deepspeed

        os.environ["LOCAL_WORLD_SIZE"] = str(world)
        deepspeed.init_distributed("gloo")  # reuses the gloo group the worker created
        opt = lp.SOAP(model.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config())

        def step(loss):
            engine.backward(loss)
            engine.step()

        return engine, opt, step, lambda d: engine.save_checkpoint(str(d), tag="t"), \
            lambda d: engine.load_checkpoint(str(d), tag="t")
    if path == "fsdp2_dcp" and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    opt = lp.SOAP(model.parameters(), lr=1e-3)

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    if path == "ddp_full":
        def save(d):
            state = opt.state_dict()
            if dist.get_rank() == 0 if dist.is_initialized() else True:
                torch.save(state, d / "optimizer.pt")

        def load(d):
            opt.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))

        return model, opt, step, save, load

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def save(d):
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(d / "dcp"))

    def load(d):
        state = {"optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(d / "dcp"))
        set_optimizer_state_dict(model, opt, state["optim"])

    return model, opt, step, save, load


def _worker(rank: int, world: int, port: int, path: str, layers: int, width: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        directory = Path(out) / "ckpt"
        directory.mkdir(exist_ok=True)
        model, opt, step, save, load = _build(path, layers, width, world)
        _train(model, step, width)
        held = opt.state_bytes()
        dist.barrier()
        with PeakRSS() as saving:
            save(directory)
        dist.barrier()
        model2, opt2, step2, _, load2 = _build(path, layers, width, world)
        _train(model2, step2, width, steps=1)  # a used optimizer (DeepSpeed loads into one)
        dist.barrier()
        with PeakRSS() as loading:
            load2(directory)
        dist.barrier()
        result = {"held": held, "save_growth": saving.growth, "save_seconds": saving.seconds,
                  "load_growth": loading.growth, "load_seconds": loading.seconds}
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(path: str, world: int, layers: int, width: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.start_processes(
            _worker, args=(world, _free_port(), path, layers, width, out), nprocs=world, start_method="fork")
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]
        disk = _disk(Path(out) / "ckpt")
    worst = {key: max(r[key] for r in ranks) for key in ranks[0]}
    # Rank 0 writes a full checkpoint, so it also holds what it writes; the others must not.
    worst["save_growth_others"] = max((r["save_growth"] for r in ranks[1:]), default=0)
    worst["disk"] = disk
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny layers, world sizes 1 and 2")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--label", default="after", help="a name for this code version in the csv")
    args = parser.parse_args()
    width, layers, worlds = (64, 2, (1, 2)) if args.quick else (1024, args.layers, (1, 2, 4))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.paths.split(","):
        for world in worlds:
            m = measure(path, world, layers, width)
            row = {"label": args.label, "path": path, "world": world, "layers": layers, "width": width,
                   "held_MiB": m["held"] / MIB, "save_growth_MiB": m["save_growth"] / MIB,
                   "save_growth_other_ranks_MiB": m["save_growth_others"] / MIB,
                   "save_s": m["save_seconds"], "load_growth_MiB": m["load_growth"] / MIB,
                   "load_s": m["load_seconds"], "disk_MiB": m["disk"] / MIB}
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    target = args.out / f"checkpoint_{args.label}.csv"
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
