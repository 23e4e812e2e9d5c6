"""Block ownership under DDP: 2 gloo ranks equal 1 process; state shrinks; checkpoints reshard."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lightning_precond as lp
from integration_tests.launch import launch

# Shampoo's default epsilon (1e-12) on rank-deficient factors turns last-bit differences of
# batched LAPACK calls into visible ones ((1e-9 + eps)^(-1/4)); 1e-6 keeps the comparison
# about the distribution, not about that conditioning.
ALGORITHMS = {
    "SOAP": lambda ps: lp.SOAP(ps, lr=3e-3, precondition_frequency=5),
    "Shampoo": lambda ps: lp.Shampoo(ps, lr=3e-3, precondition_frequency=5, epsilon=1e-6),
    "KLShampoo": lambda ps: lp.KLShampoo(ps, lr=3e-3, precondition_frequency=5),
    "KLSOAP": lambda ps: lp.KLSOAP(ps, lr=3e-3, precondition_frequency=5),
    "EigenvalueCorrectedShampoo": lambda ps: lp.EigenvalueCorrectedShampoo(ps, lr=3e-3, precondition_frequency=5),
}
BATCH = 32


def make_model() -> torch.nn.Module:
    """Many similar layers, so that ownership can balance them."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(16, 24), torch.nn.Tanh()]
    for _ in range(5):
        layers += [torch.nn.Linear(24, 24), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(24, 4))
    return torch.nn.Sequential(*layers)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 16, generator=gen), torch.randn(BATCH, 4, generator=gen)


def train(model, opt, steps: range, rank: int = 0, world: int = 1) -> None:
    """Each rank trains on its slice of the batch (DDP averages the gradients)."""
    per_rank = BATCH // world
    for step in steps:
        x, y = batch(step)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def train_like_ddp(model, opt, steps: range, world: int) -> None:
    """One process computing exactly DDP's gradient: the mean of the per-rank gradients.

    (SOAP's Adam-in-basis amplifies rounding differences in near-null directions of
    rank-deficient factors, so the 1-process reference must see the same gradient bits.)
    """
    per_rank = BATCH // world
    for step in steps:
        x, y = batch(step)
        grads = []
        for rank in range(world):
            model.zero_grad()
            part = slice(rank * per_rank, (rank + 1) * per_rank)
            ((model(x[part]) - y[part]) ** 2).mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, *per_rank_grads in zip(model.parameters(), *grads):
            p.grad = sum(g / world for g in per_rank_grads)
        opt.step()


@contextlib.contextmanager
def single_thread():
    """The ranks run one thread each; so does the reference (reductions split by thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _ddp_worker(rank: int, world: int, name: str, steps: int, out: str) -> None:
    model = make_model()
    opt = ALGORITHMS[name](model.parameters())
    train(DistributedDataParallel(model), opt, range(steps), rank, world)
    owned = {s.block_id for s in opt.preconditioner_stats()}
    every = {s.block_id for s in opt.preconditioner_stats(gather=True)}
    torch.save({"params": flat_params(model), "bytes": opt.state_bytes(), "owned": owned, "every": every,
                "comm": opt._router.bytes_last_step, "world": dist.get_world_size()},
               Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_two_ranks_equal_one_process(name, tmp_path):
    launch(_ddp_worker, 2, name, 30, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    model = make_model()
    opt = ALGORITHMS[name](model.parameters())
    with single_thread():
        train_like_ddp(model, opt, range(30), 2)
    single = flat_params(model)
    for r in ranks:
        rel = (torch.linalg.norm(r["params"] - single) / torch.linalg.norm(single)).item()
        assert rel <= 1e-6, f"{name}: relative difference {rel:.2e}"
    assert torch.equal(ranks[0]["params"], ranks[1]["params"]), "replicas must stay identical"
    if name != "Shampoo":  # bitwise where achievable (see the note on Shampoo's epsilon)
        assert torch.equal(ranks[0]["params"], single)
    # every block is owned by exactly one rank, and the gathered stats see them all
    assert not ranks[0]["owned"] & ranks[1]["owned"]
    assert ranks[0]["owned"] | ranks[1]["owned"] == ranks[0]["every"] == ranks[1]["every"]
    if name == "SOAP":
        ratio = max(r["bytes"] for r in ranks) / opt.state_bytes()
        print(f"per-rank state bytes at world size 2: {ratio:.3f} of one process; "
              f"all-gather {ranks[0]['comm']} bytes per step")
        assert ratio <= 0.55


def _resume_worker(rank: int, world: int, name: str, checkpoint: str, out: str) -> None:
    model = make_model()
    opt = ALGORITHMS[name](model.parameters())
    if checkpoint:
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        train(DistributedDataParallel(model), opt, range(10, 20), rank, world)
        torch.save(flat_params(model), Path(out) / f"resumed{rank}.pt")
        return
    train(DistributedDataParallel(model), opt, range(10), rank, world)
    opt.consolidate_state_dict()  # Lightning's convention: consolidate on all, save on rank 0
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, Path(out) / "ckpt.pt")


@pytest.mark.parametrize("name", ["SOAP", "KLShampoo"])
def test_checkpoint_from_two_ranks_resumes_at_one_and_two(name, tmp_path):
    launch(_resume_worker, 2, name, "", str(tmp_path))
    checkpoint = tmp_path / "ckpt.pt"
    saved = torch.load(checkpoint, weights_only=True)
    # The saved state is complete: every block of the plan is there.
    blocks = [part for entry in saved["opt"]["state"].values() for key, part in entry.items() if key.startswith("block")]
    assert len(blocks) == 7 and all("factor_left" in part for part in blocks)

    with single_thread():
        uninterrupted = make_model()
        opt = ALGORITHMS[name](uninterrupted.parameters())
        train_like_ddp(uninterrupted, opt, range(20), 2)
        expected = flat_params(uninterrupted)

        model = make_model()
        opt = ALGORITHMS[name](model.parameters())
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        train_like_ddp(model, opt, range(10, 20), 2)
    rel = (torch.linalg.norm(flat_params(model) - expected) / torch.linalg.norm(expected)).item()
    assert rel <= 1e-6, f"resumed at world size 1: {rel:.2e}"

    launch(_resume_worker, 2, name, str(checkpoint), str(tmp_path))
    for rank in range(2):
        resumed = torch.load(tmp_path / f"resumed{rank}.pt")
        rel = (torch.linalg.norm(resumed - expected) / torch.linalg.norm(expected)).item()
        assert rel <= 1e-6, f"resumed at world size 2, rank {rank}: {rel:.2e}"
