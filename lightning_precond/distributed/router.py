"""The router interface and the single-process router.

A router is the only code that knows where a backend keeps parameters and gradients. Every
backend provides the same few members: ``setup`` (bind, choose owners), ``block_gradients``
(each owned block's full gradient), ``apply_updates`` (updates back into the backend's
storage), the two small collectives, and ``checkpoint_layout`` -- what checkpoints must know
of the backend, read only by :mod:`lightning_precond.engine.checkpoint`. Which router runs is
decided in :mod:`lightning_precond.distributed.detect`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..blocks import Block, BlockPlan

__all__ = ["BlockUpdate", "CheckpointLayout", "DecayFactors", "Router", "LocalRouter", "GroupCollectives"]


@dataclass
class BlockUpdate:
    """What an owner sends for one block: ``W_block <- decay * W_block + delta``, where
    ``decay = 1 - lr * weight_decay`` of the block's param group (known on every rank)."""

    block: Block
    delta: Tensor  # [rows, cols]


@dataclass(frozen=True)
class CheckpointLayout:
    """What the checkpoint codec must know of a backend."""

    # FSDP1: FSDP's own optimizer-state API consolidates state_dict(), so each rank returns
    # only the blocks it owns (see FSDP1Router).
    rank_local: bool = False
    # ``(param_index, flat_start, numel)`` of the pieces of vectors held here, where the
    # backend shards vectors (FSDP1 views, ZeRO fragments); empty where vectors are whole.
    vector_pieces: tuple[tuple[int, int, int], ...] = ()
    # DeepSpeed ZeRO: the framework writes every rank's state_dict() to its own file and
    # hands each rank its own file back, so state_dict() is the rank's shard by default.
    per_rank_files: bool = False


class Router:
    """Moves block gradients to owners and block updates back to the backend's storage.

    ``owners[i]`` is the rank computing ``plan.blocks[i]``. A step is always: the engine asks
    :meth:`block_gradients` for the blocks this rank owns, computes, then calls
    :meth:`apply_updates` once with every owned update.
    """

    rank: int = 0
    world_size: int = 1
    # True where the backend hands step() flat partitions instead of the parameters
    # (DeepSpeed ZeRO): the engine then plans from the parameters it was built with, keeps
    # its own references to the param-group dicts, and updates vectors by fragments.
    flat_partitions: bool = False

    def plan_groups(self, current: list[list[Tensor]]) -> list[list[Tensor]]:
        """The parameters, per param group, that the block plan indexes (default: ``current``,
        the params in ``optimizer.param_groups`` at the first step)."""
        return current

    def begin_step(self, groups: Sequence[dict[str, Any]]) -> None:
        """Called at the start of ``step()`` with the param groups it was called with."""

    def end_step(self) -> None:
        """Called at the end of ``step()`` (also when it raised), after the vectors' AdamW:
        routers with collectives finish there the exchange :meth:`apply_updates` started, so
        that it overlaps the vectors' step (blocks and vectors touch disjoint storage)."""

    def vector_pieces(self) -> list[Any] | None:
        """Where the backend keeps vectors in flat fragments (``flat_partitions``): this rank's
        :class:`~lightning_precond.distributed.sharded.LocalPiece` s of the vectors stepped now;
        ``None`` means vectors are whole local parameters."""
        return None

    def checkpoint_layout(self) -> CheckpointLayout:
        return CheckpointLayout()

    def global_shapes(self, params: Sequence[Tensor]) -> list[tuple[int, ...]]:
        """The full shapes of the parameters, whatever this rank holds of them."""
        return [tuple(p.shape) for p in params]

    # Whether parameters may be added after the first step (add_param_group): the backend
    # must hold new parameters like the old ones (replicated or local), see ``setup``'s keep.
    supports_new_params: bool = False

    def setup(self, params: Sequence[Tensor], plan: BlockPlan, keep: Sequence[int] = ()) -> list[int]:
        """Bind to the parameters and return the owner of every block; ``keep``: the owners
        of the first blocks, planned before parameters were added."""
        raise NotImplementedError

    def block_gradients(self, blocks: Sequence[Block]) -> list[Tensor | None]:
        raise NotImplementedError

    def gather(self, blocks: Sequence[Block], verdict: Tensor | None = None) -> tuple[list[Tensor | None], Tensor | None]:
        """:meth:`block_gradients`, and ``verdict`` 's elementwise minimum over ranks when given
        (here an all-reduce; the sharded routers carry it in their gather instead)."""
        grads = self.block_gradients(blocks)
        return grads, None if verdict is None else self.all_ranks_min(verdict)

    def apply_updates(self, updates: Sequence[BlockUpdate], decays: Sequence[float]) -> None:
        """Apply every owner's updates; ``decays[g]`` is param group g's decay factor. Routers
        with collectives may only start the exchange here and apply at :meth:`end_step`."""
        raise NotImplementedError

    # Whether ranks hold different pieces of the same vector (FSDP, ZeRO), so that skipping
    # a vector with a non-finite gradient needs every rank's verdict.
    vectors_sharded: bool = False

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (a collective where there are several)."""
        return flag

    def all_ranks_min(self, values: Tensor) -> Tensor:
        """The elementwise minimum of ``values`` over ranks (a collective where there are several)."""
        return values

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Concatenate every rank's ``items`` on every rank (identity in one process)."""
        return list(items)

    # -- checkpoint transport: to one rank only (never the whole state to every rank) ------
    def gather_objects_to(self, items: list[Any], dst: int) -> list[Any] | None:
        """Every rank's ``items`` concatenated on rank ``dst``; ``None`` elsewhere."""
        return list(items)

    def send_to(self, tensor: Tensor, dst: int) -> None:
        raise RuntimeError("one process has no other rank to send to")

    def receive_from(self, tensor: Tensor, src: int) -> None:
        raise RuntimeError("one process has no other rank to receive from")

    def transport_device(self, device: torch.device) -> torch.device:
        """Where tensors sent between ranks must live for this backend."""
        return device

    def wait_for_every_rank(self, key: str, timeout: float, hint: str, waiter: int = 0) -> None:
        """On rank ``waiter``: return once every rank has called this with ``key``, raise
        ``RuntimeError`` with ``hint`` after ``timeout`` seconds (ranks that will never join the
        collective that follows). Elsewhere: announce the arrival and return."""


