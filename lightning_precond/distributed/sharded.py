"""Routing for sharded parameters (FSDP2, FSDP1, ZeRO): pieces of flat ranges to block owners.

Every sharding backend this library supports hands each rank *contiguous ranges of the
flattened (row-major) parameters*: FSDP2's dim-0 row chunks, FSDP1's flat-parameter shards,
ZeRO's partition fragments. A :class:`LocalPiece` describes one such range. The router:

1. gathers, with ONE ``all_to_all``, every piece of every block to the block's owner (the
   same owner as under DDP, so the update equals the single-process one);
2. lets the engine compute on full blocks;
3. scatters, with ONE ``all_to_all`` back, the update pieces to the ranks that hold them,
   which apply ``value <- decay * value + delta`` in place in the backend's storage.

A (block, piece) intersection, a *segment*, is one contiguous run of the block buffer and at
most three rectangles of the piece (:class:`_Run`: a partial row, whole rows, a partial
row; one run when the block spans whole rows). Every route is built once, at the first step,
from the pieces' geometry (one ``all_gather_object``); a step then only takes views:

* gather: the message is the sender's screen verdict (vectors' gradients finite, so that the
  ranks agree on it without a collective of its own) and the segments' gradient values, one
  ``torch.cat`` of views of the pieces' gradients; the owner assembles its blocks with one
  ``torch.cat`` of views of what it received. A piece without a gradient sends zeros: a
  block whose gradient is zero everywhere is skipped by the engine's screen exactly as one
  without a gradient.
* scatter: each segment is one flag (block updated) followed by its update values, one
  ``torch.cat`` at the owner; the holder applies them run by run, with the decay factor of
  the block's group where the flag is set (:class:`~.router.DecayFactors`, on the device).

Per step: no host sync, no tensor built from host values (but the group decays, when they
change) and one indexing op, of the scatter flags (index built once). The scatter completes
in ``end_step``, overlapping the vectors' AdamW.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..blocks import Block, BlockPlan
from ..ownership import assign_owners
from .router import BlockUpdate, DecayFactors, GroupCollectives, Router

__all__ = ["LocalPiece", "ShardedRouter"]


@dataclass
class LocalPiece:
    """This rank's elements ``[flat_start, flat_start + numel)`` of a flattened parameter."""

    param_index: int
    flat_start: int
    value: Tensor  # 1-D view into the backend's storage (updated in place)
    grad: Tensor | None  # 1-D gradient of the same elements, or None

    @property
    def numel(self) -> int:
        return self.value.numel()


@dataclass
class _Segment:
    block_index: int  # position in plan.blocks
    piece: int  # index into the holder's piece list
    block_offset: int  # first element inside the block buffer (row-major)
    length: int


@dataclass(frozen=True)
class _Run:
    """``rows`` runs of ``cols`` elements, ``stride`` apart, from element ``start`` of a piece."""

    start: int
    rows: int
    cols: int
    stride: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def of(self, flat: Tensor) -> Tensor:
        """This run as a view of the 1-D ``flat``: ``[cols]`` for one row, else ``[rows, cols]``."""
        if self.rows == 1:
            return flat.narrow(0, self.start, self.cols)
        return flat.narrow(0, self.start, (self.rows - 1) * self.stride + self.cols).unfold(0, self.cols, self.stride)


def _runs(block: Block, cols_total: int, offset: int, length: int, base: int) -> list[_Run]:
    """Elements ``[offset, offset + length)`` of ``block`` (row-major) as runs of the flattened
    parameter, counted from its element ``base``."""
    cols = block.cols

    def at(k: int) -> int:
        row, col = divmod(k, cols)
        return (block.row_start + row) * cols_total + block.col_start + col - base

    if cols == cols_total:  # whole rows: contiguous in the parameter too
        return [_Run(at(offset), 1, length, cols_total)]
    runs, k, end = [], offset, offset + length
    while k < end:
        col = k % cols
        if col or end - k < cols:  # a partial row
            n = min(cols - col, end - k)
            runs.append(_Run(at(k), 1, n, cols_total))
            k += n
        else:
            rows = (end - k) // cols
            runs.append(_Run(at(k), rows, cols, cols_total) if rows > 1 else _Run(at(k), 1, cols, cols_total))
            k += rows * cols
    return runs


