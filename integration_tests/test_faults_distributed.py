"""Non-finite gradients at 2 ranks (issue 13): every rank reaches the same verdict, so a
refused vector or block is left unchanged everywhere (replicas and shards stay consistent),
and ``nonfinite_grad="raise"`` raises on every rank before anything changes.

* DDP: a NaN in one rank's batch reaches every rank through the gradient all-reduce.
* FSDP2 / FSDP1: a NaN in one element of one rank's gradient shard of a bias (what a
  reduce-scatter leaves when one element overflowed): only that rank sees it, the others
  must still skip their pieces of the same bias.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from integration_tests.launch import launch
from lightning_precond.registry import ALGORITHMS

NAMES = ["SOAP", "Muon"]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()


def step_data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)


def wrap(backend: str, model: torch.nn.Module):
    """The wrapped model and the optimizer's ``distributed`` argument."""
    if backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), "auto"
    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, "auto"
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True,
                   auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}))
    return wrapped, wrapped


def plain(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (``0.bias``)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("module.", "")


def gathered(wrapped, backend: str) -> dict[str, torch.Tensor]:
    if backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped):
            return {plain(n): p.detach().clone() for n, p in wrapped.named_parameters()}
    return {plain(n): full(p) for n, p in wrapped.named_parameters()}


def spoil(backend: str, wrapped, rank: int) -> str:
    """Make one rank's gradient non-finite the way the backend would see it; returns which
    parameters must be left unchanged."""
    if backend == "ddp":
        return "all"  # the NaN went into rank 0's batch, before the all-reduce
    bias = [p for n, p in wrapped.named_parameters() if plain(n) == "0.bias"][0]
    local = bias.grad.to_local() if hasattr(bias.grad, "to_local") else bias.grad
    holds = torch.tensor([local is not None and local.numel() > 0], dtype=torch.float32)
    holders = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(holders, holds)
    first = min(r for r, h in enumerate(holders) if h.item() > 0)  # only that rank sees the NaN
    if rank == first:
        local.view(-1)[0] = float("nan")
    return "bias"


def _worker(rank: int, world: int, backend: str, policy: str, out: str) -> None:
    results = {}
    for name in NAMES:
        model = make_model()
        wrapped, distributed = wrap(backend, model)
        opt = ALGORITHMS[name].build(wrapped.parameters(), nonfinite_grad=policy, distributed=distributed)
        for step in range(3):
            x, y = step_data(step, rank)
            opt.zero_grad()
            ((wrapped(x) - y) ** 2).mean().backward()
            opt.step()
        before = gathered(wrapped, backend)
        x, y = step_data(3, rank)
        if backend == "ddp" and rank == 0:
            x[0, 0] = float("nan")
        opt.zero_grad()
        ((wrapped(x) - y) ** 2).mean().backward()
        untouched = spoil(backend, wrapped, rank)
        raised = False
        try:
            opt.step()
        except FloatingPointError:
            raised = True
        after = gathered(wrapped, backend)
        skipped = opt.skipped_steps(gather=True)
        # the run goes on: one healthy step
        x, y = step_data(4, rank)
        opt.zero_grad()
        ((wrapped(x) - y) ** 2).mean().backward()
        opt.step()
        final = gathered(wrapped, backend)
        results[name] = {"before": before, "after": after, "final": final, "raised": raised,
                         "untouched": untouched, "skipped": skipped}
    torch.save(results, Path(out) / f"{backend}.{policy}.rank{rank}.pt")
    dist.barrier()


@pytest.fixture(scope="module", params=["ddp", "fsdp2", "fsdp1"])
def runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"faults_{request.param}")
    for policy in ("skip", "raise"):
        launch(_worker, 2, request.param, policy, str(out))
    return request.param, out


def _load(out: Path, backend: str, policy: str) -> list[dict]:
    return [torch.load(out / f"{backend}.{policy}.rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", NAMES)
def test_every_rank_skips_the_same_and_stays_consistent(runs, name):
    backend, out = runs
    ranks = [r[name] for r in _load(out, backend, "skip")]
    for r in ranks:
        assert not r["raised"]
        for key, value in r["before"].items():
            unchanged = torch.equal(r["after"][key], value)
            must_stay = r["untouched"] == "all" or key == "0.bias"
            assert unchanged == must_stay, (backend, name, key, unchanged)
            assert torch.isfinite(r["final"][key]).all()
        assert r["skipped"], "the skip is counted"
    for key in ranks[0]["final"]:  # the ranks agree
        assert torch.equal(ranks[0]["final"][key], ranks[1]["final"][key]), key


@pytest.mark.parametrize("name", NAMES)
def test_raise_raises_on_every_rank_before_anything_changes(runs, name):
    backend, out = runs
    for r in (r[name] for r in _load(out, backend, "raise")):
        assert r["raised"]
        for key, value in r["before"].items():
            assert torch.equal(r["after"][key], value), (backend, name, key)
