"""Sharded checkpoints: each rank saves only the blocks it owns, and DCP reshards them.

One chain per backend, world sizes 4 -> 2 -> 1 -> 4 (gloo on CPU), checkpointing through
torch's documented idiom (``get_*_state_dict`` + ``dcp.save`` / ``dcp.load`` +
``set_*_state_dict``) at the end of every phase, must continue like one uninterrupted
process that sees the same gradients. The full form (one complete dict on rank 0) and its
misuses are checked in the same 4-rank launches.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from integration_tests.launch import case_results, launch_cases, running, save_case
from integration_tests.test_ddp import ddp_gradients, flat_params, single_thread, train_like_ddp
from integration_tests.test_fsdp import _Slice16, make_model
from lightning_precond.registry import ALGORITHMS

# (world size, steps) of each phase of the chain; 1 runs in the test process.
PHASES = ((4, 4), (2, 4), (1, 4), (4, 4))
# Whole layers as blocks: with smaller blocks, buckets of different sizes (k blocks per bmm) round
# differently in the last bits, so ownership changes would be visible at 1e-6 without any checkpoint.
BLOCK = 1024  # the default: every 23-wide layer one block, as in the bitwise 2-rank tests
CHAINS = {"ddp": ("SOAP", "KLShampoo", "Muon"), "fsdp2": ("SOAP", "KLShampoo")}


def train_exactly(model: torch.nn.Module, opt, steps: range, world: int) -> None:
    """Every rank sets the gradients the reference computes (``ddp_gradients`` of the whole
    model, this rank's rows of them under FSDP2) instead of DDP's all-reduce or FSDP2's
    reduce-scatter, whose summation order at 4 ranks differs from any one-process sum in the
    last bits, which SOAP's Adam-in-basis amplifies in near-null directions (a 4-rank DDP run
    differs from its one-process twin by 1.6e-2 after 4 steps, a 2-rank one by 0). What is
    tested is the checkpoint's resharding, so the chain must be exactly comparable."""
    from torch.distributed.tensor import DTensor

    replica = make_model()
    for step in steps:
        with torch.no_grad():
            for mine, theirs in zip(replica.parameters(), model.parameters()):
                mine.copy_(theirs.full_tensor() if isinstance(theirs, DTensor) else theirs)
        for p, grad in zip(model.parameters(), ddp_gradients(_Slice16(replica), step, world)):
            if isinstance(p, DTensor):
                local = grad.chunk(world, dim=0)[dist.get_rank()].contiguous()
                grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            p.grad = grad
        opt.step()


def _build(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    return ALGORITHMS[name].build(model.parameters(), max_preconditioner_dim=BLOCK, checkpoint_timeout=5.0)


def _wrap(backend: str, model: torch.nn.Module, world: int) -> torch.nn.Module:
    if world == 1:
        return model
    if backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _first_step(phase: int) -> int:
    return sum(steps for _, steps in PHASES[:phase])


def _phase(rank: int, world: int, backend: str, name: str, phase: int, out: Path) -> dict:
    """Load the previous phase's checkpoint (if any), train this phase, save a checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _wrap(backend, make_model(), world)
    opt = _build(name, model)
    if phase > 0:
        model_state, optim_state = get_state_dict(model, opt)  # the template: what this rank will own
        held = _blocks_in(optim_state)
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(out / f"{backend}.{name}.{phase - 1}"))
        set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)
    else:
        held = set()
    first = _first_step(phase)
    train_exactly(model, opt, range(first, first + PHASES[phase][1]), world)
    model_state, optim_state = get_state_dict(model, opt)
    saved = _blocks_in(optim_state)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(out / f"{backend}.{name}.{phase}"))
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return {"params": torch.cat([p.detach().reshape(-1) for p in params]), "saved": saved, "template": held,
            "owned": {b.id for bucket in opt._buckets for b in bucket.blocks}, "bytes": opt.state_bytes()}


def _blocks_in(optim_state: dict) -> set[str]:
    """``"<fqn>/block<b>"`` of the block entries in a DCP optimizer state dict."""
    return {f"{fqn}/{key}" for fqn, entry in optim_state["state"].items() for key in entry if key.startswith("block")}


def _chain_worker(rank: int, world: int, phase: int, out: str) -> None:
    for backend, algorithms in CHAINS.items():
        for name in algorithms:
            case = f"{backend}.{name}.phase{phase}"
            with running(case):
                result = _phase(rank, world, backend, name, phase, Path(out))
            save_case(out, case, rank, result)
    if phase == 0:
        _full_form_cases(rank, world, Path(out))
        _fsdp2_full_state_dict(rank, world, Path(out))


def _fsdp2_full_state_dict(rank: int, world: int, out: Path) -> None:
    """DCP's full_state_dict=True under FSDP2 (Lightning ModelParallelStrategy's and Accelerate's
    FULL_STATE_DICT): complete on rank 0, where the blocks arrive from their owners."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    with running("fsdp2 full state dict"):
        model = _wrap("fsdp2", make_model(), world)
        opt = _build("SOAP", model)
        train_exactly(model, opt, range(4), world)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(model, opt, options=options)
        if rank == 0:
            torch.save({"model": model_state, "opt": optim_state}, out / "fsdp2_full.pt")


