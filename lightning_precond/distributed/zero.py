"""DeepSpeed ZeRO stages 1, 2 and 3: block owners fed from ZeRO's flat fp32 partitions.

After ``deepspeed.initialize(optimizer=<ours>)`` our optimizer no longer sees the model's
parameters: each param group holds one flat 1-D fp32 tensor, this rank's partition of the
group (ZeRO-1/2), or one per sub-group, filled in only while that sub-group steps (ZeRO-3).
DeepSpeed calls ``step()`` once per (sub-)group, with gradients already reduced, unscaled
and clipped, and after each call copies the flat partition into the low-precision
parameters that its own all-gather publishes.

Where each original parameter lies in those partitions comes from DeepSpeed's own metadata:

* ZeRO-1/2: every low-precision parameter's ``_hp_mapping``: ``hp_fragment_address``
  (start and numel in this rank's flat partition) and ``lp_fragment_address.start`` (offset
  in the flattened parameter); the group's partition is ``single_partition_of_fp32_groups``.
* ZeRO-3: every parameter is cut into ``ceil(numel / world)`` elements per rank (rank ``r``
  holds flat elements ``[r * n, (r + 1) * n)``, the last one padded); the optimizer's
  ``grad_position[param_id] = [sub_group, offset, n]`` places it in
  ``fp32_partitioned_groups_flat[sub_group]``; ``ds_shape`` is the full shape.

These are :class:`~lightning_precond.distributed.sharded.LocalPiece` s like FSDP's, so the
same owner routing applies, run once per (sub-)group as DeepSpeed steps it: one
``all_to_all`` brings the pieces of the group's blocks to their owners (the same owners as
under DDP, so the update equals one process's), one brings the updates back, and they are
written into the flat partition in place. Vectors (AdamW) are updated elementwise on their
fragments; the engine keeps their state per fragment and consolidates it in checkpoints.

Refused, with an error naming the setting: DeepSpeed versions other than those tested,
``round_robin_gradients``, optimizer offload (CPU / NVMe), ZeRO-1/2 elastic checkpoints,
loading universal checkpoints, MoE parameter groups, MiCS / ZenFlow / other wrappers, torch
autocast's GradScaler, and fp16 / bf16 wrappers without ZeRO.
"""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..blocks import Block, BlockPlan
from ..ownership import assign_owners
from .router import BlockUpdate, CheckpointLayout, GroupCollectives, Router
from .sharded import LocalPiece, ShardedRouter

__all__ = ["SUPPORTED_DEEPSPEED_VERSIONS", "ZeroRouter", "deepspeed_took_over", "zero_router"]

# Versions whose ZeRO internals (the names listed in the module docstring) were checked.
SUPPORTED_DEEPSPEED_VERSIONS = ("0.19.8",)

_STAGE12 = "DeepSpeedZeroOptimizer"
_STAGE3 = "DeepSpeedZeroOptimizer_Stage3"


def deepspeed_took_over(original_groups: Sequence[Sequence[Tensor]]) -> bool:
    """Whether DeepSpeed ZeRO manages these parameters (ZeRO-1/2 links or ZeRO-3 metadata)."""
    return any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for group in original_groups for p in group)


def _is_wrapper_of(obj: Any, client: Any) -> bool:
    """A DeepSpeed optimizer wrapper (not the engine, not an LR schedule) around ``client``."""
    try:
        return (
            type(obj).__module__.startswith("deepspeed.runtime")
            and not isinstance(obj, torch.nn.Module)
            and getattr(obj, "optimizer", None) is client
            and hasattr(obj, "param_groups")
        )
    except Exception:  # objects with odd __getattr__
        return False


def _find(accept: Any, held: Any) -> Any | None:
    """An object that ``accept`` s: the ``self`` of a caller of ``step()`` / ``load_state_dict()``
    when one is on the stack (DeepSpeed calls both), else one holding ``held`` as its
    ``.optimizer``, found through the garbage collector (slower; once, at set-up)."""
    frame = sys._getframe(2)
    for _ in range(24):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if candidate is not None and accept(candidate):
            return candidate
        frame = frame.f_back
    for holder in gc.get_referrers(held):
        if accept(holder):
            return holder
        if isinstance(holder, dict) and holder.get("optimizer") is held:
            for owner in gc.get_referrers(holder):
                if getattr(owner, "__dict__", None) is holder and accept(owner):
                    return owner
    return None


def _find_wrapper(client: Any) -> Any | None:
    """The DeepSpeed object wrapping ``client``."""
    return _find(lambda obj: _is_wrapper_of(obj, client), client)


