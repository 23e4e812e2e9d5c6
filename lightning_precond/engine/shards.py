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
    for opt in optimizers:
        opt._sharded_depth += 1
    try:
        yield
    finally:
        for opt in optimizers:
            opt._sharded_depth -= 1


def dcp_call() -> str | None:
    """``"full"`` / ``"sharded"`` when called (through the optimizer) from DCP's optimizer
    state-dict functions, by their ``full_state_dict`` option; ``None`` otherwise.

    DCP passes no option to ``Optimizer.state_dict()``; its private ``_StateDictInfo`` is the
    local ``info`` of ``_get_optim_state_dict`` / ``_load_optim_state_dict`` (torch 2.4 to
    2.13; integration tests pin it). Unknown layouts read as ``None``: the full form, correct
    but gathered.
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
                return "full" if full else "sharded"
        frame = frame.f_back
    return None


def wants_sharded(opt: PreconditionedOptimizer, layout: CheckpointLayout) -> bool:
    """Whether ``state_dict()`` returns this rank's shard now."""
    return opt._sharded_depth > 0 or layout.per_rank_files or dcp_call() == "sharded"


def accepts_sharded(opt: PreconditionedOptimizer, layout: CheckpointLayout) -> bool:
    """Whether ``load_state_dict()`` may take a shard now (DCP also passes one, completed
    with the saved blocks, on its full-state-dict load path)."""
    return opt._sharded_depth > 0 or layout.per_rank_files or dcp_call() is not None


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
def _template(opt: PreconditionedOptimizer, block: Block) -> dict[str, Tensor]:
    """A block's state tensors as the algorithm allocates them (names, shapes, dtypes), on
    the meta device: what the writer receives into."""
    from ..algorithms.base import tensor_fields

    param = opt._all_params()[block.param_index]
    m, n = block.shape
    state = opt.algorithm.create_state(
        1, m, n, opt._config(block.group_index), opt._state_dtype(param), torch.device("meta"),
        block.factored(opt.algorithm.sides),
    )
    return {name: t[0] for name, t in tensor_fields(state).items()}


def _by_dtype(tensors: dict[str, Tensor]) -> dict[torch.dtype, list[str]]:
    out: dict[torch.dtype, list[str]] = {}
    for name, t in tensors.items():
        out.setdefault(t.dtype, []).append(name)
    return out


def stream_blocks_to(opt: PreconditionedOptimizer, dst: int) -> Iterator[tuple[Block, BlockRecord, dict[str, Tensor]]]:
    """Every block's state and record, yielded on rank ``dst`` (CPU tensors) in plan order;
    elsewhere nothing is yielded. A collective: every rank must exhaust it. Blocks travel one
    at a time from their owners, one message per state dtype, so a consumer that packs each
    as it comes holds the result plus one block."""
    router = opt._router
    assert router is not None
    rank = router.rank
    local = {block.id: (bucket, i) for bucket in opt._buckets for i, block in enumerate(bucket.blocks)}
    owned_records = [(bucket.blocks[i].id, record) for bucket in opt._buckets for i, record in enumerate(bucket.records)]
    records = router.gather_objects_to(owned_records, dst)
    record_of = dict(records) if records is not None else {}
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
            for names in _by_dtype(tensors).values():
                flat = torch.cat([tensors[n].reshape(-1) for n in names])
                router.send_to(flat.to(router.transport_device(flat.device)), dst)
            continue
        template = _template(opt, block)
        received: dict[str, Tensor] = {}
        for dtype, names in _by_dtype(template).items():
            numel = sum(template[n].numel() for n in names)
            flat = torch.empty(numel, dtype=dtype, device=router.transport_device(cpu))
            router.receive_from(flat, owner)
            flat = flat.to(cpu)
            offset = 0
            for n in names:
                size = template[n].numel()
                received[n] = flat[offset : offset + size].view(template[n].shape)
                offset += size
        yield block, record_of[block.id], received