def _full_form_cases(rank: int, world: int, out: Path) -> None:
    """The full form under DDP: every rank calls state_dict() (Accelerate), consolidate then
    rank 0 only (Lightning), and the rank-0-only trap."""
    from torch.nn.parallel import DistributedDataParallel

    with running("full form"):
        model = make_model()
        opt = _build("SOAP", model)
        DistributedDataParallel(model)  # the backend, as users build it (its all-reduce is bypassed)
        train_exactly(model, opt, range(4), world)
        result: dict = {"owned_bytes": opt.state_bytes()}
        state = opt.state_dict()  # every rank calls: the complete dict on rank 0 only
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": state}, out / "full.pt")
        else:
            try:
                torch.save(state, out / f"partial{rank}.pt")
                result["save_refused"] = ""
            except RuntimeError as error:
                result["save_refused"] = str(error)
            try:
                opt.load_state_dict(state)
                result["load_refused"] = ""
            except ValueError as error:
                result["load_refused"] = str(error)
        opt.consolidate_state_dict()  # Lightning's convention: all ranks, then state_dict() on rank 0
        if rank == 0:
            again = opt.state_dict()
            result["same"] = _blocks_in(again) == _blocks_in(state) and all(
                torch.equal(again["state"][i][k][n], state["state"][i][k][n])
                for i in state["state"] for k in state["state"][i] if k.startswith("block")
                for n in state["state"][i][k]
            )
        dist.barrier()
        if rank == 0:  # the trap: only rank 0 asks for the complete state
            began = time.monotonic()
            try:
                opt.state_dict()
                result["trap"] = ""
            except RuntimeError as error:
                result["trap"] = str(error)
            result["trap_seconds"] = time.monotonic() - began
        dist.barrier()
        # Nothing was left half-done: all ranks can still assemble the complete state.
        state = opt.state_dict()
        result["after_trap"] = len(_blocks_in(state)) if rank == 0 else None
    save_case(out, "full", rank, result)


def _one_process_phase(backend: str, name: str, phase: int, out: Path) -> dict:
    """World size 1: the plain model, loading and saving the same DCP checkpoints."""
    result = _phase(0, 1, backend, name, phase, out)
    return result


def _reference(name: str) -> torch.Tensor:
    """One uninterrupted process that sees each phase's data-parallel gradients."""
    model = make_model()
    opt = _build(name, model)
    with single_thread():
        for phase, (world, steps) in enumerate(PHASES):
            first = _first_step(phase)
            train_like_ddp(_Slice16(model), opt, range(first, first + steps), world)
    return flat_params(model)


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """Every chain, one launch per multi-process phase (all backends and algorithms in it)."""
    out = tmp_path_factory.mktemp("reshard")
    failures = {}
    for phase, (world, _) in enumerate(PHASES):
        if world == 1:
            for backend, algorithms in CHAINS.items():
                for name in algorithms:
                    with single_thread():
                        save_case(out, f"{backend}.{name}.phase{phase}", 0, _one_process_phase(backend, name, phase, out))
            failures[phase] = ""
        else:
            failures[phase] = launch_cases(_chain_worker, world, phase, str(out))
    return out, failures


