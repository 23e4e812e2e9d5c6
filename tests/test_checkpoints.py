"""The two checkpoint forms in one process: the sharded form's tag and where it loads, the
partial dict that refuses to be saved, and resuming from every rank's shard (load_shards).
The multi-rank paths (4 -> 2 -> 1 -> 4): integration_tests/test_checkpoint_sharding.py."""

from __future__ import annotations

import io

import pytest
import torch

import lightning_precond as lp
from lightning_precond.checkpoints import load_shards, merge_shards
from lightning_precond.engine.checkpoint import FRAGMENT_KEY
from lightning_precond.engine.shards import SHARD_TAG, NotACheckpoint, partial_message


def _trained(steps: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    opt = lp.SOAP(model.parameters(), lr=1e-2, precondition_frequency=2, max_preconditioner_dim=6)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 10, generator=gen)).square().mean().backward()
        opt.step()
    return model, opt


def _continue(model, opt, steps: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(99)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 10, generator=gen)).square().mean().backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _saved(state: dict) -> dict:
    """Through torch.save / torch.load, as users checkpoint: no tensor shared with the live
    optimizer (torch.optim's load_state_dict keeps same-dtype tensors it is given)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _fresh_copy(model):
    torch.manual_seed(5)
    twin = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    twin.load_state_dict(model.state_dict())
    return twin, lp.SOAP(twin.parameters(), lr=1e-2, precondition_frequency=2, max_preconditioner_dim=6)


def test_sharded_form_is_tagged_and_loads_only_where_selected():
    model, opt = _trained()
    full = opt.state_dict()
    assert all(SHARD_TAG not in group for group in full["param_groups"])
    with lp.sharded_state_dict(opt):
        shard = _saved(opt.state_dict())
    assert all(group[SHARD_TAG] == "sharded" for group in shard["param_groups"])
    assert set(shard["state"]) == set(range(4))  # an entry for every parameter
    twin, twin_opt = _fresh_copy(model)
    with pytest.raises(ValueError, match="one rank's shard"):
        twin_opt.load_state_dict(shard)
    with lp.sharded_state_dict(twin_opt):
        twin_opt.load_state_dict(shard)
    assert torch.equal(_continue(twin, twin_opt), _continue(model, opt))


def test_a_shard_missing_an_owned_block_is_refused_before_anything_changes():
    model, opt = _trained()
    with lp.sharded_state_dict(opt):
        shard = opt.state_dict()
    del shard["state"][0]["block1"]
    twin, twin_opt = _fresh_copy(model)
    before = [t.clone() for b in twin_opt._buckets for t in b.tensors().values()] if twin_opt._buckets else []
    with lp.sharded_state_dict(twin_opt), pytest.raises(ValueError, match="lacks .*block1"):
        twin_opt.load_state_dict(shard)
    after = [t for b in twin_opt._buckets for t in b.tensors().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_partial_dicts_cannot_be_saved_or_loaded():
    tag = partial_message(rank=1, writer=0, world_size=4)
    assert isinstance(tag, str) and "rank 1" in tag and "rank 0" in tag
    with pytest.raises(RuntimeError, match="not a checkpoint"):
        torch.save({"param_groups": [{SHARD_TAG: tag}]}, io.BytesIO())
    _, opt = _trained()
    partial = {"state": {}, "param_groups": [{"params": [0, 1, 2, 3], SHARD_TAG: tag}]}
    with pytest.raises(ValueError, match="not a checkpoint"):
        opt.load_state_dict(partial)
    import copy

    assert copy.deepcopy(tag) is tag  # passed along unchanged by consumers that copy dicts
    assert isinstance(tag, NotACheckpoint)


def _split(shard: dict, parts: int) -> list[dict]:
    """Every rank's shard of a 'parts'-rank run, made from one process's shard: blocks dealt
    round-robin, each vector's moments cut into 'parts' fragments (as ZeRO holds them)."""
    out = [{"state": {}, "param_groups": shard["param_groups"]} for _ in range(parts)]
    dealt = 0
    for index, entry in shard["state"].items():
        for part in out:
            part["state"][index] = {}
        for key, value in entry.items():
            if key.startswith("block"):
                out[dealt % parts]["state"][index][key] = value
                dealt += 1
            else:  # "adamw": cut into fragments
                flat = {n: value[n].reshape(-1) for n in ("exp_avg", "exp_avg_sq")}
                bounds = torch.linspace(0, flat["exp_avg"].numel(), parts + 1).long().tolist()
                for part, (lo, hi) in zip(out, zip(bounds, bounds[1:])):
                    part["state"][index][FRAGMENT_KEY] = {
                        "flat_start": torch.tensor(lo), "step": value["step"],
                        **{n: t[lo:hi].clone() for n, t in flat.items()}}
    return out


def test_load_shards_resumes_every_ranks_shards_in_one_process():
    model, opt = _trained()
    with lp.sharded_state_dict(opt):
        shards = _split(_saved(opt.state_dict()), 3)
    twin, twin_opt = _fresh_copy(model)
    load_shards(twin_opt, shards)
    assert torch.equal(_continue(twin, twin_opt), _continue(model, opt))


@pytest.mark.parametrize("damage,match", [
    ("untagged", "not a lightning_precond shard"),
    ("duplicate", "two shards hold"),
    ("missing_fragment", "do not cover"),
    ("missing_block", "checkpoint blocks of"),
])
def test_load_shards_refuses_inconsistent_shards(damage, match):
    model, opt = _trained()
    with lp.sharded_state_dict(opt):
        shards = _split(opt.state_dict(), 2)
    if damage == "untagged":
        shards[1] = {**shards[1], "param_groups": [{k: v for k, v in g.items() if k != SHARD_TAG}
                                                   for g in shards[1]["param_groups"]]}
    elif damage == "duplicate":
        shards[1]["state"][0].update(shards[0]["state"][0])
    elif damage == "missing_fragment":
        del shards[1]["state"][1][FRAGMENT_KEY]
    else:
        for shard in shards:
            shard["state"][0].pop("block1", None)
    _, twin_opt = _fresh_copy(model)
    with pytest.raises(ValueError, match=match):
        load_shards(twin_opt, shards)


def test_merge_shards_needs_shards():
    _, opt = _trained()
    with pytest.raises(ValueError, match="no shards"):
        merge_shards(opt, [])


@pytest.mark.parametrize("to", [-1, 1, "0", True])
def test_consolidate_state_dict_names_a_rank(to):
    _, opt = _trained()
    with pytest.raises(ValueError, match="to must be"):
        opt.consolidate_state_dict(to=to)


def test_checkpoint_timeout_is_validated():
    with pytest.raises(ValueError, match="checkpoint_timeout"):
        lp.SOAP(torch.nn.Linear(3, 3).parameters(), checkpoint_timeout=-1.0)


def test_one_process_resume_is_bitwise():
    """Bases are stored contiguous, so restoring them (contiguous copies) changes no bit."""
    model, opt = _trained(steps=6)
    saved = _saved(opt.state_dict())
    twin, twin_opt = _fresh_copy(model)
    twin_opt.load_state_dict(saved)
    assert torch.equal(_continue(twin, twin_opt, steps=6), _continue(model, opt, steps=6))


def test_load_shards_refuses_zero_without_fp32_master_weights():
    """Resuming ZeRO at another world size loads the module's weights: exact only in fp32."""
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    for p in model.parameters():
        p._hp_mapping = object()  # how DeepSpeed ZeRO-1/2 marks the parameters it manages
    opt = lp.SOAP(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="fp32 master weights"):
        load_shards(opt, [])
