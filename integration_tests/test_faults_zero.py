"""Non-finite gradients under DeepSpeed ZeRO-2 at 2 ranks: a NaN in one rank's batch reaches
every rank's fragments through the reduce-scatter. DeepSpeed's own overflow check sees it
first and skips the whole step on every rank (counted in ``engine.skipped_steps``) before
calling our ``step()``, whatever ``nonfinite_grad`` says: nothing changes, ranks stay
consistent, the run goes on. (Our screen is the second line of defence there; it is
exercised at 2 ranks under DDP, FSDP2 and FSDP1 in ``test_faults_distributed.py``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from integration_tests.launch import launch
from integration_tests.test_deepspeed import _deepspeed_env, _full_params, _initialize
from integration_tests.test_ddp import BATCH, batch

NAMES = ["SOAP", "Muon"]


def _one_step(engine, step: int, rank: int, spoil: bool) -> None:
    x, y = batch(step)
    part = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    x = x[part].clone()
    if spoil and rank == 0:
        x[0, 0] = float("nan")
    engine.backward(((engine(x) - y[part]) ** 2).mean())
    engine.step()


def _worker(rank: int, world: int, policy: str, out: str) -> None:
    _deepspeed_env(rank, world)
    results = {}
    for name in NAMES:
        model, opt, engine, _ = _initialize(2, name, optimizer_options={"nonfinite_grad": policy})
        for step in range(3):
            _one_step(engine, step, rank, spoil=False)
        before = _full_params(model, 2)
        raised = False
        try:
            _one_step(engine, 3, rank, spoil=True)
        except FloatingPointError:
            raised = True
        after = _full_params(model, 2)
        results[name] = {"before": before, "after": after, "raised": raised,
                         "ours": opt.skipped_steps(gather=True), "deepspeed": engine.skipped_steps}
        if not raised:
            _one_step(engine, 4, rank, spoil=False)
            results[name]["final"] = _full_params(model, 2)
    torch.save(results, Path(out) / f"{policy}.rank{rank}.pt")
    dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_faults")
    for policy in ("skip", "raise"):
        launch(_worker, 2, policy, str(out))
    return out


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("name", NAMES)
def test_zero2_skips_the_step_everywhere_and_goes_on(runs, name, policy):
    ranks = [torch.load(runs / f"{policy}.rank{r}.pt", weights_only=False)[name] for r in range(2)]
    for r in ranks:
        assert not r["raised"] and torch.equal(r["after"], r["before"])
        assert r["deepspeed"] == 1 and r["ours"] == {}, "DeepSpeed skipped it before our step() ran"
        assert torch.isfinite(r["final"]).all() and not torch.equal(r["final"], r["after"])
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])
