"""The checkpoint codec: the only code that knows how block state is laid out in a state dict
and how each backend's checkpoints behave (:class:`~lightning_precond.distributed.router.CheckpointLayout`).

Format (v0): the standard ``torch.optim`` ``{"state": {param_index: {...}}, "param_groups"}``.
A matrix parameter's entry holds one nested dict per block, ``"block{b}"``, with the block's
tensors (named as the algorithm's state fields) and counters; a vector's entry holds its
AdamW state as ``"adamw"`` (or flat, as ``torch.optim.AdamW`` saves it). Keys depend only on
block ids, never on ranks or on the backend, so ``torch.distributed.checkpoint`` reshards
between world sizes and between FSDP1, FSDP2 and one process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..blocks import Block
from ..distributed.router import CheckpointLayout
from . import shards
from .buckets import RECORD_FIELDS, BlockRecord, new_record

if TYPE_CHECKING:
    from .optimizer import PreconditionedOptimizer

__all__ = ["Consolidated", "state_dict", "load_state_dict", "consolidate", "FORMAT_VERSION", "FRAGMENT_KEY"]

# Tags written into every saved param group (DCP's and FSDP's state-dict APIs rebuild
# ``{state, param_groups}`` and drop other top-level keys). Checkpoints without them are v0.
FORMAT_VERSION = 1
TAG_ALGORITHM = "lp_algorithm"
TAG_FORMAT = "lp_format"
TAG_BLOCK_PLAN = "lp_block_plan"
TAGS = (TAG_ALGORITHM, TAG_FORMAT, TAG_BLOCK_PLAN, shards.SHARD_TAG)
# A ZeRO shard's piece of a vector's AdamW state: ``flat_start`` and the flat moments.
FRAGMENT_KEY = "adamw_fragment"

BlockEntry = tuple[int, str, dict[str, Tensor]]  # (param_index, "block{b}", state)


@dataclass
class Consolidated:
    """The complete state assembled by ``consolidate_state_dict(to=writer)`` at step ``steps``:
    on the writer, every block, and whole vectors where the backend shards them (FSDP1,
    ZeRO); on the other ranks nothing (``blocks is None``)."""

    steps: int
    writer: int
    blocks: list[BlockEntry] | None
    vectors: dict[int, dict[str, Tensor]] | None


# ---------------------------------------------------------------------------- blocks
def pack_block(block: Block, record: BlockRecord, tensors: Mapping[str, Tensor], sides: Iterable[str]) -> BlockEntry:
    """``(param_index, "block{b}", state)``: a block's tensors and counters, as saved."""
    # Contiguous copies: collectives that broadcast saved state (FSDP2 full state dicts over
    # gloo) send raw memory, so a transposed view would arrive transposed.
    out: dict[str, Tensor] = {
        name: t.detach().clone(memory_format=torch.contiguous_format) for name, t in tensors.items()
    }
    out["step"] = torch.tensor(record.step, dtype=torch.int64)
    out["initialized"] = torch.tensor(record.initialized)
    out["skipped_steps"] = torch.tensor(record.skipped_steps, dtype=torch.int64)
    for side in sides:
        for field_name in RECORD_FIELDS:
            out[f"{side}.{field_name}"] = torch.tensor(getattr(record.sides[side], field_name), dtype=torch.int64)
    return block.param_index, f"block{block.block_index}", out


def unpack_record(saved: Mapping[str, Tensor], sides: Iterable[str]) -> BlockRecord:
    sides = tuple(sides)
    record = new_record(sides)
    record.step, record.initialized = int(saved["step"]), bool(saved["initialized"])
    record.skipped_steps = int(saved["skipped_steps"])
    for side in sides:
        for field_name in RECORD_FIELDS:
            setattr(record.sides[side], field_name, int(saved[f"{side}.{field_name}"]))
    return record


