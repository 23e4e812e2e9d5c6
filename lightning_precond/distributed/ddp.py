"""Replicated data parallelism (DDP, ``accelerate launch``, ``torchrun``): block ownership.

Every rank holds full parameters and identical (all-reduced) gradients. Each block is owned
by one rank (:func:`~lightning_precond.ownership.assign_owners`); only the owner keeps its
factors and runs its statistics, refreshes and scaling. The finished updates of all owners
reach every rank through ONE ``all_gather`` of packed buffers per step (one ``torch.cat``
of views), started in ``apply_updates`` and applied in ``end_step``, after the vectors'
AdamW and this rank's own blocks, which it overlaps.

Packed layout of a rank's buffer (every rank knows every layout, since the plan and the
owner map are pure functions of the shapes): for each block the rank owns, in plan order,
one flag (1: updated this step) followed by the ``rows * cols`` update (zeros when not updated).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..blocks import Block, BlockPlan
from ..ownership import assign_owners
from .fsdp import is_dtensor
from .router import BlockUpdate, DecayFactors, GroupCollectives, LocalRouter, apply_to_params

__all__ = ["ReplicatedRouter"]


class ReplicatedRouter(GroupCollectives, LocalRouter):
    """Owner-computes routing for replicated parameters; one all-gather per step.

    Gradients are read locally as in one process (DDP already averaged them).
    """

    def __init__(self, group: Any = None, communication_dtype: torch.dtype = torch.float32) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed=<process group> needs torch.distributed to be initialised first"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.communication_dtype = communication_dtype
        self.bytes_last_step = 0
        self._pending: tuple[Any, Tensor, Tensor, list[float]] | None = None  # the all-gather in flight

    def setup(self, params: Sequence[Tensor], plan: BlockPlan, keep: Sequence[int] = ()) -> list[int]:
        for p in params:
            if is_dtensor(p):
                raise ValueError(
                    "parameters are DTensors (FSDP2 / tensor parallel): block routing for "
                    "sharded parameters is not supported yet; use DDP, or distributed=None to "
                    "precondition each rank's local shard independently"
                )
        self._params = list(params)
        self._shapes = plan.matrix_shapes
        self._blocks = plan.blocks
        owners = assign_owners(plan.blocks, self.world_size, keep=keep)
        self._owned_by: list[list[Block]] = [[] for _ in range(self.world_size)]
        for block, owner in zip(plan.blocks, owners):
            self._owned_by[owner].append(block)
        sizes = [sum(1 + b.rows * b.cols for b in blocks) for blocks in self._owned_by]
        self._chunk = max(sizes) if sizes else 0
        # Per block: (block, offset of its update, offset of its flag); this rank's own
        # blocks in its packed buffer, the others' in the gathered one.
        own: list[tuple[Block, int, int]] = []
        others: list[tuple[Block, int, int]] = []
        for rank, blocks in enumerate(self._owned_by):
            offset = 0 if rank == self.rank else rank * self._chunk
            for block in blocks:
                (own if rank == self.rank else others).append((block, offset + 1, offset))
                offset += 1 + block.rows * block.cols
        self._device = params[0].device if params else torch.device("cpu")
        self._own = _Applied(own, self._device)
        self._others = _Applied(others, self._device)
        dtype = self.communication_dtype
        # Sliced (never written) into the packed buffer: the flags, and zeros for blocks not
        # updated this step and for the padding up to the chunk.
        self._flag_values = {False: torch.zeros(1, dtype=dtype, device=self._device),
                             True: torch.ones(1, dtype=dtype, device=self._device)}
        self._zeros = torch.zeros(0, dtype=dtype, device=self._device)
        return owners

    def _zeros_of(self, numel: int) -> Tensor:
        if self._zeros.numel() < numel:
            self._zeros = torch.zeros(numel, dtype=self.communication_dtype, device=self._device)
        return self._zeros[:numel]

    def apply_updates(self, updates: Sequence[BlockUpdate], decays: Sequence[float]) -> None:
        if self._chunk == 0:
            return
        mine = {u.block.id: u for u in updates}
        dtype = self.communication_dtype
        parts, packed = [], 0
        for block in self._owned_by[self.rank]:
            update = mine.get(block.id)
            parts.append(self._flag_values[update is not None])
            size = block.rows * block.cols
            parts.append(self._zeros_of(size) if update is None else update.delta.reshape(-1).to(dtype))
            packed += 1 + size
        if packed < self._chunk:
            parts.append(self._zeros_of(self._chunk - packed))
        send = torch.cat(parts)
        received = torch.empty(self.world_size * self._chunk, dtype=dtype, device=self._device)
        work = dist.all_gather_into_tensor(received, send, group=self.group, async_op=True)
        self.bytes_last_step = received.numel() * received.element_size()
        self._pending = (work, send, received, list(decays))  # send kept alive until the wait
        # While the others' updates travel, this rank's own apply from the packed buffer: the
        # values the others receive, through the same operations, so replicas stay identical.
        self._own.apply(self._params, self._shapes, send, decays)

    def end_step(self) -> None:
        """Wait for the all-gather (it overlapped the vectors' step) and apply what arrived."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        work, _, received, decays = pending
        work.wait()
        self._others.apply(self._params, self._shapes, received, decays)


class _Applied:
    """Blocks applied from one packed buffer: ``(block, offset of its update, offset of its
    flag)`` each. A block not updated this step (flag 0) arrives as zeros and takes the factor
    1, so every block is applied and no flag is read on the host: no sync beyond the step's one."""

    def __init__(self, layout: list[tuple[Block, int, int]], device: torch.device) -> None:
        self._layout = layout
        self._flag_index = torch.tensor([flag for _, _, flag in layout], dtype=torch.long, device=device)
        self._decay_factors = DecayFactors([b.group_index for b, _, _ in layout], device)

    def apply(self, params: Sequence[Tensor], shapes: Sequence[tuple[int, int] | None], buffer: Tensor,
              decays: Sequence[float]) -> None:
        if not self._layout:
            return
        factors = self._decay_factors(buffer[self._flag_index], decays)
        applied = [BlockUpdate(block, buffer[start : start + block.rows * block.cols].view(block.shape))
                   for block, start, _ in self._layout]
        apply_to_params(params, shapes, applied, decays if factors is None else factors)
