"""The two forms of a multi-rank state dict, which one a caller gets, and how a full one is
assembled on the rank that writes it.

* **Full**: one complete dict, the ``torch.optim`` contract. It is assembled on one *writer*
  rank only, block by block (one ``send``/``recv`` per block from its owner), so the writer
  holds the result plus one block and every other rank holds nothing beyond its own share.
  The other ranks get a :class:`NotACheckpoint` dict, which ``torch.save`` and
  ``load_state_dict`` refuse.
* **Sharded**: each rank's dict holds the blocks it owns, under keys that depend on block
  ids only, and an entry (``{}`` where it owns nothing) for every parameter, so
  ``torch.distributed.checkpoint`` writes each block once and reads, at any world size,
  exactly the blocks each rank will own. It is what a caller gets inside
  :func:`sharded_state_dict`, inside DCP's ``get_optimizer_state_dict`` with
  ``full_state_dict=False`` (what Lightning's ``ModelParallelStrategy`` and Accelerate's
  FSDP2 ``SHARDED_STATE_DICT`` call), and under DeepSpeed ZeRO (which writes one file per rank).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..distributed.router import CheckpointLayout
from .buckets import BlockRecord

if TYPE_CHECKING:
    from ..blocks import Block
    from .optimizer import PreconditionedOptimizer

__all__ = ["SHARD_TAG", "NotACheckpoint", "sharded_state_dict", "dcp_call", "wants_sharded", "accepts_sharded",
           "stream_blocks_to"]

# Param-group tag of a sharded dict outside DCP (DCP's dicts carry none, see checkpoint.py).
SHARD_TAG = "lp_shard"
SHARDED = "sharded"
# What dcp_call() says inside the template DCP builds for a full_state_dict=True load.
FULL_LOAD_TEMPLATE = "full load template"
_DCP_MODULE = "torch.distributed.checkpoint.state_dict"


class NotACheckpoint(str):
    """The shard tag of a non-writer rank's ``state_dict()``: a string for every consumer that
    only passes it along (DCP's full-state-dict path, Accelerate on non-main ranks), but
    pickling it (``torch.save``) raises, so a partial dict cannot be written by accident."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise RuntimeError(f"refusing to save: {self}")

    def __deepcopy__(self, memo: Any) -> NotACheckpoint:
        return self


@contextlib.contextmanager
def sharded_state_dict(*optimizers: PreconditionedOptimizer) -> Iterator[None]:
    """Inside this block, ``state_dict()`` of each optimizer returns this rank's shard and
    ``load_state_dict()`` accepts one (see the module docstring). For plain torch DCP::

        with lightning_precond.sharded_state_dict(opt):
            state = get_optimizer_state_dict(model, opt)
            dcp.save({"optim": state}, checkpoint_id=path)

    DCP's own ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (with the default
    ``full_state_dict=False``) select the sharded form without it; it is needed for other
    per-rank saves (``torch.save`` of each rank's shard).
    """
    selected: list[PreconditionedOptimizer] = []
    try:
        for opt in optimizers:
            inner = _unwrap(opt)
            inner._sharded_depth += 1
            selected.append(inner)
        yield
    finally:
        for inner in selected:
            inner._sharded_depth -= 1


def _unwrap(opt: Any) -> PreconditionedOptimizer:
    """Ours, behind Lightning's ``LightningOptimizer`` or Accelerate's ``AcceleratedOptimizer``."""
    from .optimizer import PreconditionedOptimizer

    inner = opt
    for _ in range(4):
        if isinstance(inner, PreconditionedOptimizer):
            return inner
        inner = getattr(inner, "_optimizer", None) or getattr(inner, "optimizer", None)
    raise ValueError(
        f"sharded_state_dict() takes lightning_precond optimizers, got {type(opt).__name__}"
    )


def dcp_call() -> str | None:
    """``"full"`` / ``"sharded"`` when called (through the optimizer) from DCP's optimizer
    state-dict functions, by their ``full_state_dict`` option, ``FULL_LOAD_TEMPLATE`` inside
    the template of a ``full_state_dict=True`` load; ``None`` otherwise.

    DCP passes no option to ``Optimizer.state_dict()``; its private ``_StateDictInfo`` is the
    local ``info`` of ``_get_optim_state_dict`` / ``_load_optim_state_dict`` (torch 2.4 to
    2.13; integration tests pin it). Were it not found, a save would take the full form, whose
    non-writer dicts refuse to be pickled: ``dcp.save`` would raise, never write a wrong file.
    """
    frame = sys._getframe(1)
    for _ in range(32):
        if frame is None:
            return None
        if frame.f_globals.get("__name__") == _DCP_MODULE and frame.f_code.co_name in (
            "_get_optim_state_dict",
            "_load_optim_state_dict",
        ):
            full = getattr(frame.f_locals.get("info"), "full_state_dict", None)
            if isinstance(full, bool):
                if frame.f_code.co_name == "_get_optim_state_dict" and _called_from_load(frame):
                    return FULL_LOAD_TEMPLATE  # the local template of a full_state_dict=True load
                return "full" if full else "sharded"
        frame = frame.f_back
    return None


def _called_from_load(frame: Any) -> bool:
    """Whether the next DCP frame above ``frame`` (decorators in between) is the loader's."""
    caller = frame.f_back
    for _ in range(4):
        if caller is None:
            return False
        if caller.f_globals.get("__name__") == _DCP_MODULE:
            return caller.f_code.co_name == "_load_optim_state_dict"
        caller = caller.f_back
    return False


def wants_sharded(opt: PreconditionedOptimizer, layout: CheckpointLayout) -> bool:
    """Whether ``state_dict()`` returns this rank's shard now."""
    return opt._sharded_depth > 0 or layout.per_rank_files or dcp_call() in ("sharded", FULL_LOAD_TEMPLATE)


def accepts_sharded(opt: PreconditionedOptimizer, layout: CheckpointLayout) -> bool:
    """Whether ``load_state_dict()`` may take a tagged shard now."""
    return opt._sharded_depth > 0 or layout.per_rank_files or dcp_call() == "sharded"


def refusal(tag: str) -> str:
    """Why a sharded or partial dict cannot be loaded here, and how to load it."""
    if isinstance(tag, NotACheckpoint):
        return str(tag)
    return (
        "this state dict is one rank's shard (the blocks that rank owned), not a complete checkpoint: load it through "
        "torch.distributed.checkpoint (dcp.load into get_optimizer_state_dict(model, opt), then "
        "set_optimizer_state_dict), or inside `with lightning_precond.sharded_state_dict(opt):` on "
        "the rank that saved it; for one complete file save opt.state_dict() on rank 0 after "
        "opt.consolidate_state_dict() on every rank"
    )


def partial_message(rank: int, writer: int, world_size: int) -> NotACheckpoint:
    return NotACheckpoint(
        f"this is rank {rank}'s state_dict(), not a checkpoint: the complete state of the {world_size} "
        f"ranks is assembled on rank {writer} only (each rank holds only the blocks it owns); save "
        f"rank {writer}'s, or save every rank's shard with torch.distributed.checkpoint "
        "(get_optimizer_state_dict + dcp.save)"
    )


# ---------------------------------------------------------------------------- assembling
def _layout(tensors: dict[str, Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of one block's state tensors, as its owner holds them."""
    return [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def _by_dtype(layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> dict[torch.dtype, list[tuple[str, tuple[int, ...]]]]:
    out: dict[torch.dtype, list[tuple[str, tuple[int, ...]]]] = {}
    for name, dtype, shape in layout:
        out.setdefault(dtype, []).append((name, shape))
    return out


def stream_blocks_to(opt: PreconditionedOptimizer, dst: int) -> Iterator[tuple[Block, BlockRecord, dict[str, Tensor]]]:
    """Every block's state and record, yielded on rank ``dst`` (CPU tensors) in plan order;
    elsewhere nothing is yielded. A collective: every rank must exhaust it. Blocks travel one
    at a time from their owners, one message per state dtype, so a consumer that packs each
    as it comes holds the result plus one block. Each owner's records carry the names,
    dtypes and shapes of its tensors, so the writer receives exactly what is sent."""
    router = opt._router
    assert router is not None
    rank = router.rank
    local = {block.id: (bucket, i) for bucket in opt._buckets for i, block in enumerate(bucket.blocks)}
    owned = []
    for bucket in opt._buckets:
        tensors = bucket.tensors()
        for i, (block, record) in enumerate(zip(bucket.blocks, bucket.records)):
            owned.append((block.id, record, _layout({n: t[i] for n, t in tensors.items()})))
    gathered = router.gather_objects_to(owned, dst)
    remote = {block_id: (record, layout) for block_id, record, layout in gathered} if gathered is not None else {}
    cpu = torch.device("cpu")
    # The blocks planned so far (kept while a group added by add_param_group awaits planning).
    for block, owner in zip(opt._planned_blocks, opt._owners):
        if owner != rank and rank != dst:
            continue
        if owner == rank:
            bucket, i = local[block.id]
            tensors = {name: t[i] for name, t in bucket.tensors().items()}
            if rank == dst:
                yield block, bucket.records[i], {n: t.to(cpu) for n, t in tensors.items()}
                continue
            for entries in _by_dtype(_layout(tensors)).values():
                flat = torch.cat([tensors[name].reshape(-1) for name, _ in entries])
                router.send_to(flat.to(router.transport_device(flat.device)), dst)
            continue
        record, layout = remote[block.id]
        device = router.transport_device(opt._all_params()[block.param_index].device)
        received: dict[str, Tensor] = {}
        for dtype, entries in _by_dtype(layout).items():
            flat = torch.empty(sum(math.prod(shape) for _, shape in entries), dtype=dtype, device=device)
            router.receive_from(flat, owner)
            flat = flat.to(cpu)
            offset = 0
            for name, shape in entries:
                size = math.prod(shape)
                received[name] = flat[offset : offset + size].view(shape)
                offset += size
        yield block, record, received