def split_entry(entry: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Mapping[str, Tensor]]]:
    """A saved parameter entry as (AdamW state, blocks by ``"block{b}"``)."""
    plain: dict[str, Any] = {}
    blocks: dict[str, Mapping[str, Tensor]] = {}
    for key, value in entry.items():
        if key == "adamw" and isinstance(value, Mapping):
            plain.update(value)
        elif key.startswith("block") and isinstance(value, Mapping):
            blocks[key] = value
        else:
            plain[key] = value
    return plain, blocks


def owned_blocks(opt: PreconditionedOptimizer) -> list[BlockEntry]:
    out = []
    for bucket in opt._buckets:
        tensors = bucket.tensors()
        for i, block in enumerate(bucket.blocks):
            out.append(pack_block(block, bucket.records[i], {n: t[i] for n, t in tensors.items()}, bucket.sides))
    return out


def blocks_to(opt: PreconditionedOptimizer, writer: int) -> list[BlockEntry] | None:
    """Every block, packed, on ``writer``; ``None`` elsewhere (a collective, streamed)."""
    if opt._router is None:
        return []
    sides = opt.algorithm.sides
    packed = [pack_block(block, record, tensors, block.factored(sides))
              for block, record, tensors in shards.stream_blocks_to(opt, writer)]
    return packed if opt._router.rank == writer else None


# ---------------------------------------------------------------------------- vectors
def assemble_vectors(opt: PreconditionedOptimizer, pieces: Iterable[tuple[int, int, Mapping[str, Tensor]]]) -> dict[int, dict[str, Tensor]]:
    """Whole AdamW states from ``(param_index, flat_start, state)`` pieces of vectors."""
    state: dict[int, dict[str, Tensor]] = {}
    for index, start, piece in pieces:
        numel = math.prod(opt._shapes[index])
        entry = state.setdefault(index, {"step": piece["step"]})
        for name in ("exp_avg", "exp_avg_sq"):
            whole = entry.setdefault(name, piece[name].new_zeros(numel))
            whole[start : start + piece[name].numel()] = piece[name].reshape(-1)
    for index, entry in state.items():
        for name in ("exp_avg", "exp_avg_sq"):
            entry[name] = entry[name].view(opt._shapes[index])
    return state


def vector_pieces_held(opt: PreconditionedOptimizer) -> list[tuple[int, int, dict[str, Tensor]]]:
    """``(param_index, flat_start, AdamW state)`` of the pieces of vectors this rank holds,
    where the backend shards vectors: FSDP1's views, ZeRO's fragments."""
    if opt._flat_partitions():
        return [
            (index, start, {name: t.detach().clone() for name, t in state.items()})
            for index, (start, state) in sorted(opt._fragment_state.items())
        ]
    assert opt._router is not None
    index_of = {id(p): i for i, p in enumerate(opt._all_params())}
    starts = {index: start for index, start, _ in opt._router.checkpoint_layout().vector_pieces}
    held = ((index_of.get(id(p)), state) for p, state in opt.state.items() if state)
    return [
        (index, starts[index], {n: t.detach().clone() for n, t in state.items()})
        for index, state in held
        if index in starts
    ]


def whole_vector_states(opt: PreconditionedOptimizer) -> dict[int, tuple[bool, dict[str, Tensor]]]:
    """FSDP1's API path: every vector's AdamW state on every rank (a collective; FSDP's own
    API gathers state to every rank anyway), with whether this rank holds its first element."""
    assert opt._router is not None
    mine = vector_pieces_held(opt)
    first_here = {index for index, start, _ in mine if start == 0}
    return {
        index: (index in first_here, entry)
        for index, entry in assemble_vectors(opt, opt._router.gather_objects(mine)).items()
    }


def vectors_to(opt: PreconditionedOptimizer, writer: int) -> dict[int, dict[str, Tensor]] | None:
    """Whole vectors assembled from the ranks' pieces on ``writer`` only (a collective)."""
    assert opt._router is not None
    pieces = opt._router.gather_objects_to(vector_pieces_held(opt), writer)
    return None if pieces is None else assemble_vectors(opt, pieces)