def _block_flat_indices(block: Block, cols_total: int) -> Tensor:
    rows = torch.arange(block.row_start, block.row_start + block.rows)
    cols = torch.arange(block.col_start, block.col_start + block.cols)
    return (rows[:, None] * cols_total + cols[None, :]).reshape(-1)


def _segments(
    plan: BlockPlan, blocks: Sequence[int], geometry: Sequence[tuple[int, int, int]]
) -> list[list[_Segment]]:
    """For each block index in ``blocks``, its intersections with the pieces ``geometry``
    (``(param_index, flat_start, numel)`` per piece), in piece order.

    A block's flat indices ascend (row-major, columns contiguous), so each intersection is
    one contiguous run of the block buffer found by binary search.
    """
    by_param: dict[int, list[tuple[int, int, int]]] = {}
    for piece, (param_index, start, numel) in enumerate(geometry):
        if numel > 0:
            by_param.setdefault(param_index, []).append((piece, start, numel))
    out = []
    for b in blocks:
        block = plan.blocks[b]
        shape = plan.matrix_shapes[block.param_index]
        assert shape is not None
        found = []
        candidates = by_param.get(block.param_index, [])
        if candidates:
            indices = _block_flat_indices(block, shape[1])
            for piece, start, numel in candidates:
                lo = int(torch.searchsorted(indices, start))
                hi = int(torch.searchsorted(indices, start + numel))
                if hi > lo:  # contiguous in the block; inside the piece it strides by rows
                    found.append(_Segment(b, piece, lo, hi - lo))
        out.append(found)
    return out


