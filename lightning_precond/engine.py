"""The one engine every algorithm shares: blocks -> statistics -> eigenbasis -> scaling -> update.

An algorithm is a :class:`Recipe` (which statistics, which scaling, a few ordering flags);
:class:`PreconditionedOptimizer` runs any recipe over an explicit list of owned blocks,
grouped into same-shaped *buckets* whose state is stacked ``[k, ...]`` so that every matrix
operation is one batched ``torch.linalg`` / ``bmm`` call. The router decides which blocks
this rank owns and where their updates go; the engine never knows the backend.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .blocks import Block, BlockPlan, plan_blocks
from .distributed.fsdp import is_dtensor, is_fsdp1_flattened
from .distributed.router import BlockUpdate, Router, resolve_router
from .distributed.zero import deepspeed_took_over
from .eigenbasis import (
    REFRESH_METHODS,
    eigenvalue_staleness,
    eigh_descending,
    power_step,
    qr_algorithm,
    staleness,
)
from .scaling import Scaling
from .statistics import SIDES, KroneckerStatistics, statistics_beta

__all__ = ["Recipe", "EngineOptions", "PreconditionedOptimizer", "FactorStats", "RefreshedFactor"]

NONFINITE_POLICIES = ("skip", "raise")
REFRESH_MODES = ("periodic", "adaptive")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """The parts an algorithm is made of. The five public optimizers are recipes."""

    statistics: KroneckerStatistics
    scaling: Scaling
    # SOAP / KL: the first gradient only builds the factors and an exact basis; no update.
    basis_from_first_gradient: bool
    # Shampoo: statistics and root refresh happen before the direction (uses this step's G).
    statistics_first: bool = False
    # SOAP: W <- (W - a U)(1 - lr wd); AdamW-style otherwise: W <- W(1 - lr wd) - a U.
    decay_after_update: bool = False
    # SOAP: reorder columns by diag(Q^T A Q) before a power / QR refresh.
    sort_on_refresh: bool = True
    refresh_method: str = "power"


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """Optimizer-wide options (hyperparameters that may differ per group live in param groups)."""

    max_preconditioner_dim: int = 1024
    preconditioner_dtype: torch.dtype | None = None  # None: float32, or float64 for float64 params
    refresh: str = "periodic"
    refresh_method: str | None = None  # None: the algorithm's own
    refresh_tolerance: float = 0.1
    refresh_check_interval: int = 10
    max_qr_iterations: int = 10
    nonfinite_grad: str = "skip"
    max_consecutive_failures: int = 3
    precondition_1d: bool = False
    distributed: Any = "auto"
    communication_dtype: torch.dtype | None = None  # None: float32 (float64 for float64 state)

    def __post_init__(self) -> None:
        if self.max_preconditioner_dim < 1:
            raise ValueError(
                f"max_preconditioner_dim must be a positive int, got {self.max_preconditioner_dim}"
            )
        if self.preconditioner_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(
                "preconditioner_dtype must be None, torch.float32 or torch.float64, "
                f"got {self.preconditioner_dtype}"
            )
        if self.refresh not in REFRESH_MODES:
            raise ValueError(f"refresh must be one of {REFRESH_MODES}, got {self.refresh!r}")
        if self.refresh_method is not None and self.refresh_method not in REFRESH_METHODS:
            raise ValueError(
                f"refresh_method must be one of {REFRESH_METHODS}, got {self.refresh_method!r}"
            )
        _check_tolerance(self.refresh_tolerance, "refresh_tolerance")
        if self.refresh_check_interval < 1:
            raise ValueError(
                f"refresh_check_interval must be >= 1, got {self.refresh_check_interval}"
            )
        if self.max_qr_iterations < 1:
            raise ValueError(f"max_qr_iterations must be >= 1, got {self.max_qr_iterations}")
        if self.nonfinite_grad not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite_grad must be one of {NONFINITE_POLICIES}, got {self.nonfinite_grad!r}"
            )
        if self.communication_dtype not in (None, torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(
                "communication_dtype must be None or a floating dtype (float32, float64, bfloat16, "
                f"float16), got {self.communication_dtype}"
            )
        if isinstance(self.distributed, str) and self.distributed != "auto":
            raise ValueError(
                f"distributed must be None, 'auto', a module or a process group, got {self.distributed!r}"
            )
        if self.max_consecutive_failures < 1:
            raise ValueError(
                f"max_consecutive_failures must be >= 1, got {self.max_consecutive_failures}"
            )


def _check_tolerance(value: float, name: str) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


@dataclass
class _SideRecord:
    refreshes: int = 0
    last_refresh_step: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    refresh_seconds: float = 0.0


@dataclass
class _BlockRecord:
    """Host-side counters of one block: Python ints, so reading them never syncs a device."""

    step: int = 0
    initialized: bool = False
    skipped_steps: int = 0
    sides: dict[str, _SideRecord] = field(default_factory=lambda: {s: _SideRecord() for s in SIDES})


@dataclass(frozen=True)
class FactorStats:
    """One factor's health, as returned by :meth:`PreconditionedOptimizer.preconditioner_stats`."""

    param_name: str
    block_id: str
    side: str
    dim: int
    staleness: float
    eigenvalue_staleness: float
    steps_since_refresh: int
    refresh_count: int
    failure_count: int
    refresh_seconds: float


@dataclass(frozen=True)
class RefreshedFactor:
    block_id: str
    side: str


@dataclass
class _Consolidated:
    """Every rank's state collected by ``consolidate_state_dict`` at step ``steps``:
    blocks as ``(param_index, "block{b}", state)``, and whole vectors where the backend
    shards them (FSDP1)."""

    steps: int
    blocks: list[tuple[int, str, dict[str, Tensor]]]
    vectors: dict[int, dict[str, Tensor]] | None