def partitioned_groups(opt: PreconditionedOptimizer) -> list[dict[str, Any]]:
    """The param groups as ``torch.optim`` saves them, where the backend hands ``step()`` flat
    partitions (ZeRO): indices of the planned parameters."""
    assert opt._planned is not None
    groups, first = [], 0
    for group, params in zip(opt._groups(), opt._planned):
        packed = {key: value for key, value in group.items() if key != "params"}
        packed["params"] = list(range(first, first + len(params)))
        first += len(params)
        groups.append(packed)
    return groups


# ---------------------------------------------------------------------------- save
def consolidate(opt: PreconditionedOptimizer, writer: int = 0) -> Consolidated:
    """The complete state on ``writer`` only (a collective where there are several ranks)."""
    router = opt._router
    if router is not None and router.world_size > 1:
        router.wait_for_every_rank(
            f"state_dict/{plan_signature(opt)}/{opt._checkpoint_calls}", opt.options.checkpoint_timeout,
            "assembling the complete state dict is a collective (each rank holds only the blocks it owns): "
            "call opt.consolidate_state_dict() on EVERY rank before `if rank == 0: opt.state_dict()`, or "
            "call state_dict() on every rank, or save each rank's shard with torch.distributed.checkpoint "
            "(get_optimizer_state_dict + dcp.save)",
            waiter=writer,
        )
        opt._checkpoint_calls += 1
    vectors = None
    # Where vectors are held in pieces (FSDP1's sharded views, ZeRO's fragments); decided the
    # same on every rank (a rank may hold no piece), as every collective must be.
    if router is not None and (router.checkpoint_layout().rank_local or opt._flat_partitions()):
        vectors = vectors_to(opt, writer)
    return Consolidated(opt._steps_taken, writer, blocks_to(opt, writer), vectors)


def plan_signature(opt: PreconditionedOptimizer) -> str:
    """The same on every rank for one optimizer (names the rendezvous of its collectives)."""
    plan = opt._plan
    if plan is None:
        return "unplanned"
    return f"{len(plan.blocks)}x{hash(tuple(block.shape for block in plan.blocks)) & 0xFFFFFFFF:08x}"


def state_dict(opt: PreconditionedOptimizer, consolidated: Consolidated | None) -> dict[str, Any]:
    """See :meth:`PreconditionedOptimizer.state_dict` and :mod:`.shards`."""
    router = opt._router
    layout = router.checkpoint_layout() if router is not None else CheckpointLayout()
    world = router.world_size if router is not None else 1
    if consolidated is not None and (consolidated.steps != opt._steps_taken or opt._sharded_depth > 0
                                     or shards.dcp_call() is not None):
        # Only the writer keeps a consolidation: one outdated by a step, or overridden by a
        # sharded request or FSDP's API, must not make it take another branch than the other
        # ranks (a collective mismatch).
        consolidated = None
    if layout.rank_local and consolidated is None:
        # FSDP1's API consolidates: this rank's blocks, and the vectors whose first element it holds.
        packed = torch_packed(opt)
        whole = whole_vector_states(opt)
        vectors = {index: entry for index, (holds_first, entry) in whole.items() if holds_first}
        return assemble(opt, packed, vectors, owned_blocks(opt))
    if consolidated is None and router is not None and shards.wants_sharded(opt, layout):
        return sharded_state_dict(opt)
    if consolidated is None:
        consolidated = consolidate(opt, 0)
    if consolidated.blocks is None:
        # Not the writer: no block, a dict that refuses to be saved or loaded, and the vectors
        # as references (FSDP2's DTensors: DCP's full-state-dict path gathers them on every
        # rank, so every rank must hand them over).
        assert router is not None
        packed = torch_packed(opt)
        partial = assemble(opt, packed, packed["state"], [])
        for group in partial["param_groups"]:
            group[shards.SHARD_TAG] = shards.partial_message(router.rank, consolidated.writer, world)
        return partial
    packed = torch_packed(opt)
    vectors = packed["state"] if consolidated.vectors is None else consolidated.vectors
    return assemble(opt, packed, vectors, consolidated.blocks)


