"""Progressive unfreezing at 2 ranks: a param group added after the first step under DDP
equals one process; under FSDP2 it is refused before anything changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from integration_tests.launch import launch
from lightning_precond.registry import ALGORITHMS, names

STEPS, ADD_AT = 8, 3


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 10), torch.nn.Tanh(),
                               torch.nn.Linear(10, 3))


def run(name: str, model: torch.nn.Module, wrapped: torch.nn.Module | None, rank: int, world: int) -> None:
    """The body is trained from the start, the head's group is added at step ``ADD_AT``.
    Under DDP (``wrapped``) each rank takes its share of the batch; the one-process reference
    (``wrapped=None``) computes DDP's exact gradient, the mean of the shares' gradients
    (rank-deficient factors amplify last-bit differences, see test_ddp.train_like_ddp)."""
    body = [p for m in (model[0], model[2]) for p in m.parameters()]
    head = list(model[4].parameters())
    opt = ALGORITHMS[name].build([{"params": body}])
    shares = [slice(r * 8 // 2, (r + 1) * 8 // 2) for r in range(2)]
    for step in range(STEPS):
        if step == ADD_AT:
            opt.add_param_group({"params": head, "lr": 2e-3})
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        if wrapped is not None:
            opt.zero_grad()
            ((wrapped(x[shares[rank]]) - y[shares[rank]]) ** 2).mean().backward()
        else:
            grads = []
            for share in shares:
                model.zero_grad()
                ((model(x[share]) - y[share]) ** 2).mean().backward()
                grads.append([p.grad.clone() for p in model.parameters()])
            for p, *parts in zip(model.parameters(), *grads):
                p.grad = sum(g / 2 for g in parts)
        if step < ADD_AT:
            for p in head:
                p.grad = None
        opt.step()


def _ddp_worker(rank: int, world: int, out: str) -> None:
    for name in names():
        model = make_model()
        run(name, model, DistributedDataParallel(model), rank, world)
        torch.save(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), Path(out) / f"{name}.{rank}.pt")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("add_group")
    launch(_ddp_worker, 2, str(out))
    return out


@pytest.mark.parametrize("name", names())
def test_a_group_added_under_ddp_equals_one_process(name, ddp_runs):
    model = make_model()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each
    try:
        run(name, model, None, 0, 1)
    finally:
        torch.set_num_threads(threads)
    single = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for rank in range(2):
        ours = torch.load(ddp_runs / f"{name}.{rank}.pt")
        rel = (torch.linalg.norm(ours - single) / torch.linalg.norm(single)).item()
        assert rel <= 1e-6, f"{name} rank {rank}: {rel:.2e}"


def _fsdp2_worker(rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model)
    opt = ALGORITHMS["SOAP"].build(model.parameters())
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step()
    groups = len(opt.param_groups)
    extra = torch.nn.Parameter(torch.randn(3, 3))
    try:
        opt.add_param_group({"params": [extra]})
    except RuntimeError as error:
        assert "not supported under FSDP2Router" in str(error), error
    else:
        raise AssertionError("FSDP2 accepted add_param_group after the first step")
    assert len(opt.param_groups) == groups
    dist.barrier()


def test_a_group_added_under_fsdp2_is_refused_before_anything_changes():
    launch(_fsdp2_worker, 2)