def _engine_of(wrapper: Any) -> Any | None:
    """The ``DeepSpeedEngine`` whose optimizer is ``wrapper``."""
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:  # pragma: no cover
        return None
    return _find(lambda obj: isinstance(obj, DeepSpeedEngine) and obj.optimizer is wrapper, wrapper)


def zero_router(
    optimizer: Any, original_groups: Sequence[Sequence[Tensor]], communication_dtype: torch.dtype
) -> ZeroRouter | None:
    """The ZeRO router for ``optimizer`` if DeepSpeed wraps it; ``None`` if DeepSpeed does not
    manage its parameters. Raises for DeepSpeed set-ups that cannot be routed correctly."""
    if "deepspeed" not in sys.modules:
        return None
    originals = {id(p) for group in original_groups for p in group}
    current = [p for group in optimizer.param_groups for p in group["params"]]
    replaced = any(id(p) not in originals for p in current)
    marked = deepspeed_took_over(original_groups)
    if not (replaced or marked):
        return None
    wrapper = _find_wrapper(optimizer)
    if wrapper is None:
        if marked:
            raise RuntimeError(
                "the parameters are managed by DeepSpeed ZeRO, but no DeepSpeed ZeRO optimizer wraps "
                f"this {type(optimizer).__name__}: create the engine with "
                "deepspeed.initialize(model=..., optimizer=<this optimizer>, ...) before the first step, "
                "preconditioner_stats() or load_state_dict()"
            )
        return None  # replaced by another backend (e.g. Accelerate's FSDP2 DTensors)
    return ZeroRouter(wrapper, optimizer, original_groups, communication_dtype)


def _refuse(message: str) -> None:
    raise NotImplementedError(f"lightning_precond under DeepSpeed: {message}")


_OFFLOAD = (
    "optimizer offload (zero_optimization.offload_optimizer, CPU or NVMe) is not supported: DeepSpeed "
    "then steps host copies through its own gradient buffers and swapping, a path this library does not "
    "route; remove offload_optimizer (without zero_force_ds_cpu_optimizer=false DeepSpeed refuses a "
    "client optimizer there anyway, and Accelerate silently swaps in DeepSpeed's CPU Adam)"
)


def _check_supported(wrapper: Any) -> int:
    """The ZeRO stage of ``wrapper`` (1, 2 or 3), or an error naming what is unsupported."""
    import deepspeed

    version = getattr(deepspeed, "__version__", "unknown")
    if version not in SUPPORTED_DEEPSPEED_VERSIONS:
        _refuse(
            f"DeepSpeed {version} is not a tested version (tested: {', '.join(SUPPORTED_DEEPSPEED_VERSIONS)}); "
            "ZeRO's partition layout is read from its internals, which change between releases. "
            "Install a tested version (pip install 'lightning-precond[deepspeed]')"
        )
    kind = type(wrapper).__name__
    if kind not in (_STAGE12, _STAGE3):
        _refuse(
            f"the optimizer is wrapped by DeepSpeed's {kind}, which is not supported; supported are "
            "ZeRO stages 1, 2 and 3 (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3). "
            "MiCS, ZenFlow and the fp16/bf16 optimizers without ZeRO hand the optimizer layouts "
            "this library does not route"
        )
    if getattr(wrapper, "torch_autocast_gradscaler", None) is not None:
        _refuse("torch_autocast with a GradScaler is not supported: the scaler decides on each rank "
                "whether to call step(), which the collectives inside step() cannot follow; use DeepSpeed's "
                "own bf16 / fp16 settings")
    if getattr(wrapper, "zenflow", False):
        _refuse("ZenFlow is not supported")
    if kind == _STAGE12:
        if wrapper.round_robin_gradients:
            _refuse("zero_optimization.round_robin_gradients=true is not supported: the parameter "
                    "linkage (_hp_mapping) then points at the wrong data; set it to false")
        if wrapper.cpu_offload:
            _refuse(_OFFLOAD)
        if wrapper.elastic_checkpoint:
            _refuse("zero_optimization.elastic_checkpoint=true is not supported: it re-slices optimizer "
                    "state as if it were shaped like the flat partition; set it to false")
        if getattr(wrapper, "has_moe_layers", False):
            _refuse("MoE parameter groups (expert data parallelism) are not supported")
        if any(g is not wrapper.dp_process_group for g in wrapper.real_dp_process_group):
            _refuse("parameter groups partitioned over different process groups are not supported")
        return 2 if wrapper.partition_gradients else 1
    if wrapper.offload_optimizer or getattr(wrapper, "swap_optimizer", False):
        _refuse(_OFFLOAD)
    if getattr(wrapper, "use_muon", False):
        _refuse("DeepSpeed's Muon integration is not supported")
    return 3