def sharded_state_dict(opt: PreconditionedOptimizer) -> dict[str, Any]:
    """This rank's shard: its blocks, its vectors (whole where they are replicated, DTensors
    under FSDP2, fragments under ZeRO), and ``{}`` for every other parameter."""
    assert opt._router is not None
    packed = torch_packed(opt)
    if opt._flat_partitions():
        vectors = {
            index: {"flat_start": torch.tensor(start, dtype=torch.int64), **state}
            for index, start, state in vector_pieces_held(opt)
        }
        out = assemble(opt, packed, {}, owned_blocks(opt))
        for index, fragment in vectors.items():
            out["state"].setdefault(index, {})[FRAGMENT_KEY] = fragment
    else:
        out = assemble(opt, packed, packed["state"], owned_blocks(opt))
    for index in range(len(opt._all_params())):
        out["state"].setdefault(index, {})
    if shards.dcp_call() == shards.FULL_LOAD_TEMPLATE:
        # DCP fills this template from a full dict and keeps what the dict lacks: a block
        # counted -1 steps that survives the merge was not in the file (refused at load).
        for entry in out["state"].values():
            for key, block_state in entry.items():
                if key.startswith("block"):
                    block_state["step"] = torch.tensor(-1, dtype=torch.int64)
    if shards.dcp_call() is None:
        # Tagged where it could be loaded by mistake (torch.save of a rank's shard). DCP's
        # dicts carry no tag: DCP loads into templates, so the form is the load's, not the
        # saver's, and checkpoints of other forms (FSDP1's, older ones) keep loading.
        for group in out["param_groups"]:
            group[shards.SHARD_TAG] = shards.SHARDED
    return out


def torch_packed(opt: PreconditionedOptimizer) -> dict[str, Any]:
    """``torch.optim``'s own ``{state, param_groups}`` (vectors' state as references); under
    ZeRO, whose param groups hold flat partitions, the planned parameters' groups and no state."""
    if opt._flat_partitions():
        return {"state": {}, "param_groups": partitioned_groups(opt)}
    return torch.optim.Optimizer.state_dict(opt)


def assemble(opt: PreconditionedOptimizer, packed: dict[str, Any], vectors: Mapping[int, Mapping[str, Tensor]],
             blocks: Iterable[BlockEntry]) -> dict[str, Any]:
    """``packed`` (torch.optim's dict) with vectors under ``"adamw"``, blocks under ``"block{b}"``
    and the tags in every param group."""
    packed["state"] = {index: {"adamw": entry} for index, entry in vectors.items()}
    for param_index, key, value in blocks:
        packed["state"].setdefault(param_index, {})[key] = value
    for index, group in enumerate(packed["param_groups"]):
        group.update(tags(opt, index))
    return packed


def tags(opt: PreconditionedOptimizer, group_index: int) -> dict[str, Any]:
    """What a checkpoint's param group must match to load: the algorithm, the format, and the
    options its blocks were planned with (the group's own, else the optimizer's)."""
    _, max_dim, max_factor_dim = opt._plan_values(group_index)
    return {
        TAG_ALGORITHM: type(opt).__name__,
        TAG_FORMAT: FORMAT_VERSION,
        TAG_BLOCK_PLAN: f"max_preconditioner_dim={max_dim}, max_factor_dim={max_factor_dim}, "
                        f"precondition_1d={opt.options.precondition_1d}",
    }


def _plan_fields(tag: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in tag.split(", ") if "=" in part)


