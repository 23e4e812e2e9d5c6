"""Where FSDP keeps each rank's piece of a parameter.

* FSDP2 (``fully_shard``): parameters and gradients are DTensors sharded on dim 0 in
  ``torch.chunk`` row blocks over a one-dimensional mesh; the local rows are a contiguous
  range of the flattened parameter.
* FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``): each original parameter's
  ``.data`` is a 1-D view of this rank's piece of the unit's flat parameter; the piece's
  position comes from the flat parameter's ``_shapes`` and ``_shard_param_infos``
  (private FSDP metadata, checked at set-up).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..blocks import BlockPlan
from .router import CheckpointLayout
from .sharded import LocalPiece, ShardedRouter

__all__ = ["FSDP2Router", "FSDP1Router", "is_dtensor", "is_fsdp1_flattened"]


def is_dtensor(tensor: Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def is_fsdp1_flattened(tensor: Tensor) -> bool:
    return bool(getattr(tensor, "_fsdp_flattened", False))


class FSDP2Router(ShardedRouter):
    """Pieces are the DTensors' local dim-0 row chunks."""

    def __init__(self, params: Sequence[Tensor], communication_dtype: torch.dtype) -> None:
        mesh = next(p for p in params if is_dtensor(p)).device_mesh
        for p in params:
            if not is_dtensor(p):
                raise ValueError(
                    "some parameters are DTensors and some are not; fully_shard the whole "
                    "model (or every module whose parameters the optimizer gets)"
                )
            placements = tuple(type(pl).__name__ for pl in p.placements)
            if p.device_mesh.ndim != 1 or placements != ("Shard",) or p.placements[0].dim != 0:
                raise ValueError(
                    f"unsupported DTensor layout {p.placements} on a {p.device_mesh.ndim}-D mesh: "
                    "only FSDP2's Shard(0) over one mesh dimension is supported (tensor "
                    "parallelism is not supported yet)"
                )
            if p.device_mesh != mesh:
                raise ValueError("all parameters must be sharded over the same device mesh")
        super().__init__(mesh.get_group(), communication_dtype)

    def global_shapes(self, params: Sequence[Tensor]) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in params]

    def local_pieces(self) -> list[LocalPiece]:
        pieces = []
        for index, p in enumerate(self._params):
            if not self._is_matrix[index]:
                continue
            rows = p.shape[0]
            per_rank = math.ceil(rows / self.world_size)
            first = min(self.rank * per_rank, rows)
            expected = min(per_rank, rows - first)
            local = p.to_local()
            if local.shape[0] != expected or tuple(local.shape[1:]) != tuple(p.shape[1:]):
                raise RuntimeError(
                    f"parameter {index} has local shape {tuple(local.shape)} on rank {self.rank}, "
                    f"expected {expected} rows of torch.chunk dim-0 sharding of {tuple(p.shape)}"
                )
            inner = math.prod(p.shape[1:])
            grad = p.grad.to_local().reshape(-1) if p.grad is not None else None
            pieces.append(LocalPiece(index, first * inner, local.view(-1), grad))
        return pieces


class FSDP1Router(ShardedRouter):
    """Pieces are FSDP1 ``use_orig_params=True`` views, located by the flat parameters.

    Checkpoints go through FSDP's own optimizer-state API (``FSDP.optim_state_dict`` /
    ``optim_state_dict_to_load``, which Lightning's ``FSDPStrategy`` and
    ``torch.distributed.checkpoint.state_dict`` call). That API gathers and re-slices every
    positive-dimensional tensor of a parameter's state as if it were shaped like the
    parameter, passes nested values through, and on load hands a parameter's entry only to
    the ranks holding a piece of it. Hence a rank-local checkpoint layout: the optimizer's
    ``state_dict()`` nests each block under its parameter on the block's owner, and every
    block's owner is chosen among the ranks holding a piece of its parameter.

    Under ``NO_SHARD`` FSDP's API passes each rank's state through untouched (it expects
    replicas), so there ``state_dict()`` is complete on every rank, as under DDP.
    """

    def __init__(self, module: torch.nn.Module, params: Sequence[Tensor], communication_dtype: torch.dtype) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        self._info: dict[int, tuple[tuple[int, ...], Any]] = {}
        group = None
        strategies = set()
        for unit in FSDP.fsdp_modules(module):
            handle = getattr(unit, "_handle", None)
            if handle is None:
                continue
            flat = handle.flat_param
            if flat._params is None:
                raise ValueError(
                    "FSDP1 with use_orig_params=False hands the optimizer flat parameters; "
                    "wrap with use_orig_params=True (Lightning's FSDPStrategy default)"
                )
            group = unit.process_group
            strategies.add(unit.sharding_strategy)
            for param, shape, info in zip(flat._params, flat._shapes, flat._shard_param_infos):
                self._info[id(param)] = (tuple(shape), info)
        missing = [i for i, p in enumerate(params) if id(p) not in self._info]
        if missing:
            raise ValueError(
                f"parameters {missing[:5]} of the optimizer are not in the FSDP module's flat "
                "parameters; build the optimizer from the wrapped module's parameters"
            )
        if ShardingStrategy.NO_SHARD in strategies and len(strategies) > 1:
            raise ValueError(
                f"FSDP1 units mix sharding strategies {sorted(s.name for s in strategies)}; NO_SHARD "
                "together with sharded units is not supported"
            )
        self._rank_local = strategies != {ShardingStrategy.NO_SHARD}
        super().__init__(group, communication_dtype)

    def global_shapes(self, params: Sequence[Tensor]) -> list[tuple[int, ...]]:
        return [self._info[id(p)][0] for p in params]

    def owner_candidates(self, plan: BlockPlan, everyone: Sequence[Sequence[tuple[int, int, int]]]) -> list[set[int]]:
        holders: dict[int, set[int]] = {}
        for rank, geometry in enumerate(everyone):
            for param_index, _, numel in geometry:
                if numel > 0:
                    holders.setdefault(param_index, set()).add(rank)
        return [holders[block.param_index] for block in plan.blocks]

    def vector_geometry(self) -> list[tuple[int, int, int]]:
        """``(param_index, flat_start, numel)`` of this rank's pieces of vectors."""
        out = []
        for index, p in enumerate(self._params):
            shape, info = self._info[id(p)]
            if not self._is_matrix[index] and info.in_shard:
                out.append((index, info.intra_param_start_idx, info.numel_in_shard))
        return out

    def checkpoint_layout(self) -> CheckpointLayout:
        return CheckpointLayout(rank_local=self._rank_local, vector_pieces=tuple(self.vector_geometry()))

    def local_pieces(self) -> list[LocalPiece]:
        pieces = []
        for index, p in enumerate(self._params):
            shape, info = self._info[id(p)]
            if not self._is_matrix[index]:
                continue
            if not info.in_shard:
                pieces.append(LocalPiece(index, 0, p.data.new_zeros(0), None))
                continue
            if p.data.numel() != info.numel_in_shard:
                raise RuntimeError(
                    f"parameter {index}: FSDP view has {p.data.numel()} elements, its shard info "
                    f"says {info.numel_in_shard} (unsupported FSDP version?)"
                )
            grad = p.grad.reshape(-1) if p.grad is not None else None
            pieces.append(LocalPiece(index, info.intra_param_start_idx, p.data.view(-1), grad))
        return pieces