class _Bucket:
    """The owned blocks of one shape and param group, with their state stacked ``[k, ...]``."""

    def __init__(
        self,
        blocks: list[Block],
        shapes: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.blocks = blocks
        k = len(blocks)
        self.state: dict[str, Tensor] = {
            name: torch.zeros((k, *shape), dtype=dtype, device=device) for name, shape in shapes.items()
        }
        self.records = [_BlockRecord() for _ in blocks]

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks[0].shape

    @property
    def group_index(self) -> int:
        return self.blocks[0].group_index


@contextlib.contextmanager
def _selected(state: MutableMapping[str, Tensor], rows: Sequence[int], size: int) -> Iterator[dict[str, Tensor]]:
    """The state of a subset of a stack; written back on exit (no copy when it is all of it).

    Tensors may be replaced inside the block (e.g. a new basis); the write-back handles both.
    """
    if len(rows) == size:
        selected = dict(state)
        yield selected
        state.update(selected)
        return
    index = torch.tensor(rows, dtype=torch.long, device=next(iter(state.values())).device)
    selected = {name: value.index_select(0, index) for name, value in state.items()}
    yield selected
    for name, value in selected.items():
        state[name].index_copy_(0, index, value)


class PreconditionedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` running one :class:`Recipe` over blocked parameters.

    Matrix parameters (order >= 2) are cut into blocks (:mod:`lightning_precond.blocks`);
    vectors and scalars take AdamW with the group's ``betas``, ``eps`` and ``weight_decay``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        recipe: Recipe,
        options: EngineOptions,
    ) -> None:
        self.recipe = recipe
        self.options = options
        # The param-group dicts and their parameters as built (DeepSpeed ZeRO later replaces
        # the parameters by flat partitions inside the same dicts; see _groups()).
        self._group_dicts: list[dict[str, Any]] = []
        self._group_params: list[list[Tensor]] = []
        super().__init__(params, defaults)
        self._plan: BlockPlan | None = None
        self._planned: list[list[Tensor]] | None = None  # the parameters the plan indexes, per group
        self._group_of: list[int] = []
        self._shapes: list[tuple[int, ...]] = []
        # Vectors held as flat fragments (DeepSpeed ZeRO): param index -> (flat start, AdamW state).
        self._fragment_state: dict[int, tuple[int, dict[str, Tensor]]] = {}
        self._router: Router | None = None
        self._buckets: list[_Bucket] = []
        self._refresh_owner: object | None = None
        self._warned_failure = False
        self._steps_taken = 0
        self._consolidated: _Consolidated | None = None

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._group_dicts.append(group)
        self._group_params.append(list(group["params"]))
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError("complex parameters are not supported by preconditioned optimizers")
        self._check_group(group)
        if getattr(self, "_plan", None) is not None:
            raise RuntimeError("add_param_group after the first step is not supported yet")

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """Validate one param group's hyperparameters (raises ValueError naming the argument)."""
        if not group["lr"] >= 0.0:
            raise ValueError(f"lr must be >= 0, got {group['lr']}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
        if not group["eps"] >= 0.0:
            raise ValueError(f"eps must be >= 0, got {group['eps']}")
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        frequency = group["precondition_frequency"]
        if not (isinstance(frequency, int) and frequency >= 1):
            raise ValueError(f"precondition_frequency must be a positive int, got {frequency}")

    # ------------------------------------------------------------------ set-up
    def _all_params(self) -> list[Tensor]:
        """The parameters the plan indexes (once planned), else those in ``param_groups``."""
        if self._planned is not None:
            return [p for group in self._planned for p in group]
        return [p for group in self.param_groups for p in group["params"]]

    def _groups(self) -> list[dict[str, Any]]:
        """The param groups that ``Block.group_index`` indexes.

        ``self.param_groups`` except under DeepSpeed ZeRO, which calls ``step()`` with
        ``param_groups`` cut to one group (ZeRO-1/2) or drops empty groups: there, the dicts
        as built (DeepSpeed edits them in place, so learning-rate schedules still apply).
        """
        if self._router is not None and self._router.flat_partitions:
            return self._group_dicts
        return self.param_groups

    def _parameters_final(self) -> bool:
        """Whether a sharding backend already holds the parameters (DeepSpeed ZeRO, FSDP1,
        FSDP2), so that planning now cannot bind to tensors it would swap later. Then
        ``state_dict()`` plans first: checkpoint templates built from it (DCP, Accelerate's
        FSDP loaders) must cover every block, even before the first step."""
        return deepspeed_took_over(self._group_params) or any(
            is_dtensor(p) or is_fsdp1_flattened(p) for p in self._all_params()
        )

    def _flat_partitions(self) -> bool:
        return self._router is not None and self._router.flat_partitions

    def _state_dtype(self, param: Tensor) -> torch.dtype:
        if self.options.preconditioner_dtype is not None:
            return self.options.preconditioner_dtype
        return torch.float64 if param.dtype == torch.float64 else torch.float32

    def _setup(self) -> None:
        """Plan blocks, pick owners and allocate owned state (lazily: backends may swap params)."""
        if self._plan is not None:
            return
        current = [list(group["params"]) for group in self.param_groups]
        state_dtypes = {self._state_dtype(p) for group in current for p in group}
        communication_dtype = self.options.communication_dtype or (
            torch.float64 if torch.float64 in state_dtypes else torch.float32
        )
        router = resolve_router(
            self.options.distributed,
            communication_dtype,
            [p for group in current for p in group],
            optimizer=self,
            original_groups=self._group_params,
        )
        self._router = router
        planned = router.plan_groups(current)
        params = [p for group in planned for p in group]
        group_of = [gi for gi, group in enumerate(planned) for _ in group]
        global_shapes = router.global_shapes(params)
        plan = plan_blocks(
            global_shapes,
            group_of,
            self.options.max_preconditioner_dim,
            self.options.precondition_1d,
        )
        owners = router.setup(params, plan)
        self._planned, self._group_of, self._shapes = planned, group_of, global_shapes
        grouped: dict[tuple[int, int, int], list[Block]] = {}
        for block, owner in zip(plan.blocks, owners):
            if owner == router.rank:
                grouped.setdefault((block.group_index, *block.shape), []).append(block)
        buckets = []
        for (group_index, m, n), blocks in grouped.items():
            group = self._groups()[group_index]
            shapes = {
                **self.recipe.statistics.state_shapes(m, n),
                **self.recipe.scaling.state_shapes(m, n, group),
            }
            param = params[blocks[0].param_index]
            bucket = _Bucket(blocks, shapes, self._state_dtype(param), param.device)
            self.recipe.statistics.initial_values(bucket.state)
            buckets.append(bucket)
        self._plan, self._router, self._buckets = plan, router, buckets
        if not router.flat_partitions:
            # Vectors' AdamW state exists from the start (as the blocks' does): checkpoint
            # templates built before the first step (DCP, FSDP1) then cover every parameter.
            for p, shape in zip(params, plan.matrix_shapes):
                if shape is None and not self.state.get(p):
                    self.state[p] = _zero_adamw_state(p)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        self._setup()
        self._steps_taken += 1
        assert self._router is not None
        self._check_params_unchanged()
        self._router.begin_step(self.param_groups)
        try:
            self._step_owned()
        finally:
            self._router.end_step()
        return loss

    def _check_params_unchanged(self) -> None:
        """Refuse to step on parameters other than those the plan was made for (a backend that
        swapped them afterwards would leave the blocks updating tensors nobody uses)."""
        assert self._router is not None and self._planned is not None
        if self._router.flat_partitions:
            return
        if deepspeed_took_over(self._group_params):
            raise RuntimeError(
                "DeepSpeed ZeRO took over the parameters after this optimizer planned its blocks (was "
                "preconditioner_stats(), refresh_eigenbasis() or load_state_dict() called before "
                "deepspeed.initialize?); build the DeepSpeed engine first"
            )
        current = [p for group in self.param_groups for p in group["params"]]
        planned = self._all_params()
        if len(current) != len(planned) or any(a is not b for a, b in zip(current, planned)):
            raise RuntimeError(
                "the parameters in param_groups were replaced after this optimizer planned its blocks "
                "(at load_state_dict with preconditioner state, preconditioner_stats() or the first "
                "step); wrap or shard the model (FSDP, accelerator.prepare) before that"
            )

    def _step_owned(self) -> None:
        assert self._router is not None
        work = []
        # One call for every owned block: routers with collectives make one per step.
        all_grads = self._router.block_gradients([b for bucket in self._buckets for b in bucket.blocks])
        offset = 0
        for bucket in self._buckets:
            grads = all_grads[offset : offset + len(bucket.blocks)]
            offset += len(bucket.blocks)
            present = [i for i, g in enumerate(grads) if g is not None]
            if not present:
                continue
            dtype = next(iter(bucket.state.values())).dtype
            stacked = torch.stack([grads[i] for i in present]).to(dtype)  # type: ignore[misc]
            work.append((bucket, present, stacked))
        finite, used = self._gradient_flags(work)
        updates: list[BlockUpdate] = []
        offset = 0
        for bucket, present, stacked in work:
            flags = finite[offset : offset + len(present)]
            nonzero = used[offset : offset + len(present)]
            offset += len(present)
            if not all(nonzero):
                rows = [r for r, used in enumerate(nonzero) if used]
                present, flags = [present[r] for r in rows], [flags[r] for r in rows]
                stacked = stacked[rows]
                if not rows:
                    continue
            updates.extend(self._step_bucket(bucket, present, stacked, flags))
        decays = [1.0 - g["lr"] * g["weight_decay"] for g in self._groups()]
        self._router.apply_updates(updates, decays)
        self._diagonal_step()

    def _check_gradients(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self._name(p)}: sparse gradients are not supported")
                if torch.is_complex(p.grad):
                    raise RuntimeError(f"{self._name(p)}: complex gradients are not supported")

    def _router_any(self, flag: bool) -> bool:
        assert self._router is not None
        return self._router.any_rank(flag)

    def _gradient_flags(self, work: list[tuple[_Bucket, list[int], Tensor]]) -> tuple[list[bool], list[bool]]:
        """Whether each block's gradient is finite, and whether it is not all zeros: one host
        sync per step, for all blocks.

        With ``nonfinite_grad="raise"`` all ranks agree (one tiny all-reduce) and raise together.
        A block whose gradient is all zeros is treated as having no gradient: it carries
        nothing to learn from and would give SOAP a basis of zeros (Lightning's and DCP's
        zero-gradient, lr-0 initialization step; ZeRO's zero gradients for unused parameters).
        """
        if work:
            checks = [torch.stack([torch.isfinite(g).flatten(1).all(dim=1), g.flatten(1).ne(0).any(dim=1)])
                      for _, _, g in work]
            finite, nonzero = torch.cat(checks, dim=1).tolist()
        else:
            finite, nonzero = [], []
        if self.options.nonfinite_grad == "raise" and self._router_any(not all(finite)):
            blocks = [bucket.blocks[i] for bucket, present, _ in work for i in present]
            bad = [b for b, ok in zip(blocks, finite) if not ok]
            names = ", ".join(f"{self._name_of_index(b.param_index)} block {b.id}" for b in bad[:5])
            names = names or "a block owned by another rank"
            raise FloatingPointError(
                f"non-finite gradient in {names} (nonfinite_grad='raise'); "
                "use nonfinite_grad='skip' to skip such blocks instead"
            )
        return finite, nonzero

    def _step_bucket(
        self, bucket: _Bucket, present: list[int], grads: Tensor, finite: list[bool]
    ) -> list[BlockUpdate]:
        group = self._groups()[bucket.group_index]
        beta = statistics_beta(group)
        records = bucket.records
        for i, ok in zip(present, finite):
            if not ok:
                records[i].skipped_steps += 1
        # Blocks in the same phase and at the same step are computed together.
        phases: dict[tuple[bool, int], list[int]] = {}
        for row, (i, ok) in enumerate(zip(present, finite)):
            if ok:
                phases.setdefault((records[i].initialized, records[i].step), []).append(row)
        updates: list[BlockUpdate] = []
        decay = 1.0 - group["lr"] * group["weight_decay"]
        for (initialized, step), rows in phases.items():
            positions = [present[r] for r in rows]
            g = grads if len(rows) == grads.shape[0] else grads[rows]
            with _selected(bucket.state, positions, len(bucket.blocks)) as state:
                if self.recipe.basis_from_first_gradient and not initialized:
                    self.recipe.statistics.initialize_from(state, g, beta)
                    self._refresh_sides(bucket, positions, state, "eigh", sides=SIDES, step=0)
                    for i in positions:
                        records[i].initialized = True
                    continue
                step += 1
                for i in positions:
                    records[i].step = step
                    records[i].initialized = True
                direction, step_size = self._direction(bucket, positions, state, g, step, group, beta)
            scale = -step_size * (decay if self.recipe.decay_after_update else 1.0)
            delta = direction * scale
            updates.extend(BlockUpdate(bucket.blocks[i], delta[r]) for r, i in enumerate(positions))
        return updates

    def _direction(
        self,
        bucket: _Bucket,
        positions: list[int],
        state: dict[str, Tensor],
        grads: Tensor,
        step: int,
        group: Mapping[str, Any],
        beta: float,
    ) -> tuple[Tensor, float]:
        recipe = self.recipe
        if recipe.statistics_first:
            recipe.statistics.update(state, grads, beta)
            self._maybe_refresh(bucket, positions, state, step, group)
            return recipe.scaling.direction(state, grads, step, group)
        direction, step_size = recipe.scaling.direction(state, grads, step, group)
        recipe.statistics.update(state, grads, beta)
        self._maybe_refresh(bucket, positions, state, step, group)
        return direction, step_size

    # ------------------------------------------------------------------ refresh
    def _maybe_refresh(
        self,
        bucket: _Bucket,
        positions: list[int],
        state: dict[str, Tensor],
        step: int,
        group: Mapping[str, Any],
    ) -> None:
        start = 0 if self.recipe.basis_from_first_gradient else group["start_preconditioning_step"]
        if step < start:
            return
        if self._refresh_owner is not None:
            # The owner schedules refreshes, but roots must exist once preconditioning starts.
            for side in SIDES:
                rows = [r for r, i in enumerate(positions) if bucket.records[i].sides[side].refreshes == 0]
                if rows:
                    with _selected(state, rows, len(positions)) as sub:
                        chosen = [positions[r] for r in rows]
                        self._refresh_sides(bucket, chosen, sub, self._method(), (side,), step)
            return
        if self.options.refresh == "periodic":
            if (step - start) % group["precondition_frequency"] == 0:
                self._refresh_sides(bucket, positions, state, self._method(), SIDES, step)
            return
        never = any(bucket.records[i].sides["left"].refreshes == 0 for i in positions)
        if never or step % self.options.refresh_check_interval == 0:
            self._refresh_stale(bucket, positions, state, step, self.options.refresh_tolerance)

    def _method(self, method: str | None = None) -> str:
        return method or self.options.refresh_method or self.recipe.refresh_method

    def _refresh_stale(
        self,
        bucket: _Bucket,
        positions: list[int],
        state: dict[str, Tensor],
        step: int,
        tolerance: float,
        method: str = "qr",
    ) -> list[RefreshedFactor]:
        """Refresh, side by side, the factors whose staleness exceeds ``tolerance``."""
        refreshed: list[RefreshedFactor] = []
        for side in SIDES:
            factor, basis = state[f"factor_{side}"], state[f"basis_{side}"]
            stale = (staleness(basis.mT @ factor @ basis) > tolerance).tolist()
            rows = [
                r for r, i in enumerate(positions)
                if stale[r] or bucket.records[i].sides[side].refreshes == 0
            ]
            if not rows:
                continue
            chosen = [positions[r] for r in rows]
            with _selected(state, rows, len(positions)) as sub:
                self._refresh_sides(bucket, chosen, sub, method, (side,), step, tolerance)
            refreshed.extend(RefreshedFactor(bucket.blocks[i].id, side) for i in chosen)
        return refreshed

    def _refresh_sides(
        self,
        bucket: _Bucket,
        positions: list[int],
        state: dict[str, Tensor],
        method: str,
        sides: Sequence[str],
        step: int,
        tolerance: float | None = None,
    ) -> None:
        """Recompute the bases of ``sides`` for the blocks at ``positions`` (rows of ``state``)."""
        for side in sides:
            started = time.perf_counter()
            factor, old = state[f"factor_{side}"], state[f"basis_{side}"]
            if method == "eigh":
                result = eigh_descending(factor, old)
            elif method == "power":
                result = power_step(factor, old, self.recipe.sort_on_refresh)
            else:
                result = qr_algorithm(
                    factor,
                    old,
                    self.options.refresh_tolerance if tolerance is None else tolerance,
                    self.options.max_qr_iterations,
                    self.recipe.sort_on_refresh,
                )
            if not all(result.ok):
                keep = torch.tensor(result.ok, device=old.device).view(-1, 1, 1)
                result.basis = torch.where(keep, result.basis, old)
            self.recipe.statistics.on_refresh(state, side, result)
            self.recipe.scaling.on_refresh(state, side, old, result)
            state[f"basis_{side}"] = result.basis
            seconds = (time.perf_counter() - started) / max(1, len(positions))
            self._record_refresh(bucket, positions, side, result.ok, step, seconds)

    def _record_refresh(
        self,
        bucket: _Bucket,
        positions: list[int],
        side: str,
        ok: list[bool],
        step: int,
        seconds: float,
    ) -> None:
        for i, succeeded in zip(positions, ok):
            record = bucket.records[i].sides[side]
            record.refresh_seconds = seconds
            if succeeded:
                record.refreshes += 1
                record.last_refresh_step = step
                record.consecutive_failures = 0
                continue
            record.failures += 1
            record.consecutive_failures += 1
            where = f"{self._name_of_index(bucket.blocks[i].param_index)} block {bucket.blocks[i].id} ({side} factor)"
            if record.consecutive_failures >= self.options.max_consecutive_failures:
                raise RuntimeError(
                    f"eigendecomposition failed {record.consecutive_failures} times in a row for "
                    f"{where}; the factor is likely corrupted (non-finite or badly scaled)"
                )
            if not self._warned_failure:
                self._warned_failure = True
                warnings.warn(
                    f"eigendecomposition failed for {where} (also in float64); keeping the "
                    "previous basis. Failures are counted in preconditioner_stats().",
                    RuntimeWarning,
                    stacklevel=4,
                )

    # ------------------------------------------------------------------ control (callbacks)
    @property
    def refresh_owner(self) -> object | None:
        """Who schedules refreshes; ``None`` means the optimizer's own ``refresh`` policy."""
        return self._refresh_owner

    def attach_refresh_owner(self, owner: object) -> None:
        """Hand refresh scheduling to ``owner`` (e.g. a callback): the optimizer's own
        frequency-based or adaptive refresh stops until :meth:`detach_refresh_owner`."""
        if self._refresh_owner is not None and self._refresh_owner is not owner:
            raise RuntimeError(
                f"refresh scheduling is already owned by {type(self._refresh_owner).__name__}; "
                "attach only one scheduler (RootRecomputeScheduler or AdaptiveEigenbasisRefresh)"
            )
        self._refresh_owner = owner

    def detach_refresh_owner(self, owner: object | None = None) -> None:
        if owner is None or owner is self._refresh_owner:
            self._refresh_owner = None

    def refresh_eigenbasis(
        self,
        select: str | Iterable[str | tuple[str, str]] | None = None,
        method: str | None = None,
        tolerance: float | None = None,
    ) -> list[RefreshedFactor]:
        """Recompute eigenbases now; returns the factors refreshed.

        Args:
            select: ``None`` for every factor; ``"stale"`` for the factors whose staleness
                exceeds ``tolerance``; or block ids (``"3.0"``) / ``(block_id, side)`` pairs.
            method: ``"eigh"``, ``"qr"`` (warm-started QR algorithm) or ``"power"``;
                default ``"qr"`` for ``"stale"``, else the optimizer's ``refresh_method``.
            tolerance: staleness threshold for ``"stale"`` and the QR algorithm's target;
                default ``refresh_tolerance``.
        """
        if method is not None and method not in REFRESH_METHODS:
            raise ValueError(f"method must be one of {REFRESH_METHODS}, got {method!r}")
        if tolerance is not None:
            _check_tolerance(tolerance, "tolerance")
        tol = self.options.refresh_tolerance if tolerance is None else tolerance
        self._setup()
        wanted: dict[str, set[str]] | None = None
        if select is not None and select != "stale":
            if isinstance(select, str):
                raise ValueError(f"select must be None, 'stale' or an iterable of block ids, got {select!r}")
            wanted = {}
            for item in select:
                block_id, sides = (item, SIDES) if isinstance(item, str) else (item[0], (item[1],))
                if block_id not in self._known_block_ids():
                    raise ValueError(f"select names an unknown block id {block_id!r}")
                for side in sides:
                    if side not in SIDES:
                        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
                wanted.setdefault(block_id, set()).update(sides)
        refreshed: list[RefreshedFactor] = []
        for bucket in self._buckets:
            ready = [i for i, r in enumerate(bucket.records) if r.initialized or r.step > 0]
            if wanted is not None:
                ready = [i for i in ready if bucket.blocks[i].id in wanted]
            if not ready:
                continue
            with _selected(bucket.state, ready, len(bucket.blocks)) as state:
                if select == "stale":
                    step = max(bucket.records[i].step for i in ready)
                    refreshed += self._refresh_stale(bucket, ready, state, step, tol, method or "qr")
                    continue
                for side in SIDES:
                    rows = [r for r, i in enumerate(ready) if wanted is None or side in wanted[bucket.blocks[i].id]]
                    if not rows:
                        continue
                    positions = [ready[r] for r in rows]
                    with _selected(state, rows, len(ready)) as sub:
                        step = max(bucket.records[i].step for i in positions)
                        self._refresh_sides(bucket, positions, sub, self._method(method), (side,), step, tol)
                    refreshed += [RefreshedFactor(bucket.blocks[i].id, side) for i in positions]
        return refreshed

    def _known_block_ids(self) -> set[str]:
        assert self._plan is not None
        return {b.id for b in self._plan.blocks}

    def preconditioner_stats(
        self,
        names: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor] | None = None,
        gather: bool = False,
    ) -> list[FactorStats]:
        """One record per factor (see :class:`FactorStats`), sorted by block id and side.

        By default only the factors this rank owns; with ``gather=True`` every rank's
        records are collected on every rank (a collective: all ranks must call it).

        Staleness is computed on demand from the current factors (two batched matmuls per
        stack), so nothing is spent when this is never called. ``names`` (e.g.
        ``model.named_parameters()``) names the parameters when the optimizer was not built
        from named parameters.
        """
        self._setup()
        lookup = self._names_from(names)
        records: list[FactorStats] = []
        for bucket in self._buckets:
            for side in SIDES:
                factor, basis = bucket.state[f"factor_{side}"], bucket.state[f"basis_{side}"]
                projected = basis.mT @ factor @ basis
                stale = staleness(projected).tolist()
                in_use = self.recipe.statistics.eigenvalues_in_use(bucket.state, side)
                current = torch.diagonal(projected, dim1=-2, dim2=-1)
                eig_stale = eigenvalue_staleness(in_use, current).tolist()
                for i, block in enumerate(bucket.blocks):
                    rec, side_rec = bucket.records[i], bucket.records[i].sides[side]
                    records.append(
                        FactorStats(
                            param_name=lookup.get(block.param_index) or self._name_of_index(block.param_index),
                            block_id=block.id,
                            side=side,
                            dim=block.shape[0 if side == "left" else 1],
                            staleness=float(stale[i]),
                            eigenvalue_staleness=float(eig_stale[i]),
                            steps_since_refresh=rec.step - side_rec.last_refresh_step,
                            refresh_count=side_rec.refreshes,
                            failure_count=side_rec.failures,
                            refresh_seconds=side_rec.refresh_seconds,
                        )
                    )
        if gather:
            assert self._router is not None
            records = self._router.gather_objects(records)
        return sorted(records, key=_stats_order)

    def _names_from(self, names: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor] | None) -> dict[int, str]:
        if names is None:
            return {}
        pairs = names.items() if isinstance(names, Mapping) else names
        by_id = {id(p): n for n, p in pairs}
        return {i: by_id[id(p)] for i, p in enumerate(self._all_params()) if id(p) in by_id}

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (block state and diagonal state)."""
        total = sum(t.numel() * t.element_size() for b in self._buckets for t in b.state.values())
        states = [*self.state.values(), *(state for _, state in self._fragment_state.values())]
        for state in states:
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor))
        return total

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The standard ``torch.optim`` format: ``{"state": {param_index: {...}}, "param_groups"}``.

        A matrix parameter's entry holds one nested dict per block, ``"block{b}"``, with the
        block's tensors and counters; a vector's entry holds its AdamW state (``step``,
        ``exp_avg``, ``exp_avg_sq``) as ``"adamw"``. Keys depend only on block ids, never on
        ranks or on the backend, so ``torch.distributed.checkpoint`` reshards between world
        sizes and between FSDP1, FSDP2 and one process.

        Under DeepSpeed ZeRO (which calls this on every rank and saves each rank's) the
        result is the same as with one process: param groups list the model's parameters and
        vectors' AdamW state is assembled from every rank's fragments (a collective).

        Under FSDP1 this is the per-rank input of FSDP's optimizer-state API
        (``FSDP.optim_state_dict``, ``get_optimizer_state_dict``; Lightning's
        ``FSDPStrategy`` calls them), which consolidates it: each rank returns the blocks it
        owns, and each vector's whole AdamW state on the rank holding
        its first element. After :meth:`consolidate_state_dict` it is instead complete on
        every rank. Loading accepts both.
        """
        if self._router is None and self._parameters_final():
            self._setup()
        consolidated, self._consolidated = self._consolidated, None
        if self._router is not None and self._router.rank_local_state_dict and consolidated is None:
            # FSDP1's API consolidates: this rank's blocks, and the vectors whose first element it holds.
            packed = super().state_dict()
            whole = self._whole_vector_states()
            vectors = {index: entry for index, (holds_first, entry) in whole.items() if holds_first}
            blocks = self._owned_block_states()
        else:
            if consolidated is None or consolidated.steps != self._steps_taken:
                consolidated = self._consolidate()
            packed = self._partitioned_state_dict() if self._flat_partitions() else super().state_dict()
            vectors = packed["state"] if consolidated.vectors is None else consolidated.vectors
            blocks = consolidated.blocks
        packed["state"] = {index: {"adamw": entry} for index, entry in vectors.items()}
        for param_index, key, value in blocks:
            packed["state"].setdefault(param_index, {})[key] = value
        return packed

    def _whole_vector_states(self) -> dict[int, tuple[bool, dict[str, Tensor]]]:
        """Every vector's AdamW state assembled from the pieces the ranks hold (a collective),
        with whether this rank holds the vector's first element."""
        assert self._router is not None
        index_of = {id(p): i for i, p in enumerate(self._all_params())}
        starts = {index: start for index, start, _ in self._router.diagonal_geometry()}
        held = ((index_of.get(id(p)), state) for p, state in self.state.items() if state)
        mine = [
            (index, starts[index], {n: t.detach().clone() for n, t in state.items()})
            for index, state in held
            if index in starts
        ]
        first_here = {index for index, start, _ in mine if start == 0}
        return {
            index: (index in first_here, entry)
            for index, entry in self._assemble_vectors(self._router.gather_objects(mine)).items()
        }

    def _assemble_vectors(self, pieces: Iterable[tuple[int, int, Mapping[str, Tensor]]]) -> dict[int, dict[str, Tensor]]:
        """Whole AdamW states from ``(param_index, flat_start, state)`` pieces of vectors."""
        state: dict[int, dict[str, Tensor]] = {}
        for index, start, piece in pieces:
            numel = math.prod(self._shapes[index])
            entry = state.setdefault(index, {"step": piece["step"]})
            for name in ("exp_avg", "exp_avg_sq"):
                whole = entry.setdefault(name, piece[name].new_zeros(numel))
                whole[start : start + piece[name].numel()] = piece[name].reshape(-1)
        for index, entry in state.items():
            for name in ("exp_avg", "exp_avg_sq"):
                entry[name] = entry[name].view(self._shapes[index])
        return state

    def _partitioned_state_dict(self) -> dict[str, Any]:
        """``state_dict()``'s param groups and vector state where the backend holds flat fragments."""
        assert self._planned is not None and self._router is not None
        groups, first = [], 0
        for group, params in zip(self._groups(), self._planned):
            packed = {key: value for key, value in group.items() if key != "params"}
            packed["params"] = list(range(first, first + len(params)))
            first += len(params)
            groups.append(packed)
        mine = [
            (index, start, {name: t.detach().clone() for name, t in state.items()})
            for index, (start, state) in sorted(self._fragment_state.items())
        ]
        state = self._assemble_vectors(self._router.gather_objects(mine))
        return {"state": state, "param_groups": groups}

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collect every rank's block state (a collective), so that a following
        :meth:`state_dict` on any single rank is complete.

        Lightning calls this on all ranks and then ``state_dict()`` on rank 0 only, the
        ``ZeroRedundancyOptimizer`` convention. Calling ``state_dict()`` on all ranks
        (Accelerate) works without it.
        """
        self._consolidated = self._consolidate()

    def _consolidate(self) -> _Consolidated:
        vectors = None
        if self._router is not None and self._router.rank_local_state_dict:
            vectors = {index: entry for index, (_, entry) in self._whole_vector_states().items()}
        return _Consolidated(self._steps_taken, self._all_block_states(), vectors)

    def _owned_block_states(self) -> list[tuple[int, str, dict[str, Tensor]]]:
        return [
            _pack_block(block, bucket.records[i], {n: t[i] for n, t in bucket.state.items()})
            for bucket in self._buckets
            for i, block in enumerate(bucket.blocks)
        ]

    def _all_block_states(self) -> list[tuple[int, str, dict[str, Tensor]]]:
        owned = self._owned_block_states()
        if self._router is None or self._router.world_size == 1:
            return owned
        return self._router.gather_objects(owned)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved at any world size; validated fully before anything changes.

        Under FSDP1 each rank needs only the entries of the parameters it holds a piece of
        (what ``FSDP.optim_state_dict_to_load`` hands it).
        """
        entries = {key: _split_entry(entry) for key, entry in state_dict["state"].items()}
        if self._plan is None and not deepspeed_took_over(self._group_params) and not any(
            blocks for _, blocks in entries.values()
        ):
            # Nothing planned yet and no block state to place: load hyperparameters (and any
            # AdamW state) without planning, since backends may still swap the parameters
            # (Accelerate reloads a fresh optimizer's own state_dict before FSDP2 shards).
            state = {key: plain for key, (plain, _) in entries.items() if plain}
            super().load_state_dict({**state_dict, "state": state})
            self._group_dicts = list(self.param_groups)
            return
        self._setup()
        assert self._plan is not None and self._router is not None
        rank_local = self._router.rank_local_state_dict
        # Saved keys are indices, or FQNs when torch.distributed.checkpoint wrote them; as in
        # torch.optim, they map to parameters by position in the saved param groups.
        saved_keys = [key for group in state_dict["param_groups"] for key in group["params"]]
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
        owned = {block.id for bucket in self._buckets for block in bucket.blocks}
        fresh = not (self._router.any_rank(bool(blocks_by_param)) if rank_local else blocks_by_param)
        if not fresh:
            self._validate_block_state(blocks_by_param, owned if rank_local else None)
        if rank_local:
            plain_state = self._local_vector_pieces(plain_state, position)
        if self._flat_partitions():
            self._load_partitioned(state_dict, {position[k]: v for k, v in plain_state.items() if k in position})
        else:
            super().load_state_dict({**state_dict, "state": plain_state})
            self._group_dicts = list(self.param_groups)
        if fresh:  # saved before the first step: start fresh
            self._plan = None
            self._setup()
            return
        for bucket in self._buckets:
            for i, block in enumerate(bucket.blocks):
                saved = blocks_by_param[block.param_index][f"block{block.block_index}"]
                for name, tensor in bucket.state.items():
                    tensor[i].copy_(saved[name])
                bucket.records[i] = _unpack_record(saved)

    def _local_vector_pieces(self, plain_state: Mapping[Any, Any], position: Mapping[Any, int]) -> dict[Any, Any]:
        """Under FSDP1: the vectors' saved AdamW state cut to the pieces this rank holds.

        A saved tensor is either already this piece (FSDP sliced it) or the whole vector.
        """
        assert self._router is not None
        pieces = {index: (start, numel) for index, start, numel in self._router.diagonal_geometry()}
        local: dict[Any, Any] = {}
        for key, entry in plain_state.items():
            index = position.get(key)
            if index not in pieces:
                continue  # a vector this rank holds nothing of
            start, numel = pieces[index]
            whole = math.prod(self._shapes[index])
            cut = {}
            for name, value in entry.items():
                if isinstance(value, Tensor) and value.dim() > 0:
                    if value.numel() == whole:
                        value = value.reshape(-1)[start : start + numel]
                    elif value.numel() != numel:
                        raise ValueError(
                            f"checkpoint state {name!r} of {self._name_of_index(index)} has {value.numel()} "
                            f"elements; expected the whole vector ({whole}) or this rank's piece ({numel})"
                        )
                cut[name] = value
            local[key] = cut
        return local

    def _load_partitioned(self, state_dict: Mapping[str, Any], plain_state: Mapping[int, Mapping[str, Any]]) -> None:
        """``load_state_dict()``'s hyperparameters and vector fragments under DeepSpeed ZeRO
        (the param groups hold flat partitions, so ``torch.optim``'s loader cannot map them)."""
        assert self._planned is not None and self._router is not None
        saved_groups = state_dict["param_groups"]
        sizes = [len(group["params"]) for group in saved_groups]
        expected = [len(params) for params in self._planned]
        if sizes != expected:
            raise ValueError(
                f"checkpoint param groups hold {sizes} parameters, this optimizer's hold {expected} "
                "(different model or param groups?)"
            )
        fragments: dict[int, tuple[int, dict[str, Tensor]]] = {}
        for index, start, numel in self._router.diagonal_geometry():
            saved = plain_state.get(index, {})
            if "exp_avg" not in saved:
                continue
            state = {"step": saved["step"].detach().clone().to(torch.float32)}
            for name in ("exp_avg", "exp_avg_sq"):
                flat = saved[name].reshape(-1)
                if flat.numel() != math.prod(self._shapes[index]):
                    raise ValueError(
                        f"checkpoint state {name!r} of {self._name_of_index(index)} has {flat.numel()} "
                        f"elements, expected {math.prod(self._shapes[index])}"
                    )
                state[name] = flat[start : start + numel].detach().clone()
            fragments[index] = (start, state)
        for group, saved in zip(self._groups(), saved_groups):
            group.update({key: value for key, value in saved.items() if key not in ("params", "param_names")})
        self._fragment_state = fragments

    def _validate_block_state(
        self, saved: Mapping[int, Mapping[str, Mapping[str, Tensor]]], required: set[str] | None = None
    ) -> None:
        """Raise ValueError naming the parameter unless ``saved`` fits this optimizer's plan.

        ``required``: the ids of the blocks that must be present (default: all of them, and
        no others per parameter).
        """
        assert self._plan is not None
        expected: dict[int, dict[str, Block]] = {}
        for block in self._plan.blocks:
            expected.setdefault(block.param_index, {})[f"block{block.block_index}"] = block
        for param_index in sorted(set(saved) - set(expected)):
            raise ValueError(
                f"checkpoint has preconditioner state for {self._name_of_index(param_index)}, "
                "which this optimizer does not precondition (different model or max_preconditioner_dim?)"
            )
        counters = {"step", "initialized", "skipped_steps"} | {
            f"{side}.{f}" for side in SIDES for f in _RECORD_FIELDS
        }
        for param_index, blocks in expected.items():
            name = self._name_of_index(param_index)
            got = saved.get(param_index, {})
            if set(got) - set(blocks) or (required is None and set(got) != set(blocks)):
                raise ValueError(
                    f"checkpoint blocks of {name} are {sorted(got)}, expected {sorted(blocks)} "
                    "(different shape or max_preconditioner_dim?)"
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
                group = self._groups()[block.group_index]
                shapes = {
                    **self.recipe.statistics.state_shapes(m, n),
                    **self.recipe.scaling.state_shapes(m, n, group),
                }
                for state_name, shape in shapes.items():
                    tensor = got[key].get(state_name)
                    if tensor is None or tuple(tensor.shape) != shape:
                        found = None if tensor is None else tuple(tensor.shape)
                        raise ValueError(
                            f"checkpoint state {state_name!r} of {name} {key} has shape {found}, "
                            f"expected {shape} (different model or algorithm?)"
                        )
                missing = counters - set(got[key])
                if missing:
                    raise ValueError(f"checkpoint state of {name} {key} lacks {sorted(missing)}")

    # ------------------------------------------------------------------ diagonal (AdamW)
    def _diagonal_step(self) -> None:
        assert self._plan is not None and self._router is not None
        pieces = self._router.diagonal_pieces()
        if pieces is not None:
            self._diagonal_fragments_step(pieces)
            return
        index = 0
        for group in self.param_groups:
            beta1, beta2, eps = self._diagonal_hyperparameters(group)
            for p in group["params"]:
                is_matrix = self._plan.matrix_shapes[index] is not None
                index += 1
                if is_matrix or p.grad is None:
                    continue
                if not self.state.get(p):
                    self.state[p] = _zero_adamw_state(p)
                _adamw(p, p.grad, self.state[p], group, beta1, beta2, eps)

    def _diagonal_fragments_step(self, pieces: Sequence[Any]) -> None:
        """AdamW on this rank's fragments of vectors (DeepSpeed ZeRO's flat partitions):
        elementwise, so each element follows exactly the one-process update."""
        for piece in pieces:
            if piece.grad is None or piece.numel == 0:
                continue
            group = self._groups()[self._group_of[piece.param_index]]
            beta1, beta2, eps = self._diagonal_hyperparameters(group)
            if piece.param_index not in self._fragment_state:
                self._fragment_state[piece.param_index] = (
                    piece.flat_start,
                    {
                        "step": torch.zeros((), dtype=torch.float32),
                        "exp_avg": torch.zeros_like(piece.value),
                        "exp_avg_sq": torch.zeros_like(piece.value),
                    },
                )
            _, state = self._fragment_state[piece.param_index]
            _adamw(piece.value, piece.grad, state, group, beta1, beta2, eps)

    def _diagonal_hyperparameters(self, group: Mapping[str, Any]) -> tuple[float, float, float]:
        """The (beta1, beta2, eps) of the AdamW that vectors and scalars take."""
        beta1, beta2 = group["betas"]
        return float(beta1), float(beta2), float(group["eps"])

    # ------------------------------------------------------------------ names
    def _name(self, param: Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p is param:
                    names = group.get("param_names")
                    return names[pi] if names else f"param group {gi} parameter {pi}"
        return "parameter"

    def _name_of_index(self, index: int) -> str:
        if self._planned is None:
            params = self._all_params()
            return self._name(params[index]) if index < len(params) else f"parameter {index}"
        position = index
        for gi, params in enumerate(self._planned):
            if position < len(params):
                names = self._groups()[gi].get("param_names")
                return names[position] if names else f"param group {gi} parameter {position}"
            position -= len(params)
        return f"parameter {index}"


def _zero_adamw_state(p: Tensor) -> dict[str, Tensor]:
    return {
        "step": torch.zeros((), dtype=torch.float32),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


def _adamw(
    p: Tensor, grad: Tensor, state: MutableMapping[str, Tensor], group: Mapping[str, Any],
    beta1: float, beta2: float, eps: float,
) -> None:
    """One decoupled-weight-decay Adam step of ``p`` in place (``state``: step, exp_avg, exp_avg_sq)."""
    state["step"] += 1
    step = int(state["step"].item())
    state["exp_avg"].lerp_(grad, 1.0 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / (1.0 - beta2**step) ** 0.5).add_(eps)
    p.mul_(1.0 - group["lr"] * group["weight_decay"])
    p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1.0 - beta1**step))


def _stats_order(record: FactorStats) -> tuple[int, int, str]:
    param, block = record.block_id.split(".")
    return int(param), int(block), record.side


_RECORD_FIELDS = ("refreshes", "last_refresh_step", "failures", "consecutive_failures")


def _pack_block(block: Block, record: _BlockRecord, tensors: Mapping[str, Tensor]) -> tuple[int, str, dict[str, Tensor]]:
    """``(param_index, "block{b}", state)``: a block's tensors and counters, as saved."""
    # Contiguous copies: collectives that broadcast saved state (FSDP2 full state dicts over
    # gloo) send raw memory, so a transposed view would arrive transposed.
    out: dict[str, Tensor] = {
        name: t.detach().clone(memory_format=torch.contiguous_format) for name, t in tensors.items()
    }
    out["step"] = torch.tensor(record.step, dtype=torch.int64)
    out["initialized"] = torch.tensor(record.initialized)
    out["skipped_steps"] = torch.tensor(record.skipped_steps, dtype=torch.int64)
    for side, side_rec in record.sides.items():
        for field_name in _RECORD_FIELDS:
            out[f"{side}.{field_name}"] = torch.tensor(getattr(side_rec, field_name), dtype=torch.int64)
    return block.param_index, f"block{block.block_index}", out


def _split_entry(entry: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Mapping[str, Tensor]]]:
    """A saved parameter entry as (AdamW state, blocks by ``"block{b}"``); the AdamW state is
    nested as ``"adamw"`` (or flat, as ``torch.optim.AdamW`` saves it)."""
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


def _unpack_record(saved: Mapping[str, Tensor]) -> _BlockRecord:
    record = _BlockRecord(
        step=int(saved["step"]),
        initialized=bool(saved["initialized"]),
        skipped_steps=int(saved["skipped_steps"]),
    )
    for side, side_rec in record.sides.items():
        for field_name in _RECORD_FIELDS:
            setattr(side_rec, field_name, int(saved[f"{side}.{field_name}"]))
    return record