@dataclass
class _Fragment:
    """Where one parameter's local elements sit in a flat partition."""

    param_index: int
    flat_start: int  # first element in the flattened parameter
    offset: int  # first element in the flat partition
    numel: int


class _UnitRouter(ShardedRouter):
    """Owner routing for the blocks of one ZeRO (sub-)group, whose pieces sit in one flat tensor."""

    def __init__(self, group: Any, communication_dtype: torch.dtype, fragments: list[_Fragment], flat: Any) -> None:
        super().__init__(group, communication_dtype)
        self._fragments = fragments
        self._flat = flat  # callable returning the current flat partition

    def local_pieces(self) -> list[LocalPiece]:
        flat: Tensor = self._flat()
        grad = flat.grad
        return [
            LocalPiece(
                f.param_index,
                f.flat_start,
                flat.narrow(0, f.offset, f.numel),
                grad.narrow(0, f.offset, f.numel) if grad is not None else None,
            )
            for f in self._fragments
        ]


class ZeroRouter(GroupCollectives, Router):
    """Routes ZeRO-1/2/3 flat-partition fragments to block owners, one (sub-)group per ``step()``."""

    vectors_sharded = True

    flat_partitions = True

    def __init__(
        self,
        wrapper: Any,
        client: Any,
        original_groups: Sequence[Sequence[Tensor]],
        communication_dtype: torch.dtype,
    ) -> None:
        self.stage = _check_supported(wrapper)
        engine = _engine_of(wrapper)
        if engine is not None and engine.load_universal_checkpoint():
            _refuse("loading universal checkpoints (checkpoint.load_universal=true) is not supported: "
                    "DeepSpeed writes them into flat-partition-shaped optimizer state, which would leave "
                    "the preconditioners untouched; resume from the regular DeepSpeed checkpoint at the "
                    "same world size")
        self.wrapper = wrapper
        self.client = client
        self.group = wrapper.dp_process_group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.communication_dtype = communication_dtype
        self.bytes_last_step = 0
        self._groups = [list(g) for g in original_groups]
        self._active: int | None = None

    # -- what the engine plans from ------------------------------------------------------
    def plan_groups(self, current: list[list[Tensor]]) -> list[list[Tensor]]:
        return self._groups

    def global_shapes(self, params: Sequence[Tensor]) -> list[tuple[int, ...]]:
        if self.stage == 3:
            return [tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape) for p in params]
        return [tuple(p.shape) for p in params]

    # -- set-up ---------------------------------------------------------------------------
    def _flats(self) -> list[Tensor]:
        if self.stage == 3:
            return list(self.wrapper.fp32_partitioned_groups_flat)
        return list(self.wrapper.single_partition_of_fp32_groups)

    def _unit_fragments(self, index_of: dict[int, int]) -> list[tuple[list[int], list[_Fragment]]]:
        """Per (sub-)group: its parameters (the same on every rank) and this rank's fragments."""
        w = self.wrapper
        units: list[tuple[list[int], list[_Fragment]]] = []
        if self.stage == 3:
            for s, sub_group in enumerate(w.fp16_groups):
                fragments = []
                for p in sub_group:
                    index = self._index(index_of, p)
                    unit, offset, numel = w.grad_position[w.get_param_id(p)]
                    if unit != s or numel != p.ds_tensor.ds_numel or numel != math.ceil(p.ds_numel / self.world_size):
                        raise RuntimeError(
                            f"unexpected ZeRO-3 partition of parameter {index} (sub-group {unit}, {numel} "
                            f"elements per rank for {p.ds_numel} on {self.world_size} ranks): unsupported layout"
                        )
                    first = self.rank * numel
                    valid = max(0, min(numel, p.ds_numel - first))
                    if valid:
                        fragments.append(_Fragment(index, first, offset, valid))
                units.append(([self._index(index_of, p) for p in sub_group], fragments))
            return units
        for i, lp_group in enumerate(w.bit16_groups):
            fragments = []
            for p in lp_group:
                index = self._index(index_of, p)
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue
                hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                if hp.numel != lp.numel or lp.start + lp.numel > p.numel():
                    raise RuntimeError(f"inconsistent ZeRO fragment of parameter {index}: {hp} vs {lp}")
                fragments.append(_Fragment(index, int(lp.start), int(hp.start), int(hp.numel)))
            members = [self._index(index_of, p) for p in lp_group]
            units.append((members, sorted(fragments, key=lambda f: f.offset)))
        return units

    def _index(self, index_of: dict[int, int], param: Tensor) -> int:
        index = index_of.get(id(param))
        if index is None:
            raise RuntimeError(
                "DeepSpeed optimizes a parameter this optimizer was not built with; build the optimizer "
                "from the same parameters that deepspeed.initialize(model=...) receives"
            )
        return index

    def setup(self, params: Sequence[Tensor], plan: BlockPlan, keep: Sequence[int] = ()) -> list[int]:
        self._plan = plan
        index_of = {id(p): i for i, p in enumerate(params)}
        owners = assign_owners(plan.blocks, self.world_size)
        units = self._unit_fragments(index_of)
        flats = self._flats()
        if len(units) != len(flats):
            raise RuntimeError("DeepSpeed's parameter groups and flat partitions disagree (unsupported layout)")
        for (_, fragments), flat in zip(units, flats):
            end = max((f.offset + f.numel for f in fragments), default=0)
            if end > flat.numel():
                raise RuntimeError("a ZeRO fragment lies outside its flat partition (unsupported layout)")
        blocks_of: dict[int, list[int]] = {}
        for b, block in enumerate(plan.blocks):
            blocks_of.setdefault(block.param_index, []).append(b)
        self._units: list[_UnitRouter] = []
        self._diagonal: list[list[_Fragment]] = []
        for u, (members, fragments) in enumerate(units):
            matrix = [f for f in fragments if plan.matrix_shapes[f.param_index] is not None]
            self._diagonal.append([f for f in fragments if plan.matrix_shapes[f.param_index] is None])
            unit = _UnitRouter(self.group, self.communication_dtype, matrix, self._flat_getter(u))
            unit.bind(params, plan, owners, [b for i in members for b in blocks_of.get(i, [])])
            self._units.append(unit)
        return owners

    def _flat_getter(self, unit: int) -> Any:
        return lambda: self._flats()[unit]

    # -- the step -------------------------------------------------------------------------
    def begin_step(self, groups: Sequence[dict[str, Any]]) -> None:
        """Which flat partition DeepSpeed is stepping now (from the tensors it put in the groups)."""
        flats = self._flats()
        state = self.client.state
        if any(state.get(flat) for flat in flats):
            raise RuntimeError(
                "optimizer state keyed by ZeRO's flat partitions was found: it was written by DeepSpeed "
                "(universal or elastic checkpoint loading), which cannot restore this optimizer's "
                "preconditioners; resume from a regular DeepSpeed checkpoint at the same world size"
            )
        present = [p for g in groups for p in g["params"]]
        units = [u for u, flat in enumerate(flats) if any(p is flat for p in present)]
        if len(units) != 1 or len(present) != 1:
            raise RuntimeError(
                "under DeepSpeed ZeRO, step() must be called by DeepSpeed (engine.step()), which "
                f"steps one flat partition at a time; got {len(present)} tensors"
            )
        self._active = units[0]
        if self._active == 0:
            self.bytes_last_step = 0

    def _unit(self) -> _UnitRouter:
        if self._active is None:
            raise RuntimeError("ZeRO routing outside step()")
        return self._units[self._active]

    def block_gradients(self, blocks: Sequence[Block]) -> list[Tensor | None]:
        return self.gather(blocks)[0]

    def gather(self, blocks: Sequence[Block], verdict: Tensor | None = None) -> tuple[list[Tensor | None], Tensor | None]:
        """Gradients of the blocks of the stepping (sub-)group, ``None`` for all others; and
        ``verdict`` agreed over ranks in the same message."""
        unit = self._unit()
        grads, agreed = unit.gather(blocks, verdict)
        self.bytes_last_step += unit.bytes_last_step
        return grads, agreed

    def apply_updates(self, updates: Sequence[BlockUpdate], decays: Sequence[float]) -> None:
        unit = self._unit()
        before = unit.bytes_last_step
        unit.apply_updates(updates, decays)
        self.bytes_last_step += unit.bytes_last_step - before

    def vector_pieces(self) -> list[LocalPiece] | None:
        """This rank's fragments of the vectors in the stepping (sub-)group, with gradients."""
        unit = self._active
        if unit is None:
            return []
        flat = self._flats()[unit]
        grad = flat.grad
        return [
            LocalPiece(f.param_index, f.flat_start, flat.narrow(0, f.offset, f.numel),
                       grad.narrow(0, f.offset, f.numel) if grad is not None else None)
            for f in self._diagonal[unit]
        ]

    def checkpoint_layout(self) -> CheckpointLayout:
        """Vectors are held as fragments (``(param_index, flat_start, numel)`` of each one
        here), and DeepSpeed saves every rank's state_dict() to that rank's own file."""
        return CheckpointLayout(
            vector_pieces=tuple((f.param_index, f.flat_start, f.numel) for unit in self._diagonal for f in unit),
            per_rank_files=True,
        )

    def end_step(self) -> None:
        try:
            if self._active is not None:
                self._units[self._active].end_step()  # the stepping unit's updates, still in flight
        finally:
            self._active = None

