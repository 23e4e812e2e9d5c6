"""Identity sides (``max_factor_dim``) across ranks: blocks without a factor on one or both
sides, owned and routed like any other, give the one-process result under DDP and FSDP2."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from integration_tests.launch import case_results, launch_cases, running, save_case
from integration_tests.test_ddp import flat_params, single_thread, train, train_like_ddp
from integration_tests.test_fsdp import _Slice16, make_model, train_shard
from lightning_precond.registry import ALGORITHMS, names

STEPS = 12
# make_model()'s 23-wide dims are above it: Linear(16, 23) has an identity left side,
# Linear(23, 23) two, Linear(23, 7) an identity right side, Linear(7, 4) none.
OPTIONS = {"max_factor_dim": 20}


def _worker(rank: int, world: int, algorithms: list[str], out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for name in algorithms:
        with running(f"{name} ddp"):
            model = make_model()
            opt = ALGORITHMS[name].build(model.parameters(), **OPTIONS)
            train(DistributedDataParallel(_Slice16(model)), opt, range(STEPS), rank, world)
            identity = sorted({b.identity for b in opt._plan.blocks})
            saved = opt.state_dict()  # the full form: a collective, complete on rank 0 (blocks streamed there)
            save_case(out, f"{name}.ddp", rank, {"params": flat_params(model), "identity": identity,
                                                 "world": dist.get_world_size(),
                                                 "checkpoint": saved if rank == 0 else None})
        with running(f"{name} fsdp2"):
            model = make_model()
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = ALGORITHMS[name].build(model.parameters(), **OPTIONS)
            train_shard(model, opt, range(STEPS), rank, world)
            full = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
            save_case(out, f"{name}.fsdp2", rank, {"params": full, "world": dist.get_world_size()})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("identity_sides")
    failure = launch_cases(_worker, 2, names(has_basis=True), str(out))
    return lambda case: case_results(out, case, 2, failure)


@pytest.mark.parametrize("backend, tolerance", [("ddp", 1e-6), ("fsdp2", 1e-5)])
@pytest.mark.parametrize("name", names(has_basis=True))
def test_identity_sides_across_two_ranks_equal_one_process(name, backend, tolerance, runs):
    model = make_model()
    opt = ALGORITHMS[name].build(model.parameters(), **OPTIONS)
    with single_thread():
        train_like_ddp(_Slice16(model), opt, range(STEPS), 2)
    single = flat_params(model)
    ranks = runs(f"{name}.{backend}")
    assert all(r["world"] == 2 for r in ranks)
    if backend == "ddp":
        if ALGORITHMS[name].factored_sides == 2:
            assert ranks[0]["identity"] == [(), ("left",), ("left", "right"), ("right",)]
        else:  # one-sided (ASGO): every block also has its unpreconditioned side as identity
            assert ranks[0]["identity"] == sorted({b.identity for b in opt._plan.blocks})
            assert () not in ranks[0]["identity"] and ("left", "right") in ranks[0]["identity"]
    for r in ranks:
        rel = (torch.linalg.norm(r["params"] - single) / torch.linalg.norm(single)).item()
        assert rel <= tolerance, f"{name} {backend}: relative difference {rel:.2e}"
    if backend == "ddp":
        # The 2-rank full checkpoint holds every block with its own sides' state, and loads
        # into one process; its block state is the one-process state.
        saved = ranks[0]["checkpoint"]
        ours = opt.state_dict()
        blocks = {(i, k): v for i, entry in saved["state"].items() for k, v in entry.items() if k.startswith("block")}
        assert blocks.keys() == {(i, k) for i, entry in ours["state"].items() for k in entry if k.startswith("block")}
        for (i, k), state in blocks.items():
            assert state.keys() == ours["state"][i][k].keys()
            for field, value in state.items():
                if value.is_floating_point():
                    torch.testing.assert_close(value, ours["state"][i][k][field], rtol=1e-4, atol=1e-6)
        ALGORITHMS[name].build(make_model().parameters(), **OPTIONS).load_state_dict(saved)
