"""DeepSpeed ZeRO-2 checkpoints resharded 4 -> 2 -> 1 -> 4 ranks: each rank's file holds only
its blocks (disk 1x the state), and ``engine.load_checkpoint(load_optimizer_states=False)`` +
:func:`lightning_precond.checkpoints.load_shards` resumes at another world size, continuing
bitwise like one uninterrupted process.

The loss is bilinear in integer data (``sum y^T (W x + b)`` per layer, one layer's data
independent of the others' weights), so every gradient is a dyadic rational that any
summation order of ZeRO's reduction gives exactly: the chain is comparable bit for bit with
one process although DeepSpeed, not the test, reduces the gradients.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from integration_tests.launch import case_results, launch_cases, running, save_case
from integration_tests.test_ddp import single_thread
from lightning_precond.registry import ALGORITHMS

PHASES = ((4, 3), (2, 3), (1, 3), (4, 3))
BATCH = 32
SHAPES = ((23, 16), (23, 23), (7, 23))
ALGORITHM_NAMES = ("SOAP", "KLShampoo")


class Bilinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(n, m) for m, n in SHAPES)

    def forward(self, step: torch.Tensor, rank: int = 0, world: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 + int(step))
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = torch.zeros(())
        for layer, (m, n) in zip(self.layers, SHAPES):
            x = torch.randint(-2, 3, (BATCH, n), generator=gen).float()[part]
            y = torch.randint(-2, 3, (BATCH, m), generator=gen).float()[part]
            loss = loss + (y * layer(x)).sum() / (BATCH // world)
        return loss


def _build(name: str, model: torch.nn.Module):
    return ALGORITHMS[name].build(model.parameters(), checkpoint_timeout=20.0)


def _first(phase: int) -> int:
    return sum(steps for _, steps in PHASES[:phase])


def _worker(rank: int, world: int, phase: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import deepspeed

    from lightning_precond.checkpoints import deepspeed_shards, load_shards

    deepspeed.init_distributed("gloo")
    for name in ALGORITHM_NAMES:
        with running(f"{name} phase {phase}"):
            model = Bilinear()
            opt = _build(name, model)
            config = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                      "steps_per_print": 10**9, "gradient_clipping": 0.0}
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            previous = Path(out) / f"{name}.{phase - 1}"
            if phase > 0:
                engine.load_checkpoint(str(previous), tag="t", load_optimizer_states=False,
                                       load_lr_scheduler_states=False)
                load_shards(opt, deepspeed_shards(previous, "t"))
            first = _first(phase)
            for step in range(first, first + PHASES[phase][1]):
                engine.backward(engine(torch.tensor(step), rank, world))
                engine.step()
            engine.save_checkpoint(str(Path(out) / f"{name}.{phase}"), tag="t")
            files = sorted((Path(out) / f"{name}.{phase}" / "t").glob("*optim_states.pt"))
            params = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
            owned = {b.id for bucket in opt._buckets for b in bucket.blocks}
        save_case(out, f"{name}.{phase}", rank, {"params": params, "owned": owned, "files": len(files)})


def _reference(name: str) -> torch.Tensor:
    model = Bilinear()
    opt = _build(name, model)
    with single_thread():
        for step in range(_first(len(PHASES))):
            opt.zero_grad()
            model(torch.tensor(step)).backward()
            opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_reshard")
    failures = [launch_cases(_worker, world, phase, str(out)) for phase, (world, _) in enumerate(PHASES)]
    return out, failures


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_zero2_checkpoints_reshard_4_2_1_4(name, chain):
    out, failures = chain
    for phase, (world, _) in enumerate(PHASES):
        ranks = case_results(out, f"{name}.{phase}", world, failures[phase])
        assert all(r["files"] == world for r in ranks)
        # Each rank's file holds only its blocks: the files' block entries are disjoint.
        from lightning_precond.checkpoints import deepspeed_shards

        shards = list(deepspeed_shards(out / f"{name}.{phase}", "t"))
        blocks = [{(i, k) for i, e in s["state"].items() for k in e if k.startswith("block")} for s in shards]
        assert sum(map(len, blocks)) == len(set().union(*blocks)) == len(SHAPES)
    expected = _reference(name)
    for rank, result in enumerate(case_results(out, f"{name}.{len(PHASES) - 1}", 4, failures[-1])):
        rel = (torch.linalg.norm(result["params"] - expected) / torch.linalg.norm(expected)).item()
        print(f"ZeRO-2 {name} rank {rank}: relative parameter difference after 4->2->1->4: {rel:.2e}")
        assert torch.equal(result["params"], expected), f"{name}: {rel:.2e}"
