"""FSDP2 (fully_shard) and FSDP1 (use_orig_params=True): the same block owners as DDP, so
2 sharded gloo ranks equal one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lightning_precond as lp
from integration_tests.launch import launch
from integration_tests.test_ddp import BATCH, batch, flat_params, single_thread, train_like_ddp

ALGORITHMS = {
    "SOAP": lambda ps, **kw: lp.SOAP(ps, lr=3e-3, precondition_frequency=5, **kw),
    "Shampoo": lambda ps, **kw: lp.Shampoo(ps, lr=3e-3, precondition_frequency=5, epsilon=1e-6, **kw),
    "KLShampoo": lambda ps, **kw: lp.KLShampoo(ps, lr=3e-3, precondition_frequency=5, **kw),
}
STEPS = 20


def make_model() -> torch.nn.Module:
    """Odd row counts, so that dim-0 chunks are uneven and cut through blocks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 23), torch.nn.Tanh(), torch.nn.Linear(23, 23), torch.nn.Tanh(),
        torch.nn.Linear(23, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4),
    )


def train_shard(model, opt, steps: range, rank: int, world: int) -> None:
    per_rank = BATCH // world
    for step in steps:
        x, y = batch(step)
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        opt.zero_grad()
        ((model(x[part, :16]) - y[part]) ** 2).mean().backward()
        opt.step()


def _fsdp2_worker(rank: int, world: int, name: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = ALGORITHMS[name](model.parameters())
    train_shard(model, opt, range(STEPS), rank, world)
    full = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
    owned = {s.block_id for s in opt.preconditioner_stats()}
    torch.save({"params": full, "owned": owned, "world": dist.get_world_size(),
                "comm": opt._router.bytes_last_step}, Path(out) / f"rank{rank}.pt")


def _fsdp1_worker(rank: int, world: int, name: str, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=True,
                 auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}))
    opt = ALGORITHMS[name](model.parameters(), distributed=model)
    train_shard(model, opt, range(STEPS), rank, world)
    with FSDP.summon_full_params(model):
        full = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    torch.save({"params": full, "world": dist.get_world_size(), "comm": opt._router.bytes_last_step},
               Path(out) / f"rank{rank}.pt")


def reference(name: str) -> torch.Tensor:
    model = make_model()
    opt = ALGORITHMS[name](model.parameters())
    with single_thread():
        train_like_ddp(_Slice16(model), opt, range(STEPS), 2)
    return flat_params(model)


class _Slice16(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[:, :16])


@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1"])
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_two_sharded_ranks_equal_one_process(backend, name, tmp_path):
    worker = _fsdp2_worker if backend == "fsdp2" else _fsdp1_worker
    launch(worker, 2, name, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    expected = reference(name)
    for r in ranks:
        rel = (torch.linalg.norm(r["params"] - expected) / torch.linalg.norm(expected)).item()
        assert rel <= 1e-5, f"{backend} {name}: relative difference {rel:.2e}"
    print(f"{backend} {name}: all-to-all bytes per step (rank 0) {ranks[0]['comm']}")


def _fsdp1_resume_worker(rank: int, world: int, name: str, out: str) -> None:
    """FSDP1 checkpoints go through our own consolidated state dict (FSDP1's
    optim_state_dict flattens every tensor of a parameter's state, Kronecker factors too)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    def build():
        model = FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=True,
                     auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}))
        return model, ALGORITHMS[name](model.parameters(), distributed=model)

    model, opt = build()
    train_shard(model, opt, range(STEPS // 2), rank, world)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()  # a collective: complete on every rank, keys free of ranks
    resumed_model, resumed_opt = build()
    resumed_model.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    train_shard(resumed_model, resumed_opt, range(STEPS // 2, STEPS), rank, world)
    with FSDP.summon_full_params(resumed_model):
        full = torch.cat([p.detach().reshape(-1).clone() for p in resumed_model.parameters()])
    torch.save({"params": full, "world": dist.get_world_size()}, Path(out) / f"rank{rank}.pt")


def test_fsdp1_resumes_from_our_state_dict(tmp_path):
    launch(_fsdp1_resume_worker, 2, "SOAP", str(tmp_path))
    expected = reference("SOAP")
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["world"] == 2
        rel = (torch.linalg.norm(saved["params"] - expected) / torch.linalg.norm(expected)).item()
        assert rel <= 1e-5, f"rank {rank}: relative difference {rel:.2e}"