def same_plan(saved: str, ours: str) -> bool:
    """Whether a saved ``lp_block_plan`` tag matches ours. A tag without ``max_factor_dim``
    predates identity sides (every side had a factor): it matches on the other options, and
    the block state itself decides (:func:`validate_block_state` refuses a block whose
    factors differ, naming max_factor_dim), so checkpoints of models without such large dims
    keep loading."""
    saved_fields, our_fields = _plan_fields(saved), _plan_fields(ours)
    if "max_factor_dim" not in saved_fields:
        our_fields.pop("max_factor_dim", None)
    return saved_fields == our_fields


def check_tags(opt: PreconditionedOptimizer, saved: Mapping[str, Any]) -> None:
    """Refuse, before anything changes, a checkpoint of another algorithm, another block plan,
    a newer format, or one that is not ours at all (e.g. ``torch.optim.AdamW``'s)."""
    groups = saved["param_groups"]
    name = type(opt).__name__
    if len(groups) != len(opt._group_params):  # the groups as built (DeepSpeed may cut param_groups)
        raise ValueError(f"checkpoint has {len(groups)} param groups, this {name} has {len(opt._group_params)}")
    fields = [f.name for f in dataclasses.fields(opt.algorithm.config_type)]
    for index, group in enumerate(groups):
        ours = tags(opt, index)
        algorithm = group.get(TAG_ALGORITHM)
        if algorithm is not None and algorithm != ours[TAG_ALGORITHM]:
            raise ValueError(
                f"checkpoint was written by {algorithm}; this optimizer is {ours[TAG_ALGORITHM]}: their "
                "state is not interchangeable (load it into the optimizer that wrote it)"
            )
        version = group.get(TAG_FORMAT, 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format {version!r} is newer than this version of lightning_precond reads "
                f"(<= {FORMAT_VERSION}); upgrade lightning_precond"
            )
        plan = group.get(TAG_BLOCK_PLAN)
        if plan is not None and not same_plan(plan, ours[TAG_BLOCK_PLAN]):
            raise ValueError(
                f"checkpoint blocks of param group {index} were planned with {plan}; this optimizer plans "
                f"them with {ours[TAG_BLOCK_PLAN]}"
            )
        missing = [name for name in fields if name not in group and name not in LATER_FIELDS]
        if missing:
            raise ValueError(
                f"checkpoint param group {index} lacks {missing}, which {ours[TAG_ALGORITHM]} needs: it was not "
                "written by this optimizer (a torch.optim or other optimizer's checkpoint?)"
            )


# Hyperparameters added after checkpoints were first written (issues 16, 17). A checkpoint that
# predates one takes the value this optimizer's group was built with (pass the old behaviour's
# value, e.g. SOAP(..., shifted_refresh=False), to continue such a run exactly as before).
LATER_FIELDS = ("reference", "shifted_refresh", "debias", "init_factor", "max_clamp_value", "matmul_dtype")