class DecayFactors:
    """The decay factor of every block a receiver applies, on the device, with no host sync.

    An owner sends a flag (1: block updated this step) with each update; the receiver
    multiplies by its param group's ``decay`` where the flag is set, by 1 elsewhere. The
    per-group factors are float64 (a multiply rounds them to the operand's compute type, as
    it does a Python float in one process) and are copied to the device only when the
    groups' values change (on CUDA from pinned memory, without waiting for the device).
    Shared by the replicated and the sharded routers.
    """

    def __init__(self, group_of: Sequence[int], device: torch.device) -> None:
        self._device = device
        self._group_of = torch.tensor(list(group_of), dtype=torch.long).to(device)  # group of each flag
        self._key: tuple[float, ...] | None = None
        self._groups = torch.zeros(0, dtype=torch.float64)

    def __call__(self, flags: Tensor, decays: Sequence[float]) -> Tensor | None:
        """One factor per flag; ``None`` when every decay is 1 (nothing to multiply)."""
        key = tuple(decays)
        if all(d == 1.0 for d in key):
            return None
        if key != self._key:
            host = torch.tensor(key, dtype=torch.float64)
            if self._device.type == "cuda":
                self._groups = host.pin_memory().to(self._device, non_blocking=True)
            else:
                self._groups = host.to(self._device)
            self._key = key
        return torch.where(flags > 0, self._groups[self._group_of], 1.0)


def _matrix_view(param: Tensor, shape: tuple[int, int]) -> Tensor:
    return param.view(shape) if param.is_contiguous() else param.reshape(shape)


