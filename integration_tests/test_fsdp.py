"""FSDP2 (fully_shard) and FSDP1 (use_orig_params=True): the same block owners as DDP, so
2 sharded gloo ranks equal one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from integration_tests.launch import case_results, launch, launch_cases, running, save_case
from integration_tests.test_ddp import BATCH, batch, flat_params, single_thread, train_like_ddp
from lightning_precond.registry import ALGORITHMS, names

STEPS = 20
# FSDP1 checkpoints through FSDP's and DCP's APIs, two launches per case: a subset (registry
# names), one of each kind of block state: SOAP's, KL-Shampoo's and those without factors
# (Muon's momentum). Every algorithm trains under FSDP1 and FSDP2 below.
CHECKPOINTED = ("SOAP", "KLShampoo", *names(has_basis=False))


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


def _fsdp2_worker(rank: int, world: int, algorithms: list[str], out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for name in algorithms:
        with running(name):
            model = make_model()
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = ALGORITHMS[name].build(model.parameters())
            train_shard(model, opt, range(STEPS), rank, world)
            full = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
            result = {"params": full, "world": dist.get_world_size(), "comm": opt._router.bytes_last_step}
        save_case(out, name, rank, result)


def _fsdp1_worker(rank: int, world: int, algorithms: list[str], out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    for name in algorithms:
        with running(name):
            model = FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=True,
                         auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}))
            opt = ALGORITHMS[name].build(model.parameters(), distributed=model)
            train_shard(model, opt, range(STEPS), rank, world)
            with FSDP.summon_full_params(model):
                full = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
            result = {"params": full, "world": dist.get_world_size(), "comm": opt._router.bytes_last_step}
        save_case(out, name, rank, result)


def reference(name: str) -> torch.Tensor:
    model = make_model()
    opt = ALGORITHMS[name].build(model.parameters())
    with single_thread():
        train_like_ddp(_Slice16(model), opt, range(STEPS), 2)
    return flat_params(model)


class _Slice16(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[:, :16])


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Per backend, one launch training every algorithm (at the first test that needs it)."""
    done: dict[str, tuple[Path, str]] = {}

    def get(backend: str, name: str) -> list[dict]:
        if backend not in done:
            out = tmp_path_factory.mktemp(backend)
            worker = _fsdp2_worker if backend == "fsdp2" else _fsdp1_worker
            done[backend] = out, launch_cases(worker, 2, names(), str(out))
        out, failure = done[backend]
        return case_results(out, name, 2, failure)

    return get


@pytest.mark.parametrize("backend", ["fsdp2", "fsdp1"])
@pytest.mark.parametrize("name", names())
def test_two_sharded_ranks_equal_one_process(backend, name, sharded_runs):
    ranks = sharded_runs(backend, name)
    assert all(r["world"] == 2 for r in ranks)
    expected = reference(name)
    for r in ranks:
        rel = (torch.linalg.norm(r["params"] - expected) / torch.linalg.norm(expected)).item()
        assert rel <= 1e-5, f"{backend} {name}: relative difference {rel:.2e}"
    print(f"{backend} {name}: all-to-all bytes per step (rank 0) {ranks[0]['comm']}")


def _fsdp1(model: torch.nn.Module, sharding: str = "FULL_SHARD") -> torch.nn.Module:
    """Wrapped as Lightning's FSDPStrategy does (use_orig_params=True), a unit per Linear, so
    each unit holds a matrix (blocks) and a vector (AdamW)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FSDP(model, device_id=torch.device("cpu"), use_orig_params=True,
                auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
                sharding_strategy=ShardingStrategy[sharding])


def save_checkpoint(api: str, model, opt, path: Path) -> None:
    """The users' tools: FSDP1's full optimizer state dict (what Lightning's FSDPStrategy
    saves by default) or torch.distributed.checkpoint's state-dict API (sharded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if api == "fsdp_full":
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True),
                                  FullOptimStateDictConfig(rank0_only=True)):
            state = {"model": model.state_dict(), "optim": FSDP.optim_state_dict(model, opt)}
        if dist.get_rank() == 0:
            torch.save(state, path / "full.pt")
    else:
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "dcp"))


