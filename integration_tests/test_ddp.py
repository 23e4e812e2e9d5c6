"""Block ownership under DDP: 2 gloo ranks equal 1 process; state shrinks; checkpoints reshard."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from integration_tests.launch import case_results, launch_cases, running, save_case
from lightning_precond.registry import ALGORITHMS, names

# Every registered algorithm, with its short-run settings (lightning_precond/registry.py).
# Shampoo's epsilon there (1e-6, not its default 1e-12) keeps the comparisons about the
# distribution: on rank-deficient factors the default turns last-bit differences of batched
# LAPACK calls into visible ones ((1e-9 + eps)^(-1/4)).
# Data-parallel runs equal one process bitwise where achievable: all but Shampoo, which is
# within 1e-6 (the last bits of its inverse roots).
NOT_BITWISE = frozenset({"Shampoo"})
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
    for step in steps:
        for p, grad in zip(model.parameters(), ddp_gradients(model, step, world)):
            p.grad = grad
        opt.step()


def ddp_gradients(model, step: int, world: int) -> list[torch.Tensor]:
    """The mean over ``world`` ranks of each rank's gradient on its slice of the batch, summed
    in rank order (leaves ``model``'s own gradients set to the last rank's)."""
    per_rank = BATCH // world
    x, y = batch(step)
    grads = []
    for rank in range(world):
        model.zero_grad()
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        ((model(x[part]) - y[part]) ** 2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return [sum(g / world for g in per_rank_grads) for per_rank_grads in zip(*grads)]


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


def owned_blocks(name: str, opt, gather: bool = False) -> set[str] | None:
    """The ids of the blocks whose factors this rank (``gather``: any rank) holds; None for
    an algorithm without factors (its blocks appear in no stats)."""
    if not ALGORITHMS[name].has_basis:
        return None
    return {s.block_id for s in opt.preconditioner_stats(gather=gather)}


def _ddp_worker(rank: int, world: int, algorithms: list[str], steps: int, out: str) -> None:
    """Every algorithm in one launch, one after the other (a result file each)."""
    for name in algorithms:
        with running(name):
            model = make_model()
            opt = ALGORITHMS[name].build(model.parameters())
            train(DistributedDataParallel(model), opt, range(steps), rank, world)
            result = {"params": flat_params(model), "bytes": opt.state_bytes(), "owned": owned_blocks(name, opt),
                      "every": owned_blocks(name, opt, gather=True), "comm": opt._router.bytes_last_step,
                      "world": dist.get_world_size()}
        save_case(out, name, rank, result)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """30 DDP steps of every algorithm on 2 ranks, in one launch for the module."""
    out = tmp_path_factory.mktemp("ddp")
    failure = launch_cases(_ddp_worker, 2, names(), 30, str(out))
    return lambda name: case_results(out, name, 2, failure)


@pytest.mark.parametrize("name", names())
def test_two_ranks_equal_one_process(name, two_rank_runs):
    ranks = two_rank_runs(name)
    assert all(r["world"] == 2 for r in ranks)
    model = make_model()
    opt = ALGORITHMS[name].build(model.parameters())
    with single_thread():
        train_like_ddp(model, opt, range(30), 2)
    single = flat_params(model)
    for r in ranks:
        rel = (torch.linalg.norm(r["params"] - single) / torch.linalg.norm(single)).item()
        assert rel <= 1e-6, f"{name}: relative difference {rel:.2e}"
    assert torch.equal(ranks[0]["params"], ranks[1]["params"]), "replicas must stay identical"
    if name not in NOT_BITWISE:  # bitwise where achievable (see the note on Shampoo's epsilon)
        assert torch.equal(ranks[0]["params"], single)
    # every block is owned by exactly one rank, and the gathered stats see them all
    if ALGORITHMS[name].has_basis:
        assert not ranks[0]["owned"] & ranks[1]["owned"]
        assert ranks[0]["owned"] | ranks[1]["owned"] == ranks[0]["every"] == ranks[1]["every"]
    if name == "SOAP":
        ratio = max(r["bytes"] for r in ranks) / opt.state_bytes()
        print(f"per-rank state bytes at world size 2: {ratio:.3f} of one process; "
              f"all-gather {ranks[0]['comm']} bytes per step")
        assert ratio <= 0.55


def _checkpoint_worker(rank: int, world: int, algorithms: list[str], phase: str, out: str) -> None:
    """``save``: 10 steps of each algorithm, then its checkpoint; ``resume``: each checkpoint
    loaded and trained to step 20 (every algorithm in one launch per phase)."""
    for name in algorithms:
        with running(f"{name} {phase}"):
            model = make_model()
            opt = ALGORITHMS[name].build(model.parameters())
            if phase == "resume":
                saved = torch.load(Path(out) / f"{name}.ckpt.pt", weights_only=True)
                model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["opt"])
                train(DistributedDataParallel(model), opt, range(10, 20), rank, world)
                save_case(out, f"{name}.resumed", rank, flat_params(model))
                continue
            train(DistributedDataParallel(model), opt, range(10), rank, world)
            opt.consolidate_state_dict()  # Lightning's convention: consolidate on all, save on rank 0
            if rank == 0:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, Path(out) / f"{name}.ckpt.pt")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Every algorithm's checkpoint saved at 2 ranks and resumed at 2: one launch per phase."""
    out = tmp_path_factory.mktemp("ddp_checkpoints")
    failure = launch_cases(_checkpoint_worker, 2, names(), "save", str(out))
    saved = [name for name in names() if (out / f"{name}.ckpt.pt").exists()]
    failure += launch_cases(_checkpoint_worker, 2, saved, "resume", str(out))
    return out, failure