class GroupCollectives:
    """``gather_objects`` and ``any_rank`` over ``self.group``, for routers with several ranks."""

    group: Any = None
    world_size: int = 1

    def gather_objects(self, items: list[Any]) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, items, group=self.group)
        return [item for part in gathered for item in part]

    def any_rank(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(value.item() > 0)

    def all_ranks_min(self, values: Tensor) -> Tensor:
        values = values.clone()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return values

    def _global(self, rank: int) -> int:
        """The global rank of ``rank`` of ``self.group`` (torch < 2.6 has no ``group_dst``)."""
        return rank if self.group is None else torch.distributed.get_global_rank(self.group, rank)

    def gather_objects_to(self, items: list[Any], dst: int) -> list[Any] | None:
        gathered: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(items, gathered, dst=self._global(dst), group=self.group)
        return None if gathered is None else [item for part in gathered for item in part]

    def send_to(self, tensor: Tensor, dst: int) -> None:
        torch.distributed.send(tensor, dst=self._global(dst), group=self.group)

    def receive_from(self, tensor: Tensor, src: int) -> None:
        torch.distributed.recv(tensor, src=self._global(src), group=self.group)

    def transport_device(self, device: torch.device) -> torch.device:
        """CUDA (the state's device, or the current one) for NCCL, else the CPU."""
        if "nccl" not in str(torch.distributed.get_backend(self.group)):
            return torch.device("cpu")
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())

    def wait_for_every_rank(self, key: str, timeout: float, hint: str, waiter: int = 0) -> None:
        # Through the rendezvous store, not a collective, so that rank ``waiter`` (the writer)
        # learns at once that it called alone instead of blocking until the process-group
        # timeout. Only the waiter has a deadline: the others may legitimately arrive first
        # and wait in the collective (Accelerate's main process writes the model file before
        # the optimizer's state_dict() is taken).
        try:
            store = torch.distributed.distributed_c10d._get_default_store()
        except Exception:  # no default store (a custom launcher): the collective itself waits
            return
        ranks = "-".join(map(str, torch.distributed.get_process_group_ranks(self.group or torch.distributed.group.WORLD)))
        key = f"lightning_precond/{ranks}/{key}"
        arrived = store.add(key, 1)
        if self.rank != waiter:
            return
        deadline = time.monotonic() + timeout
        pause = 0.001
        while arrived < self.world_size:
            if time.monotonic() > deadline:
                store.add(key, -1)  # withdrawn: a later call by every rank starts clean
                raise RuntimeError(
                    f"rank {self.rank}: only {arrived - 1} of the other {self.world_size - 1} ranks joined within "
                    f"{timeout:g} s; {hint}"
                )
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
            arrived = store.add(key, 0)
        # Everyone is here and nobody reads the key again: the next optimizer with the same
        # plan (a second fit in this process) starts from zero.
        store.delete_key(key)


class LocalRouter(Router):
    """Every block is owned here; gradients and parameters are plain local tensors."""

    supports_new_params = True

    def setup(self, params: Sequence[Tensor], plan: BlockPlan, keep: Sequence[int] = ()) -> list[int]:
        self._params = list(params)
        self._shapes = plan.matrix_shapes
        return [0] * len(plan.blocks)

    def block_gradients(self, blocks: Sequence[Block]) -> list[Tensor | None]:
        grads: list[Tensor | None] = []
        for block in blocks:
            grad = self._params[block.param_index].grad
            if grad is None:
                grads.append(None)
                continue
            shape = self._shapes[block.param_index]
            assert shape is not None
            matrix = grad.reshape(shape)
            grads.append(
                matrix[
                    block.row_start : block.row_start + block.rows,
                    block.col_start : block.col_start + block.cols,
                ]
            )
        return grads

    def apply_updates(self, updates: Sequence[BlockUpdate], decays: Sequence[float]) -> None:
        apply_to_params(self._params, self._shapes, updates, decays)


def apply_to_params(
    params: Sequence[Tensor],
    shapes: Sequence[tuple[int, int] | None],
    updates: Sequence[BlockUpdate],
    decays: Sequence[float] | Tensor,
) -> None:
    """Apply block updates to full local parameters (shared by the replicated routers).

    ``decays``: per param group (Python floats), or a device tensor with one factor per
    update (the DDP router's, computed on the device so that no flag is read on the host)."""
    per_update = isinstance(decays, Tensor)
    by_param: dict[int, list[tuple[int, BlockUpdate]]] = {}
    for i, update in enumerate(updates):
        by_param.setdefault(update.block.param_index, []).append((i, update))
    for index, param_updates in by_param.items():
        param = params[index]
        shape = shapes[index]
        assert shape is not None
        matrix = _matrix_view(param.data, shape)
        for i, update in param_updates:
            b = update.block
            view = matrix[b.row_start : b.row_start + b.rows, b.col_start : b.col_start + b.cols]
            if per_update:
                view.mul_(decays[i])
            elif decays[b.group_index] != 1.0:
                view.mul_(decays[b.group_index])
            view.add_(update.delta.to(view.dtype))
        if not param.data.is_contiguous():
            param.data.copy_(matrix.view(param.shape))