def _untagged(saved: Mapping[str, Any], current: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    groups = []
    for index, g in enumerate(saved["param_groups"]):
        group = {k: v for k, v in g.items() if k not in TAGS}
        if current is not None and index < len(current):
            for name in LATER_FIELDS:
                if name not in group and name in current[index]:
                    group[name] = current[index][name]
        groups.append(group)
    return {**saved, "param_groups": groups}


# ---------------------------------------------------------------------------- load
def load_state_dict(opt: PreconditionedOptimizer, saved: Mapping[str, Any]) -> None:
    """See :meth:`PreconditionedOptimizer.load_state_dict`."""
    base_load = torch.optim.Optimizer.load_state_dict
    shard = next((g[shards.SHARD_TAG] for g in saved["param_groups"] if shards.SHARD_TAG in g), None)
    if isinstance(shard, shards.NotACheckpoint):
        raise ValueError(shards.refusal(shard))
    check_tags(opt, saved)
    sharded = shard is not None
    saved = _untagged(saved, opt._group_dicts)
    entries = {key: split_entry(entry) for key, entry in saved["state"].items()}
    before = opt._router.checkpoint_layout() if opt._router is not None else CheckpointLayout(
        per_rank_files=opt._deepspeed_took_over())
    if sharded and not shards.accepts_sharded(opt, before):  # refused before anything is planned
        raise ValueError(shards.refusal(shard))
    if (opt._plan is None and not sharded and not opt._deepspeed_took_over()
            and not any(blocks for _, blocks in entries.values())):
        # Nothing planned yet and no block state to place: load hyperparameters (and any
        # AdamW state) without planning, since backends may still swap the parameters
        # (Accelerate reloads a fresh optimizer's own state_dict before FSDP2 shards).
        state = {key: plain for key, (plain, _) in entries.items() if plain}
        base_load(opt, {**saved, "state": state})
        opt._group_dicts = list(opt.param_groups)
        opt._configs.clear()
        return
    opt._setup()
    assert opt._plan is not None and opt._router is not None
    layout = opt._router.checkpoint_layout()
    rank_local = layout.rank_local
    # DCP loads into this rank's own template (the sharded form), so a DCP load needs the
    # blocks this rank owns, whichever form saved the checkpoint.
    via_dcp = not rank_local and shards.dcp_call() is not None
    # Saved keys are indices, or FQNs when torch.distributed.checkpoint wrote them; as in
    # torch.optim, they map to parameters by position in the saved param groups.
    saved_keys = [key for group in saved["param_groups"] for key in group["params"]]
    position = {key: index for index, key in enumerate(saved_keys)}
    blocks_by_param: dict[int, dict[str, Mapping[str, Tensor]]] = {}
    plain_state: dict[Any, Any] = {}
    for key, (plain, blocks) in entries.items():
        if plain:
            plain_state[key] = plain
        if blocks:
            if key not in position:
                raise ValueError(f"checkpoint has state for {key!r}, which is in none of its param groups")
            blocks_by_param[position[key]] = blocks
    owned = {block.id for bucket in opt._buckets for block in bucket.blocks}
    # A shard holds (at least) the blocks this rank owns; a full dict every block, or none at
    # all when it was saved before the first step.
    # Decided alike on every rank (a rank may own no block), since a fresh start re-plans.
    fresh = not sharded and not (
        opt._router.any_rank(bool(blocks_by_param)) if (rank_local or via_dcp) else blocks_by_param
    )
    if not fresh:
        validate_block_state(opt, blocks_by_param, owned if (rank_local or sharded or via_dcp) else None)
    if rank_local:
        plain_state = local_vector_pieces(opt, plain_state, position, layout.vector_pieces)
    elif not opt._flat_partitions():
        check_vector_state(opt, plain_state, position)
    if opt._flat_partitions():
        load_partitioned(opt, saved, {position[k]: v for k, v in plain_state.items() if k in position},
                         layout.vector_pieces, sharded)
    else:
        base_load(opt, {**saved, "state": plain_state})
        opt._group_dicts = list(opt.param_groups)
    opt._configs.clear()
    if fresh:  # saved before the first step: start fresh
        opt._replan()
        opt._setup()
        return
    for bucket in opt._buckets:
        tensors = bucket.tensors()
        for i, block in enumerate(bucket.blocks):
            entry = blocks_by_param[block.param_index][f"block{block.block_index}"]
            for name, tensor in tensors.items():
                tensor[i].copy_(entry[name])
            bucket.records[i] = unpack_record(entry, bucket.sides)


def check_vector_state(opt: PreconditionedOptimizer, plain_state: Mapping[Any, Any], position: Mapping[Any, int]) -> None:
    """Every saved AdamW moment has its parameter's shape (else it would fail at the next step,
    after the matrices were updated)."""
    params = opt._all_params()
    for key, entry in plain_state.items():
        index = position.get(key)
        if index is None or index >= len(params):
            continue
        for name in ("exp_avg", "exp_avg_sq"):
            value = entry.get(name)
            if isinstance(value, Tensor) and tuple(value.shape) != tuple(params[index].shape):
                raise ValueError(
                    f"checkpoint state {name!r} of {opt._name_of_index(index)} has shape {tuple(value.shape)}, "
                    f"expected {tuple(params[index].shape)} (different model?)"
                )


def local_vector_pieces(opt: PreconditionedOptimizer, plain_state: Mapping[Any, Any], position: Mapping[Any, int],
                        pieces_here: Iterable[tuple[int, int, int]]) -> dict[Any, Any]:
    """Under FSDP1: the vectors' saved AdamW state cut to the pieces this rank holds.

    A saved tensor is either already this piece (FSDP sliced it) or the whole vector.
    """
    pieces = {index: (start, numel) for index, start, numel in pieces_here}
    local: dict[Any, Any] = {}
    for key, entry in plain_state.items():
        index = position.get(key)
        if index not in pieces:
            continue  # a vector this rank holds nothing of
        start, numel = pieces[index]
        whole = math.prod(opt._shapes[index])
        cut = {}
        for name, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                if value.numel() == whole:
                    value = value.reshape(-1)[start : start + numel]
                elif value.numel() != numel:
                    raise ValueError(
                        f"checkpoint state {name!r} of {opt._name_of_index(index)} has {value.numel()} "
                        f"elements; expected the whole vector ({whole}) or this rank's piece ({numel})"
                    )
            cut[name] = value
        local[key] = cut
    return local


def load_partitioned(opt: PreconditionedOptimizer, saved: Mapping[str, Any], plain_state: Mapping[int, Mapping[str, Any]],
                     pieces_here: Iterable[tuple[int, int, int]], sharded: bool = False) -> None:
    """Hyperparameters and vector fragments under DeepSpeed ZeRO (the param groups hold flat
    partitions, so ``torch.optim``'s loader cannot map them)."""
    assert opt._planned is not None
    saved_groups = saved["param_groups"]
    sizes = [len(group["params"]) for group in saved_groups]
    expected = [len(params) for params in opt._planned]
    if sizes != expected:
        raise ValueError(
            f"checkpoint param groups hold {sizes} parameters, this optimizer's hold {expected} "
            "(different model or param groups?)"
        )
    fragments: dict[int, tuple[int, dict[str, Tensor]]] = {}
    for index, start, numel in pieces_here:
        entry = plain_state.get(index, {})
        if FRAGMENT_KEY in entry:  # a shard: this rank's own fragment, saved at this world size
            fragment = entry[FRAGMENT_KEY]
            saved_start, saved_numel = int(fragment["flat_start"]), fragment["exp_avg"].numel()
            if (saved_start, saved_numel) != (start, numel):
                raise ValueError(
                    f"checkpoint holds elements [{saved_start}, {saved_start + saved_numel}) of "
                    f"{opt._name_of_index(index)}'s AdamW state, this rank holds [{start}, {start + numel}): "
                    "a ZeRO shard loads only at the world size and partitioning that saved it "
                    "(resume at another world size with lightning_precond.checkpoints.load_shards)"
                )
            fragments[index] = (start, {n: fragment[n].detach().clone() for n in ("step", "exp_avg", "exp_avg_sq")})
            fragments[index][1]["step"] = fragments[index][1]["step"].to(torch.float32)
            continue
        if "exp_avg" not in entry:
            if sharded:
                raise ValueError(
                    f"this rank's shard lacks its piece of {opt._name_of_index(index)}'s AdamW state "
                    "(a shard of another rank, or of another world size? see lightning_precond.checkpoints.load_shards)"
                )
            continue
        state = {"step": entry["step"].detach().clone().to(torch.float32)}
        for name in ("exp_avg", "exp_avg_sq"):
            flat = entry[name].reshape(-1)
            if flat.numel() != math.prod(opt._shapes[index]):
                raise ValueError(
                    f"checkpoint state {name!r} of {opt._name_of_index(index)} has {flat.numel()} "
                    f"elements, expected {math.prod(opt._shapes[index])}"
                )
            state[name] = flat[start : start + numel].detach().clone()
        fragments[index] = (start, state)
    for group, entry in zip(opt._groups(), saved_groups):
        group.update({key: value for key, value in entry.items() if key not in ("params", "param_names")})
    opt._fragment_state = fragments


def validate_block_state(
    opt: PreconditionedOptimizer, saved: Mapping[int, Mapping[str, Mapping[str, Tensor]]], required: set[str] | None = None
) -> None:
    """Raise ValueError naming the parameter unless ``saved`` fits this optimizer's plan.

    ``required``: the ids of the blocks that must be present (default: all of them, and no
    others per parameter).
    """
    assert opt._plan is not None
    expected: dict[int, dict[str, Block]] = {}
    for block in opt._plan.blocks:
        expected.setdefault(block.param_index, {})[f"block{block.block_index}"] = block
    for param_index in sorted(set(saved) - set(expected)):
        raise ValueError(
            f"checkpoint has preconditioner state for {opt._name_of_index(param_index)}, "
            "which this optimizer does not precondition (different model or max_preconditioner_dim?)"
        )
    for param_index, blocks in expected.items():
        name = opt._name_of_index(param_index)
        got = saved.get(param_index, {})
        if set(got) - set(blocks) or (required is None and set(got) != set(blocks)):
            raise ValueError(
                f"checkpoint blocks of {name} are {sorted(got)}, expected {sorted(blocks)} "
                "(different shape, max_preconditioner_dim or max_factor_dim?)"
            )
        for key, block in blocks.items():
            if required is not None and block.id not in required:
                continue
            if key not in got:
                raise ValueError(
                    f"checkpoint lacks {name} {key}, which this rank owns (under FSDP1, load "
                    "through FSDP.optim_state_dict_to_load or set_optimizer_state_dict, or a "
                    "state_dict() taken after consolidate_state_dict())"
                )
            m, n = block.shape
            config = opt._config(block.group_index)
            sides = block.factored(opt.algorithm.sides)
            shapes = opt.algorithm.state_shapes(m, n, config, sides)
            for state_name, shape in shapes.items():
                tensor = got[key].get(state_name)
                if tensor is None or tuple(tensor.shape) != shape:
                    found = None if tensor is None else tuple(tensor.shape)
                    raise ValueError(
                        f"checkpoint state {state_name!r} of {name} {key} has shape {found}, "
                        f"expected {shape} (different model or algorithm?)"
                    )
            counters = {"step", "initialized", "skipped_steps"} | {f"{side}.{f}" for side in sides for f in RECORD_FIELDS}
            missing = counters - set(got[key])
            if missing:
                raise ValueError(f"checkpoint state of {name} {key} lacks {sorted(missing)}")
            if int(got[key]["step"]) < 0:
                raise ValueError(
                    f"checkpoint lacks {name} {key}, which this rank owns: the full state dict handed to "
                    "set_optimizer_state_dict(full_state_dict=True) does not hold every block (one rank's shard? "
                    "save full checkpoints with get_optimizer_state_dict(..., full_state_dict=True) or "
                    "opt.state_dict() on rank 0)"
                )
            unexpected = set(got[key]) - set(shapes) - counters
            if unexpected:
                identity = f" ({' and '.join(block.identity)} side without a factor here)" if block.identity else ""
                raise ValueError(
                    f"checkpoint state of {name} {key} holds {sorted(unexpected)}, which "
                    f"{type(opt).__name__} does not keep{identity} (a checkpoint of another algorithm, "
                    "or planned with another max_factor_dim?)"
                )