@pytest.mark.parametrize("name", names())
def test_checkpoint_from_two_ranks_resumes_at_one_and_two(name, checkpoints):
    out, failure = checkpoints
    checkpoint = out / f"{name}.ckpt.pt"
    if not checkpoint.exists():
        pytest.fail(f"{name}: no checkpoint; the launch failed:\n{failure[-6000:]}")
    saved = torch.load(checkpoint, weights_only=True)
    if ALGORITHMS[name].has_basis:
        # The saved state is complete: every block of the plan is there.
        blocks = [part for entry in saved["opt"]["state"].values() for key, part in entry.items()
                  if key.startswith("block")]
        # (a one-sided algorithm, ASGO, keeps one factor per block)
        sides = ALGORITHMS[name].factored_sides
        assert len(blocks) == 7 and all(sum(f"factor_{s}" in part for s in ("left", "right")) == sides
                                        for part in blocks)

    with single_thread():
        uninterrupted = make_model()
        opt = ALGORITHMS[name].build(uninterrupted.parameters())
        train_like_ddp(uninterrupted, opt, range(20), 2)
        expected = flat_params(uninterrupted)

        model = make_model()
        opt = ALGORITHMS[name].build(model.parameters())
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        train_like_ddp(model, opt, range(10, 20), 2)
    rel = (torch.linalg.norm(flat_params(model) - expected) / torch.linalg.norm(expected)).item()
    assert rel <= 1e-6, f"resumed at world size 1: {rel:.2e}"

    for rank, resumed in enumerate(case_results(out, f"{name}.resumed", 2, failure)):
        rel = (torch.linalg.norm(resumed - expected) / torch.linalg.norm(expected)).item()
        assert rel <= 1e-6, f"resumed at world size 2, rank {rank}: {rel:.2e}"


_HOST_READS = """
import os, sys, torch, torch.distributed as dist
import lightning_precond as lp
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
opt = lp.SOAP(model.parameters(), lr=1e-2, weight_decay=0.1, distributed=dist.group.WORLD,
              precondition_frequency=1000)
x, y = torch.randn(32, 8), torch.randn(32, 4)
def grads():
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
for _ in range(3):
    grads()
    opt.step()
grads()
reads = []
real = {name: getattr(torch.Tensor, name) for name in ("tolist", "__bool__", "__float__", "__int__")}
def spy(name):
    def read(self, *args, **kwargs):
        reads.append(name)
        return real[name](self, *args, **kwargs)
    return read
for name in real:
    setattr(torch.Tensor, name, spy(name))
try:
    opt.step()
finally:
    for name, fn in real.items():
        setattr(torch.Tensor, name, fn)
print("READS", ",".join(reads))
dist.destroy_process_group()
"""


def test_a_ddp_step_reads_one_value_list_on_the_host(tmp_path):
    """The screen's one ``tolist`` is the step's only device-to-host read under DDP: the
    router applies every block with factors computed on the device (it used to read each
    block's updated flag on the host). (torch's AdamW kernel for the vectors reads its CPU
    step counters with ``item``, which moves nothing from a device.)"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _HOST_READS, str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("READS"))
    assert line.split(" ", 1)[1] == "tolist"
