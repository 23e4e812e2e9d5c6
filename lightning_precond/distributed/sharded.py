"""Routing for sharded parameters (FSDP2, FSDP1, ZeRO): pieces of flat ranges to block owners.

Every sharding backend this library supports hands each rank *contiguous ranges of the
flattened (row-major) parameters*: FSDP2's dim-0 row chunks, FSDP1's flat-parameter shards,
ZeRO's partition fragments. A :class:`LocalPiece` describes one such range. The router:

1. gathers, with ONE ``all_to_all``, every piece of every block to the block's owner (the
   same owner as under DDP, so the update equals the single-process one);
2. lets the engine compute on full blocks;
3. scatters, with ONE ``all_to_all`` back, the update pieces to the ranks that hold them,
   which apply ``value <- decay * value + delta`` in place in the backend's storage.

Within a message, each (block, sender) segment starts with one flag element (gradient
present / block updated) followed by the elements in ascending flat order. All index maps
are built once, at the first step, from the pieces' geometry (one ``all_gather_object``).
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
from .router import BlockUpdate, GroupCollectives, Router

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
        indices = _block_flat_indices(block, shape[1])
        found = []
        for piece, start, numel in by_param.get(block.param_index, []):
            lo = int(torch.searchsorted(indices, start))
            hi = int(torch.searchsorted(indices, start + numel))
            if hi > lo:  # contiguous in the block; inside the piece it strides by rows
                found.append(_Segment(b, piece, lo, hi - lo))
        out.append(found)
    return out


def _run_indices(indices: Tensor, segment: _Segment) -> Tensor:
    """Flat parameter indices of a segment's elements, relative to the block buffer run."""
    return indices[segment.block_offset : segment.block_offset + segment.length]


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
        self._piece_sizes = [p.numel for p in pieces]
        self._piece_starts = torch.tensor([0, *torch.tensor(self._piece_sizes, dtype=torch.long).cumsum(0).tolist()])
        self._owned = [b for b in blocks if owners[b] == self.rank]
        self._owned_offsets: dict[int, int] = {}
        total = 0
        for b in self._owned:
            self._owned_offsets[b] = total
            total += plan.blocks[b].rows * plan.blocks[b].cols
        self._owned_numel = total
        self._build_send(plan, pieces, mine)
        self._build_receive(plan, everyone)
        self._index_of = {block.id: i for i, block in enumerate(plan.blocks)}
        self._to_device(pieces[0].value.device if pieces else torch.device("cpu"))

    def _to_device(self, device: torch.device) -> None:
        """Turn the masks into index tensors on the pieces' device, once."""
        lengths = torch.tensor([s.length for s in self._send_segments], dtype=torch.long)
        values_at = self._send_value_mask.nonzero().squeeze(-1)
        self._send_values_at = values_at.to(device)
        self._send_local = self._send_index[values_at].to(device)
        self._send_value_segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)
        self._segment_group = torch.tensor(
            [self._plan.blocks[s.block_index].group_index for s in self._send_segments], dtype=torch.long
        ).to(device)
        self._send_gather = self._send_index.clamp_min(0).to(device)
        self._send_flag_slots = self._send_flag_slots.to(device)
        self._recv_values_at = self._recv_value_mask.nonzero().squeeze(-1).to(device)
        self._recv_positions = self._recv_positions.to(device)
        self._recv_flag_slots = self._recv_flag_slots.to(device)

    def _build_send(self, plan: BlockPlan, pieces: list[LocalPiece], mine: list[tuple[int, int, int]]) -> None:
        """Where each element this rank sends comes from in its concatenated local pieces."""
        per_block = _segments(plan, range(len(plan.blocks)), mine)
        order: list[_Segment] = []
        splits = [0] * self.world_size
        for destination in range(self.world_size):
            for b, segments in enumerate(per_block):
                if self._owners[b] != destination:
                    continue
                for segment in segments:
                    order.append(segment)
                    splits[destination] += 1 + segment.length
        self._send_segments = order
        self._send_splits = splits
        local_index, flag_slots, position = [], [], 0
        for segment in order:
            block = plan.blocks[segment.block_index]
            shape = plan.matrix_shapes[block.param_index]
            assert shape is not None
            flat = _run_indices(_block_flat_indices(block, shape[1]), segment)
            start = mine[segment.piece][1]
            flag_slots.append(position)
            local_index.append(torch.tensor([-1]))  # placeholder for the flag
            local_index.append(flat - start + int(self._piece_starts[segment.piece]))
            position += 1 + segment.length
        self._send_index = torch.cat(local_index) if local_index else torch.zeros(0, dtype=torch.long)
        self._send_flag_slots = torch.tensor(flag_slots, dtype=torch.long)
        self._send_value_mask = torch.ones(position, dtype=torch.bool)
        self._send_value_mask[self._send_flag_slots] = False

    def _build_receive(self, plan: BlockPlan, everyone: list[Any]) -> None:
        """Where each element this rank receives goes in its owned-block buffer."""
        positions, flag_slots, flag_blocks, position = [], [], [], 0
        splits = [0] * self.world_size
        for source in range(self.world_size):
            per_block = _segments(plan, range(len(plan.blocks)), everyone[source])
            for b, segments in enumerate(per_block):
                if self._owners[b] != self.rank:
                    continue
                for segment in segments:
                    flag_slots.append(position)
                    flag_blocks.append(b)
                    start = self._owned_offsets[b] + segment.block_offset
                    positions.append(torch.arange(start, start + segment.length))
                    position += 1 + segment.length
                    splits[source] += 1 + segment.length
        self._recv_splits = splits
        self._recv_positions = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
        self._recv_flag_slots = torch.tensor(flag_slots, dtype=torch.long)
        self._recv_flag_blocks = flag_blocks
        self._recv_value_mask = torch.ones(position, dtype=torch.bool)
        self._recv_value_mask[self._recv_flag_slots] = False

    # -- the step -----------------------------------------------------------------------
    def _exchange(self, send: Tensor, send_splits: list[int], recv_splits: list[int]) -> Tensor:
        received = torch.empty(sum(recv_splits), dtype=send.dtype, device=send.device)
        dist.all_to_all_single(received, send, recv_splits, send_splits, group=self.group)
        self.bytes_last_step += (send.numel() + received.numel()) * send.element_size()
        return received

    def block_gradients(self, blocks: Sequence[Block]) -> list[Tensor | None]:
        self.bytes_last_step = 0
        pieces = self.local_pieces()
        self._pieces = pieces
        dtype = self.communication_dtype
        device = pieces[0].value.device if pieces else torch.device("cpu")
        grads = [
            p.grad.reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel, dtype=dtype, device=device)
            for p in pieces
        ]
        local = torch.cat([*grads, torch.zeros(1, dtype=dtype, device=device)])
        present = torch.tensor(
            [pieces[s.piece].grad is not None for s in self._send_segments], dtype=dtype, device=device
        )
        send = local[self._send_gather]
        send[self._send_flag_slots] = present
        received = self._exchange(send, self._send_splits, self._recv_splits)
        owned = torch.zeros(self._owned_numel, dtype=dtype, device=device)
        owned[self._recv_positions] = received[self._recv_values_at]
        flags = received[self._recv_flag_slots].tolist()  # one host sync: which blocks have gradients
        has_grad = {b: False for b in self._owned}
        for b, flag in zip(self._recv_flag_blocks, flags):
            has_grad[b] = has_grad[b] or bool(flag)
        self._owned_buffer = owned
        out: list[Tensor | None] = []
        for block in blocks:
            b = self._index_of[block.id]
            if not has_grad.get(b, False):
                out.append(None)
                continue
            start = self._owned_offsets[b]
            out.append(owned[start : start + block.rows * block.cols].view(block.rows, block.cols))
        return out

    def apply_updates(self, updates: Sequence[BlockUpdate], decays: Sequence[float]) -> None:
        device = self._owned_buffer.device
        dtype = self.communication_dtype
        owned = torch.zeros(self._owned_numel, dtype=dtype, device=device)
        updated: set[int] = set()
        for update in updates:
            b = self._index_of[update.block.id]
            start = self._owned_offsets[b]
            owned[start : start + update.delta.numel()] = update.delta.reshape(-1)
            updated.add(b)
        # Back along the reversed routes: what came from rank s goes back to rank s.
        send = torch.empty(sum(self._recv_splits), dtype=dtype, device=device)
        send[self._recv_values_at] = owned[self._recv_positions]
        send[self._recv_flag_slots] = torch.tensor(
            [b in updated for b in self._recv_flag_blocks], dtype=dtype, device=device
        )
        received = self._exchange(send, self._recv_splits, self._send_splits)
        # Decay only the elements of updated blocks; all index work stays on the device.
        updated_segment = received[self._send_flag_slots] > 0
        group_decay = torch.tensor(list(decays), dtype=dtype, device=device)[self._segment_group]
        segment_decay = torch.where(updated_segment, group_decay, torch.ones_like(group_decay))
        pieces = self._pieces
        starts = self._piece_starts.tolist()
        total = starts[-1]
        delta = torch.zeros(total + 1, dtype=dtype, device=device)
        decay = torch.ones(total + 1, dtype=dtype, device=device)
        delta[self._send_local] = received[self._send_values_at]
        decay[self._send_local] = segment_decay[self._send_value_segment]
        for i, piece in enumerate(pieces):
            if piece.numel == 0:
                continue
            lo, hi = starts[i], starts[i + 1]
            piece.value.mul_(decay[lo:hi].to(piece.value.dtype)).add_(delta[lo:hi].to(piece.value.dtype))