def load_checkpoint(api: str, model, opt, path: Path, fsdp: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if api == "fsdp_full":
        state = torch.load(path / "full.pt", weights_only=False)
        if not fsdp:  # a full checkpoint is a plain one
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            return
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False),
                                  FullOptimStateDictConfig(rank0_only=False)):
            model.load_state_dict(state["model"])
            opt.load_state_dict(FSDP.optim_state_dict_to_load(model, opt, state["optim"]))
        return
    model_state, optim_state = get_state_dict(model, opt)  # the template: what this rank needs
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)


def _fsdp1_checkpoint_worker(
    rank: int, world: int, name: str, api: str, phase: str, out: str, sharding: str = "FULL_SHARD"
) -> None:
    model = _fsdp1(make_model(), sharding)
    opt = ALGORITHMS[name].build(model.parameters(), distributed=model)
    if phase == "save":
        train_shard(model, opt, range(STEPS // 2), rank, world)
        local = opt.state_dict()  # the per-rank input of FSDP's API: what this rank holds
        held = {index for index, _, numel in opt._router._geometry_of_all_ranks(opt._router.local_pieces())[rank]
                if numel > 0} | {index for index, _, _ in opt._router.checkpoint_layout().vector_pieces}
        entries = sorted((index, key) for index, entry in local["state"].items() for key in entry)
        torch.save({"entries": entries, "held": held}, Path(out) / f"local_rank{rank}.pt")
        save_checkpoint(api, model, opt, Path(out))
        return
    load_checkpoint(api, model, opt, Path(out), fsdp=True)
    train_shard(model, opt, range(STEPS // 2, STEPS), rank, world)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model):
        full = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    torch.save({"params": full, "world": dist.get_world_size()}, Path(out) / f"resumed_rank{rank}.pt")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def _one_process(name: str, steps: range, path: Path, load: str | None = None, save: bool = False) -> torch.Tensor:
    """One process, no FSDP, the gradients of 2 data-parallel ranks."""
    model = make_model()
    opt = ALGORITHMS[name].build(model.parameters())
    if load is not None:
        load_checkpoint(load, model, opt, path, fsdp=False)
    with single_thread():
        train_like_ddp(_Slice16(model), opt, steps, 2)
    if save:
        save_checkpoint("dcp", model, opt, path)
    return flat_params(model)


@pytest.mark.parametrize("api", ["fsdp_full", "dcp"])
@pytest.mark.parametrize("name", CHECKPOINTED)
def test_fsdp1_checkpoint_resumes_at_two_and_one_ranks(name, api, tmp_path):
    """Saved at 2 FSDP1 ranks through FSDP's / DCP's API, resumed at 2 ranks and in one
    process: both continue like the uninterrupted run."""
    launch(_fsdp1_checkpoint_worker, 2, name, api, "save", str(tmp_path))
    local = [torch.load(tmp_path / f"local_rank{rank}.pt") for rank in range(2)]
    # Sharded by whole blocks: each block (and each vector) saved by exactly one rank, one
    # that holds a piece of its parameter (FSDP hands an entry back only to those).
    entries = [set(part["entries"]) for part in local]
    assert not entries[0] & entries[1] and entries[0] and entries[1]
    assert {i for i, _ in entries[0] | entries[1]} == set(range(8))
    for part in local:
        assert {index for index, _ in part["entries"]} <= part["held"]
    launch(_fsdp1_checkpoint_worker, 2, name, api, "resume", str(tmp_path))
    expected = reference(name)
    for rank in range(2):
        resumed = torch.load(tmp_path / f"resumed_rank{rank}.pt")
        assert resumed["world"] == 2
        assert _relative(resumed["params"], expected) <= 1e-5, f"rank {rank} resumed at 2 ranks"
    single = _one_process(name, range(STEPS // 2, STEPS), tmp_path, load=api)
    assert _relative(single, expected) <= 1e-5, "resumed in one process"


@pytest.mark.parametrize("sharding", ["SHARD_GRAD_OP", "NO_SHARD"])
def test_fsdp1_other_sharding_strategies(sharding, tmp_path):
    """Lightning's FSDPStrategy(sharding_strategy=...): training and a full checkpoint
    resumed in one process equal the uninterrupted run."""
    launch(_fsdp1_checkpoint_worker, 2, "SOAP", "fsdp_full", "save", str(tmp_path), sharding)
    launch(_fsdp1_checkpoint_worker, 2, "SOAP", "fsdp_full", "resume", str(tmp_path), sharding)
    expected = reference("SOAP")
    for rank in range(2):
        resumed = torch.load(tmp_path / f"resumed_rank{rank}.pt")
        assert _relative(resumed["params"], expected) <= 1e-5, f"rank {rank} resumed at 2 ranks"
    single = _one_process("SOAP", range(STEPS // 2, STEPS), tmp_path, load="fsdp_full")
    assert _relative(single, expected) <= 1e-5, "resumed in one process"


def test_fsdp1_resumes_a_one_process_dcp_checkpoint(tmp_path):
    """DCP reshards 1 -> 2: a checkpoint written by one plain process resumes under FSDP1."""
    _one_process("SOAP", range(STEPS // 2), tmp_path, save=True)
    launch(_fsdp1_checkpoint_worker, 2, "SOAP", "dcp", "resume", str(tmp_path))
    expected = reference("SOAP")
    for rank in range(2):
        resumed = torch.load(tmp_path / f"resumed_rank{rank}.pt")
        assert _relative(resumed["params"], expected) <= 1e-5, f"rank {rank}"


def _fsdp1_consolidated_worker(rank: int, world: int, out: str) -> None:
    """Outside FSDP's API: consolidate_state_dict() makes state_dict() complete on rank 0, which
    saves it; every rank loads that file (Lightning's way)."""
    model = _fsdp1(make_model())
    opt = ALGORITHMS["SOAP"].build(model.parameters(), distributed=model)
    train_shard(model, opt, range(STEPS // 2), rank, world)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    opt.consolidate_state_dict()
    if rank == 0:
        torch.save(opt.state_dict(), Path(out) / "consolidated.pt")
    dist.barrier()
    saved_opt = torch.load(Path(out) / "consolidated.pt", weights_only=True)
    resumed_model = _fsdp1(make_model())
    resumed_opt = ALGORITHMS["SOAP"].build(resumed_model.parameters(), distributed=resumed_model)
    resumed_model.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    train_shard(resumed_model, resumed_opt, range(STEPS // 2, STEPS), rank, world)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(resumed_model):
        full = torch.cat([p.detach().reshape(-1).clone() for p in resumed_model.parameters()])
    torch.save({"params": full}, Path(out) / f"resumed_rank{rank}.pt")


def test_fsdp1_consolidated_state_dict_is_complete(tmp_path):
    launch(_fsdp1_consolidated_worker, 2, str(tmp_path))
    expected = reference("SOAP")
    for rank in range(2):
        resumed = torch.load(tmp_path / f"resumed_rank{rank}.pt")
        assert _relative(resumed["params"], expected) <= 1e-5, f"rank {rank}"
    saved = torch.load(tmp_path / "consolidated.pt")
    single = make_model()
    opt = ALGORITHMS["SOAP"].build(single.parameters())
    opt.load_state_dict(saved)  # complete: loads into one process
    assert set(saved["state"][0]) == {"block0"} and set(saved["state"][1]) == {"adamw"}