@pytest.mark.parametrize("backend,name", [(b, n) for b, names in CHAINS.items() for n in names])
def test_resharded_chain_continues_like_one_process(backend, name, chains):
    out, failures = chains
    expected = _reference(name)
    for phase, (world, _) in enumerate(PHASES):
        ranks = case_results(out, f"{backend}.{name}.phase{phase}", world, failures[phase])
        every = set().union(*(r["owned"] for r in ranks))
        saved = [r["saved"] for r in ranks]
        # Each rank saved exactly the blocks it owns: each block once, none twice.
        assert sum(len(s) for s in saved) == len(set().union(*saved)), f"phase {phase}: a block saved twice"
        assert all(len(s) == len(r["owned"]) for s, r in zip(saved, ranks)), f"phase {phase}: saved != owned"
        if phase > 0:  # the template asks for exactly the blocks the new ownership gives this rank
            assert all(len(r["template"]) == len(r["owned"]) for r in ranks)
        if ALGORITHMS[name].has_basis and world > 1:
            assert all(r["owned"] for r in ranks) and len(every) == sum(len(r["owned"]) for r in ranks)
    final = case_results(out, f"{backend}.{name}.phase{len(PHASES) - 1}", PHASES[-1][0], failures[len(PHASES) - 1])
    for rank, result in enumerate(final):
        rel = (torch.linalg.norm(result["params"] - expected) / torch.linalg.norm(expected)).item()
        print(f"{backend} {name} rank {rank}: max relative parameter difference after 4->2->1->4: {rel:.2e}")
        assert torch.equal(result["params"], expected), f"{backend} {name}: not bitwise, {rel:.2e}"


def test_fsdp2_full_state_dict_resumes_in_one_process(chains):
    out, failures = chains
    path = out / "fsdp2_full.pt"
    assert path.exists(), failures[0][-4000:]
    saved = torch.load(path, weights_only=True)
    model = make_model()
    opt = _build("SOAP", model)
    model.load_state_dict(saved["model"])
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, saved["opt"])  # keyed by FQN, as DCP's full form is
    expected_model = make_model()
    expected = _build("SOAP", expected_model)
    with single_thread():
        train_like_ddp(_Slice16(model), opt, range(4, 8), 4)
        train_like_ddp(_Slice16(expected_model), expected, range(8), 4)
    assert torch.equal(flat_params(model), flat_params(expected_model))


def test_full_form_is_assembled_on_rank_zero_only(chains, tmp_path):
    out, failures = chains
    ranks = case_results(out, "full", 4, failures[0])
    saved = torch.load(out / "full.pt", weights_only=True)
    blocks = [key for entry in saved["opt"]["state"].values() for key in entry if key.startswith("block")]
    reference_model = make_model()
    reference = _build("SOAP", reference_model)
    reference._setup()
    assert len(blocks) == len(reference._plan.blocks)
    assert ranks[0]["same"], "consolidate + state_dict on rank 0 differs from every-rank state_dict"
    for rank, result in enumerate(ranks[1:], start=1):
        assert "not a checkpoint" in result["save_refused"], f"rank {rank} could torch.save a partial dict"
        assert "not a checkpoint" in result["load_refused"]
    assert "consolidate_state_dict() on EVERY rank" in ranks[0]["trap"]
    assert ranks[0]["trap_seconds"] < 30
    assert ranks[0]["after_trap"] == len(blocks)
    # The complete file resumes in one process like the uninterrupted run.
    model = make_model()
    opt = _build("SOAP", model)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    with single_thread():
        train_like_ddp(_Slice16(model), opt, range(4, 8), 4)
        expected_model = make_model()
        expected = _build("SOAP", expected_model)
        train_like_ddp(_Slice16(expected_model), expected, range(8), 4)
    assert torch.equal(flat_params(model), flat_params(expected_model))