def _spans(parts: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(start, length)`` spans with neighbours merged where one ends where the next starts."""
    merged: list[tuple[int, int]] = []
    for start, length in parts:
        if merged and merged[-1][0] >= 0 and start >= 0 and sum(merged[-1]) == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return merged


class ShardedRouter(GroupCollectives, Router):
    """Owner-computes routing over flat-range pieces; subclasses say where the pieces are."""

    vectors_sharded = True

    def __init__(self, group: Any = None, communication_dtype: torch.dtype = torch.float32) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sharded parameters need torch.distributed to be initialised")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.communication_dtype = communication_dtype
        self.bytes_last_step = 0
        self._pending: tuple[Any, Tensor, Tensor, list[float]] | None = None  # the scatter in flight

    # -- what subclasses provide ------------------------------------------------------
    def global_shapes(self, params: Sequence[Tensor]) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def local_pieces(self) -> list[LocalPiece]:
        """This rank's pieces, in a fixed order (called every step: grads change)."""
        raise NotImplementedError

    # -- set-up -----------------------------------------------------------------------
    def owner_candidates(self, plan: BlockPlan, everyone: Sequence[Sequence[tuple[int, int, int]]]) -> list[set[int]] | None:
        """Ranks allowed to own each block, given every rank's piece geometry (default: any)."""
        return None

    def setup(self, params: Sequence[Tensor], plan: BlockPlan, keep: Sequence[int] = ()) -> list[int]:
        self._params = list(params)
        self._is_matrix = [shape is not None for shape in plan.matrix_shapes]
        everyone = self._geometry_of_all_ranks(self.local_pieces())
        owners = assign_owners(plan.blocks, self.world_size, self.owner_candidates(plan, everyone))
        self.bind(params, plan, owners, range(len(plan.blocks)), everyone)
        return owners

    def _geometry_of_all_ranks(self, pieces: Sequence[LocalPiece]) -> list[list[tuple[int, int, int]]]:
        """``(param_index, flat_start, numel)`` of every rank's pieces (one ``all_gather_object``)."""
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, [(p.param_index, p.flat_start, p.numel) for p in pieces], group=self.group)
        return everyone

    def bind(
        self,
        params: Sequence[Tensor],
        plan: BlockPlan,
        owners: list[int],
        blocks: Sequence[int],
        everyone: list[list[tuple[int, int, int]]] | None = None,
    ) -> None:
        """Build the routes for ``blocks`` (indices into ``plan.blocks``) under the owner map
        of the whole plan (ZeRO binds one router per flat partition); ``everyone`` is every
        rank's piece geometry when the caller already gathered it."""
        self._params = list(params)
        self._plan = plan
        self._owners = owners
        pieces = self.local_pieces()
        mine = [(p.param_index, p.flat_start, p.numel) for p in pieces]
        if everyone is None:
            everyone = self._geometry_of_all_ranks(pieces)
        self._owned = [b for b in blocks if owners[b] == self.rank]
        self._owned_offsets: dict[int, int] = {}
        total = 0
        for b in self._owned:
            self._owned_offsets[b] = total
            total += plan.blocks[b].rows * plan.blocks[b].cols
        self._owned_numel = total
        self._index_of = {block.id: i for i, block in enumerate(plan.blocks)}
        # Each gather message starts with the sender's screen verdict (one per parameter, and
        # one for the blocks), so that ranks agree on it without a collective of its own.
        self._header = len(plan.matrix_shapes) + 1
        self._build_send(plan, mine)
        self._build_receive(plan, everyone)
        device = pieces[0].value.device if pieces else torch.device("cpu")
        self._device = device
        # Scatter: the segments this rank owns come back from itself, identical to what it
        # sends itself: applied from the send buffer while the others' travel.
        sent_at = sum(self._scatter_send_splits[: self.rank])  # this rank's chunk of its own message
        self._own_applied = _Applied([(piece, runs, group, sent_at + flag)
                                      for piece, runs, group, flag in self._applied[self.rank]], device)
        received_at = [sum(self._scatter_recv_splits[:d]) for d in range(self.world_size)]
        self._others_applied = _Applied([(piece, runs, group, received_at[d] + flag)
                                         for d, routes in enumerate(self._applied) if d != self.rank
                                         for piece, runs, group, flag in routes], device)
        dtype = self.communication_dtype
        # The flags of the scatter message, sliced (never written) into it.
        self._flag_values = {False: torch.zeros(1, dtype=dtype, device=device),
                             True: torch.ones(1, dtype=dtype, device=device)}
        self._zeros = torch.zeros(0, dtype=dtype, device=device)
        self._ones = torch.ones(0, dtype=dtype, device=device)

    def _build_send(self, plan: BlockPlan, mine: list[tuple[int, int, int]]) -> None:
        """The segments this rank holds, in message order (by owner, then block, then piece),
        with their runs in the local pieces."""
        per_block = _segments(plan, range(len(plan.blocks)), mine)
        # Gather: (piece, run) per destination; scatter back: per segment (piece, runs, group).
        self._gather_runs: list[list[tuple[int, _Run]]] = [[] for _ in range(self.world_size)]
        # Per destination: (piece, runs, param group, offset of the flag in its chunk back).
        self._applied: list[list[tuple[int, list[_Run], int, int]]] = [[] for _ in range(self.world_size)]
        self._gather_send_splits = [self._header] * self.world_size
        self._scatter_recv_splits = [0] * self.world_size
        for destination in range(self.world_size):
            position = 0
            for b, segments in enumerate(per_block):
                if self._owners[b] != destination:
                    continue
                block = plan.blocks[b]
                shape = plan.matrix_shapes[block.param_index]
                assert shape is not None
                for segment in segments:
                    runs = _runs(block, shape[1], segment.block_offset, segment.length, mine[segment.piece][1])
                    self._gather_runs[destination].extend((segment.piece, run) for run in runs)
                    self._applied[destination].append((segment.piece, runs, block.group_index, position))
                    position += 1 + segment.length
                    self._gather_send_splits[destination] += segment.length
                    self._scatter_recv_splits[destination] += 1 + segment.length

    def _build_receive(self, plan: BlockPlan, everyone: list[Any]) -> None:
        """Where each segment this rank receives (as owner) sits in its owned-block buffer."""
        placed = []  # (offset in the owned buffer, offset in the gather message, length)
        self._return_route: list[tuple[int, int, int]] = []  # scatter: (block, block offset, length)
        gather_splits = [self._header] * self.world_size
        scatter_splits = [0] * self.world_size
        self._headers_at: list[int] = []  # where each source's verdict sits in the gather message
        position = 0
        for source in range(self.world_size):
            self._headers_at.append(position)
            position += self._header
            per_block = _segments(plan, range(len(plan.blocks)), everyone[source])
            for b, segments in enumerate(per_block):
                if self._owners[b] != self.rank or b not in self._owned_offsets:
                    continue
                for segment in segments:
                    placed.append((self._owned_offsets[b] + segment.block_offset, position, segment.length))
                    self._return_route.append((b, segment.block_offset, segment.length))
                    position += segment.length
                    gather_splits[source] += segment.length
                    scatter_splits[source] += 1 + segment.length
        self._gather_recv_splits = gather_splits
        self._scatter_send_splits = scatter_splits
        # The owned buffer as spans of the received message in order, zeros (start -1) where
        # no rank holds an element. Sharded pieces tile each parameter; replicas (FSDP1's
        # NO_SHARD) overlap with equal values, and the last rank's are taken.
        spans, filled = [], 0
        for owned_at, at, length in sorted(placed, key=lambda p: (p[0], -p[1])):
            skip = min(max(filled - owned_at, 0), length)
            owned_at, at, length = owned_at + skip, at + skip, length - skip
            if length == 0:
                continue
            if owned_at > filled:
                spans.append((-1, owned_at - filled))
            spans.append((at, length))
            filled = owned_at + length
        if filled < self._owned_numel:
            spans.append((-1, self._owned_numel - filled))
        self._owned_spans = _spans(spans)

    # -- the step -----------------------------------------------------------------------
    def _exchange(self, send: Tensor, send_splits: list[int], recv_splits: list[int],
                  async_op: bool = False) -> tuple[Tensor, Any]:
        received = torch.empty(sum(recv_splits), dtype=send.dtype, device=send.device)
        work = dist.all_to_all_single(received, send, recv_splits, send_splits, group=self.group, async_op=async_op)
        self.bytes_last_step += (send.numel() + received.numel()) * send.element_size()
        return received, work

    def _zeros_of(self, numel: int) -> Tensor:
        """``numel`` zeros to slice into a message (kept: never written)."""
        if self._zeros.numel() < numel:
            self._zeros = torch.zeros(numel, dtype=self.communication_dtype, device=self._device)
        return self._zeros[:numel]

    def _ones_of(self, numel: int) -> Tensor:
        """``numel`` ones (a verdict that agrees to everything), kept: never written."""
        if self._ones.numel() < numel:
            self._ones = torch.ones(numel, dtype=self.communication_dtype, device=self._device)
        return self._ones[:numel]

    def _cat(self, parts: list[Tensor]) -> Tensor:
        if not parts:
            return torch.zeros(0, dtype=self.communication_dtype, device=self._device)
        return torch.cat(parts)

    def block_gradients(self, blocks: Sequence[Block]) -> list[Tensor | None]:
        return self.gather(blocks)[0]

    def gather(self, blocks: Sequence[Block], verdict: Tensor | None = None) -> tuple[list[Tensor | None], Tensor | None]:
        """Every owned block's gradient (zeros where no rank holds one: the screen skips an
        all-zero block as it skips a missing one), ``None`` for blocks routed elsewhere; and
        the minimum over ranks of ``verdict`` (``[num_params + 1]``), carried in the message."""
        self.bytes_last_step = 0
        pieces = self.local_pieces()
        self._pieces = pieces
        dtype = self.communication_dtype
        grads = [p.grad.reshape(-1).to(dtype) if p.grad is not None else None for p in pieces]
        header = self._ones_of(self._header) if verdict is None else verdict.to(device=self._device, dtype=dtype)
        parts = []
        for runs in self._gather_runs:
            parts.append(header)
            for piece, run in runs:
                grad = grads[piece]
                parts.append(self._zeros_of(run.numel) if grad is None else run.of(grad).reshape(-1))
        received, _ = self._exchange(self._cat(parts), self._gather_send_splits, self._gather_recv_splits)
        owned = self._cat([received.narrow(0, at, length) if at >= 0 else self._zeros_of(length)
                           for at, length in self._owned_spans])
        agreed = None
        if verdict is not None:
            agreed = torch.stack([received.narrow(0, at, self._header) for at in self._headers_at]).amin(0)
        out: list[Tensor | None] = []
        for block in blocks:
            start = self._owned_offsets.get(self._index_of[block.id])
            out.append(None if start is None else owned[start : start + block.rows * block.cols].view(block.shape))
        return out, agreed

    def apply_updates(self, updates: Sequence[BlockUpdate], decays: Sequence[float]) -> None:
        dtype = self.communication_dtype
        deltas = {self._index_of[u.block.id]: u.delta.reshape(-1).to(dtype) for u in updates}
        # Back along the reversed routes: what came from rank s goes back to rank s.
        parts = []
        for b, offset, length in self._return_route:
            delta = deltas.get(b)
            parts.append(self._flag_values[delta is not None])
            parts.append(self._zeros_of(length) if delta is None else delta.narrow(0, offset, length))
        send = self._cat(parts)
        received, work = self._exchange(send, self._scatter_send_splits, self._scatter_recv_splits, async_op=True)
        self._pending = (work, send, received, list(decays))  # send kept alive until the wait
        self._own_applied.apply(self._pieces, send, decays)

    def end_step(self) -> None:
        """Wait for the scatter (it overlapped this rank's own segments and the vectors' step)
        and apply what arrived."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        work, _, received, decays = pending
        work.wait()
        self._others_applied.apply(self._pieces, received, decays)


class _Applied:
    """Update segments applied from one scatter buffer, run by run: ``value <- factor * value +
    delta``, the factor its group's decay where the segment's flag is set, else 1 (a block not
    updated arrives as zeros). Every segment is applied, so no flag is read on the host."""

    def __init__(self, routes: list[tuple[int, list[_Run], int, int]], device: torch.device) -> None:
        # (piece, runs, offset of the first value in the buffer) per segment, from
        # (piece, runs, param group, offset of the flag in the buffer)
        self._routes = [(piece, runs, flag + 1) for piece, runs, _, flag in routes]
        self._flag_index = torch.tensor([flag for *_, flag in routes], dtype=torch.long).to(device)
        self._decay_factors = DecayFactors([group for _, _, group, _ in routes], device)

    def apply(self, pieces: Sequence[LocalPiece], buffer: Tensor, decays: Sequence[float]) -> None:
        if not self._routes:
            return
        factors = self._decay_factors(buffer[self._flag_index], decays)
        for k, (piece, runs, position) in enumerate(self._routes):
            value = pieces[piece].value
            for run in runs:
                target = run.of(value)
                delta = buffer.narrow(0, position, run.numel).view(target.shape)
                position += run.numel
                if factors is not None:
                    target.mul_(factors[k])
                target.add_(delta.to(target.dtype))
