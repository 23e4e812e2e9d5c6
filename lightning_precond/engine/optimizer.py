"""The optimizer: orchestration of one step, gather -> algorithm per bucket -> scatter -> vectors.

:class:`PreconditionedOptimizer` runs any :class:`~lightning_precond.algorithms.base.Algorithm`
over an explicit list of owned blocks, grouped into same-shaped *buckets* whose state is
stacked ``[k, ...]`` so that every matrix operation is one batched ``torch.linalg`` / ``bmm``
call. The router decides which blocks this rank owns and where their updates go; the
engine never knows the backend, and never knows which algorithm runs.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn.parameter import is_lazy

from ..algorithms.base import Algorithm, GroupConfig, StepContext
from ..blocks import Block, BlockPlan, plan_blocks
from ..distributed.detect import deepspeed_took_over, parameters_are_sharded, resolve_router
from ..distributed.router import BlockUpdate, CheckpointLayout, Router
from ..options import EngineOptions
from . import checkpoint, shards
from .buckets import Bucket, selected
from .groups import PLAN_KEYS, check_group_keys, check_plan_keys, plan_limits, plan_values
from .refresh import RefreshedFactor, RefreshPolicy
from .stats import FactorStats, factor_stats, stats_order
from .screen import PositionCache, VectorWork, must_agree, screen, vector_checks
from .vectors import adamw_step, zero_adamw_state

__all__ = ["PreconditionedOptimizer"]


def spectrally_normalized(update: Tensor) -> Tensor:
    """``U / ||U||_op`` for every block of a stack ``[k, m, n]`` (a zero block stays zero)."""
    norms = torch.linalg.matrix_norm(update, ord=2, keepdim=True)
    return update / norms.clamp_min(torch.finfo(update.dtype).tiny)


class PreconditionedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` running one algorithm over blocked parameters.

    Matrix parameters (order >= 2) are cut into blocks (:mod:`lightning_precond.blocks`);
    vectors and scalars, and every parameter of a group with ``"precondition": False``, take
    AdamW with the hyperparameters the group's config names (``vector_adamw``). A group may
    also set ``max_preconditioner_dim`` and ``max_factor_dim`` for its own parameters; any
    other key that is not a hyperparameter raises (:mod:`lightning_precond.engine.groups`).

    Raises:
        ValueError: an invalid option or hyperparameter, an unknown param-group key, or (at
            the first step) a parameter that is not materialized yet (lazy, meta device).
    """

    def __init__(self, params: Iterable[Any], defaults: GroupConfig, algorithm: Algorithm, **options: Any) -> None:
        self.algorithm = algorithm
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(EngineOptions)})
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got an unexpected keyword argument {unknown[0]!r} (neither a "
                f"hyperparameter nor an option; options: {', '.join(f.name for f in dataclasses.fields(EngineOptions))})"
            )
        self.options = EngineOptions(**options)
        if not algorithm.sides and self.options.max_factor_dim is not None:
            check_plan_keys({"max_factor_dim": self.options.max_factor_dim}, False, type(self).__name__)
        self._configs: dict[int, tuple[tuple[Any, ...], GroupConfig]] = {}
        # The param-group dicts and their parameters as built (DeepSpeed ZeRO later replaces
        # the parameters by flat partitions inside the same dicts; see _groups()).
        self._group_dicts: list[dict[str, Any]] = []
        self._group_params: list[list[Tensor]] = []
        super().__init__(params, {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)})
        self._plan: BlockPlan | None = None
        self._planned: list[list[Tensor]] | None = None  # the parameters the plan indexes, per group
        self._group_of: list[int] = []
        self._shapes: list[tuple[int, ...]] = []
        # Vectors held as flat fragments (DeepSpeed ZeRO): param index -> (flat start, AdamW state).
        self._fragment_state: dict[int, tuple[int, dict[str, Tensor]]] = {}
        self._router: Router | None = None
        self._vector_positions: PositionCache = {}  # the screen's index tensors, built once
        self._buckets: list[Bucket] = []
        self._owners: list[int] = []  # owner of each planned block
        self._planned_blocks: tuple[Block, ...] = ()
        self._refresh = RefreshPolicy(algorithm, self.options, self._name_of_index, self._config)
        self._steps_taken = 0
        self._consolidated: checkpoint.Consolidated | None = None
        self._sharded_depth = 0  # > 0 inside lightning_precond.sharded_state_dict(self)
        self._checkpoint_calls = 0  # collectives of checkpoints taken (names their rendezvous)
        self._vector_skips: dict[int, int] = {}  # param index -> steps refused (not checkpointed)
        self._skip_warned: set[tuple[int, int]] = set()
        # Each group's plan options when its blocks were planned (edits afterwards are refused).
        self._planned_values: list[tuple[bool, int | None, int | None]] = []

    # ------------------------------------------------------------------ groups and configs
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, also after the first step (progressive unfreezing): its blocks are
        planned at the next step, existing blocks keep their owners and state. Everything is
        validated before the group is added; backends that cannot hold new parameters
        (FSDP, DeepSpeed ZeRO) refuse."""
        router = getattr(self, "_router", None)
        if getattr(self, "_plan", None) is not None and router is not None and not router.supports_new_params:
            raise RuntimeError(
                f"add_param_group after the first step is not supported under {type(router).__name__}: the "
                "backend already sharded the parameters; build the optimizer with every group (requires_grad=False "
                "parameters simply get no gradient until unfrozen)"
            )
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in (p[1] if isinstance(p, tuple) else p for p in params):
            # A lazy parameter (nn.LazyLinear) is only checked when the blocks are planned.
            if isinstance(p, Tensor) and not is_lazy(p) and torch.is_complex(p):
                raise ValueError("complex parameters are not supported by preconditioned optimizers")
        name = type(self).__name__
        check_group_keys(param_group, self.defaults, checkpoint.TAGS, self.param_groups, name)
        check_plan_keys(param_group, bool(self.algorithm.sides), name)
        # validate the group as it will be, before adding it
        self._check_decay(self.algorithm.config_type.from_group({**self.defaults, **param_group}))
        super().add_param_group({**param_group, "params": params})
        group = self.param_groups[-1]
        self._group_dicts.append(group)
        self._group_params.append(list(group["params"]))
        if getattr(self, "_plan", None) is not None:
            self._plan = None  # re-planned at the next step; existing blocks keep owners and state
        self._consolidated = None

    def _config(self, group_index: int) -> GroupConfig:
        """The validated config of a param group, rebuilt only when the group's values changed
        (a learning-rate schedule, or a user editing the group)."""
        group = self._groups()[group_index]
        cached = self._configs.get(group_index)
        if cached is not None and cached[1].values_of(group) == cached[0]:
            return cached[1]
        config = self._check_decay(self.algorithm.config_type.from_group(group))
        self._configs[group_index] = (config.values_of(group), config)
        return config

    def _check_decay(self, config: GroupConfig) -> GroupConfig:
        """Independent weight decay is a fraction of the weights per step: at most 1."""
        if self.options.weight_decay_mode == "independent" and config.weight_decay > 1.0:
            raise ValueError(
                "weight_decay must be in [0, 1] with weight_decay_mode='independent' (W <- (1 - weight_decay) W "
                f"each step), got {config.weight_decay}"
            )
        return config

    def _groups(self) -> list[dict[str, Any]]:
        """The param groups that ``Block.group_index`` indexes.

        ``self.param_groups`` except under DeepSpeed ZeRO, which calls ``step()`` with
        ``param_groups`` cut to one group (ZeRO-1/2) or drops empty groups: there, the dicts
        as built (DeepSpeed edits them in place, so learning-rate schedules still apply).
        """
        if self._flat_partitions():
            return self._group_dicts
        return self.param_groups

    # ------------------------------------------------------------------ set-up
    def _all_params(self) -> list[Tensor]:
        """The parameters the plan indexes (once planned), else those in ``param_groups``."""
        if self._planned is not None:
            return [p for group in self._planned for p in group]
        return [p for group in self.param_groups for p in group["params"]]

    def _deepspeed_took_over(self) -> bool:
        return deepspeed_took_over(self._group_params)

    def _parameters_final(self) -> bool:
        """Whether a sharding backend already holds the parameters (DeepSpeed ZeRO, FSDP1,
        FSDP2), so that planning now cannot bind to tensors it would swap later. Then
        ``state_dict()`` plans first: checkpoint templates built from it (DCP, Accelerate's
        FSDP loaders) must cover every block, even before the first step."""
        return self._deepspeed_took_over() or parameters_are_sharded(self._all_params())

    def _flat_partitions(self) -> bool:
        return self._router is not None and self._router.flat_partitions

    def _plan_values(self, group_index: int) -> tuple[bool, int | None, int | None]:
        """A group's ``(precondition, max_preconditioner_dim, max_factor_dim)`` (its own, else
        the optimizer's)."""
        return plan_values(self._groups()[group_index], self.options)

    def _check_plan_unchanged(self) -> None:
        """Refuse a plan option edited in a planned group (its blocks would silently keep the
        old plan, or be re-mapped under existing state)."""
        for gi, planned in enumerate(self._planned_values):
            current = self._plan_values(gi)
            for key, old, new in zip(PLAN_KEYS, planned, current):
                if old != new:
                    raise RuntimeError(
                        f"param group {gi}: {key!r} edited after the first step ({old!r} -> {new!r}); its "
                        "blocks keep the plan they were made with: restore it, or build a new optimizer"
                    )

    def _check_materialized(self, params: list[Tensor]) -> None:
        """Refuse parameters without storage yet, naming them, before anything is planned."""
        for index, p in enumerate(params):
            if is_lazy(p):
                raise ValueError(
                    f"{self._name_of_index(index)} is not initialized yet (a lazy module's parameter, e.g. "
                    "nn.LazyLinear): run one forward pass before the first step() (the optimizer may be "
                    "built before it)"
                )
            if p.is_meta:
                raise ValueError(
                    f"{self._name_of_index(index)} is on the meta device (no storage): materialize the model "
                    "(accelerator.prepare, model.to_empty(...), load_state_dict(assign=True)) and keep the "
                    "optimizer's param groups pointing at the real parameters before the first step()"
                )

    def _state_dtype(self, param: Tensor) -> torch.dtype:
        if self.options.preconditioner_dtype is not None:
            return self.options.preconditioner_dtype
        return torch.float64 if param.dtype == torch.float64 else torch.float32

    def _replan(self) -> None:
        """Forget the plan, the owners and all block state: the next step plans afresh."""
        self._plan, self._router, self._buckets = None, None, []
        self._owners, self._planned_blocks = [], ()

    def _setup(self) -> None:
        """Plan blocks, pick owners and allocate owned state (lazily: backends may swap params).

        After ``add_param_group`` the plan grows: the blocks planned before keep their owners
        and buckets, only the new ones are assigned and allocated."""
        if self._plan is not None:
            return
        current = [list(group["params"]) for group in self.param_groups]
        self._check_materialized([p for group in current for p in group])
        state_dtypes = {self._state_dtype(p) for group in current for p in group}
        communication_dtype = self.options.communication_dtype or (
            torch.float64 if torch.float64 in state_dtypes else torch.float32
        )
        router = self._router or resolve_router(
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
        groups = self._groups()
        unblocked = {i for i, gi in enumerate(group_of) if not groups[gi].get("precondition", True)}
        # One-sided algorithms (ASGO) leave their other side to the identity-side mechanism.
        one_side = getattr(self.algorithm, "one_side", None)
        limits = [plan_limits(groups[gi], self.options, one_side) for gi in range(len(planned))]
        plan = plan_blocks(global_shapes, group_of, limits, self.options.precondition_1d, unblocked=unblocked)
        keep = self._owners  # blocks planned before a group was added keep their owners
        if plan.blocks[: len(keep)] != self._planned_blocks:
            raise RuntimeError(
                "the blocks of parameters planned before add_param_group changed (was a group's "
                "'precondition' edited after the first step, or its 'max_preconditioner_dim' or "
                "'max_factor_dim'?); existing blocks must keep their plan"
            )
        owners = router.setup(params, plan, keep)
        self._planned, self._group_of, self._shapes = planned, group_of, global_shapes
        self._owners, self._planned_blocks = list(owners), plan.blocks
        existing = {block.id for bucket in self._buckets for block in bucket.blocks}
        # Blocks of one group, shape and set of identity sides share a bucket (their state
        # stacks: an identity side has no factor, so its state has other shapes).
        grouped: dict[tuple[int, int, int, tuple[str, ...]], list[Block]] = {}
        for block, owner in zip(plan.blocks, owners):
            if owner == router.rank and block.id not in existing:
                grouped.setdefault((block.group_index, *block.shape, block.identity), []).append(block)
        buckets = list(self._buckets)
        for (group_index, m, n, _), blocks in grouped.items():
            param = params[blocks[0].param_index]
            sides = blocks[0].factored(self.algorithm.sides)
            state = self.algorithm.create_state(
                len(blocks), m, n, self._config(group_index), self._state_dtype(param), param.device, sides
            )
            buckets.append(Bucket(blocks, state, sides))
        self._plan, self._router, self._buckets = plan, router, buckets
        self._planned_values = [self._plan_values(gi) for gi in range(len(planned))]
        if not router.flat_partitions:
            # Vectors' AdamW state exists from the start (as the blocks' does): checkpoint
            # templates built before the first step (DCP, FSDP1) then cover every parameter.
            for p, shape in zip(params, plan.matrix_shapes):
                if shape is None and not self.state.get(p):
                    self.state[p] = zero_adamw_state(p)

    # ------------------------------------------------------------------ step
    # torch.compile(opt.step), or a compiled training step that calls it, runs this eagerly:
    # the step is host-side orchestration (plans, per-block counters, one host sync) around
    # batched linear algebra, so tracing it gains nothing and its Python ints would recompile
    # it at every step. The surrounding code (the model) is compiled as usual.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step: every check that can fail (gradients, group values, finiteness, on all
        ranks) runs before any state or parameter changes. Under ``torch.compile`` it runs
        eagerly (a graph break), giving the eager result."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        self._setup()
        configs = [self._config(gi) for gi in range(len(self._groups()))]
        assert self._router is not None and self._plan is not None
        self._check_params_unchanged()
        self._check_plan_unchanged()
        self._steps_taken += 1
        self._router.begin_step(self.param_groups)
        try:
            vectors = self._vector_work()
            policy = self.options.nonfinite_grad
            vector_ok, verdict = vector_checks(vectors, len(self._plan.matrix_shapes), self._device(vectors),
                                               must_agree(policy, self._router), self._vector_positions)
            # The gather carries the vectors' verdict to every rank; under "raise" the screen's
            # all-reduce agrees on it with the blocks'.
            work, agreed = self._block_work(verdict if policy != "raise" else None)
            finite, used, vectors_finite = self._screen(work, vectors, vector_ok, verdict, agreed)
            self._step_blocks(work, finite, used, configs)
            self._step_vectors(vectors, vectors_finite, configs)
        finally:
            self._router.end_step()
        self._refresh.raise_fatal()  # the step is whole; now stop the run if a factor is lost
        return loss

    def _check_params_unchanged(self) -> None:
        """Refuse to step on parameters other than those the plan was made for (a backend that
        swapped them afterwards would leave the blocks updating tensors nobody uses)."""
        assert self._router is not None and self._planned is not None
        if self._router.flat_partitions:
            return
        if self._deepspeed_took_over():
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

    def _check_gradients(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self._name(p)}: sparse gradients are not supported")
                if torch.is_complex(p.grad):
                    raise RuntimeError(f"{self._name(p)}: complex gradients are not supported")
                if p.grad.shape != p.shape:
                    raise RuntimeError(
                        f"{self._name(p)}: gradient of shape {tuple(p.grad.shape)} for a parameter of "
                        f"shape {tuple(p.shape)}"
                    )

    def _device(self, vectors: list[VectorWork]) -> torch.device:
        """Where this step's checks live: the vectors' gradients', else the parameters'."""
        if vectors:
            return vectors[0].grad.device
        params = self._all_params()
        return params[0].device if params else torch.device("cpu")

    def _block_work(self, verdict: Tensor | None = None) -> tuple[list[tuple[Bucket, list[int], Tensor]], Tensor | None]:
        """Per bucket: the rows with a gradient and their gradients stacked ``[k, m, n]``; and
        ``verdict``'s minimum over ranks when given (see :meth:`Router.gather`)."""
        assert self._router is not None
        work = []
        # One call for every owned block: routers with collectives make one per step.
        all_grads, agreed = self._router.gather([b for bucket in self._buckets for b in bucket.blocks], verdict)
        offset = 0
        for bucket in self._buckets:
            grads = all_grads[offset : offset + len(bucket.blocks)]
            offset += len(bucket.blocks)
            present = [i for i, g in enumerate(grads) if g is not None]
            if not present:
                continue
            dtype = next(iter(bucket.tensors().values())).dtype
            stacked = torch.stack([grads[i] for i in present]).to(dtype)  # type: ignore[misc]
            if self.options.maximize:
                stacked = stacked.neg()  # ascend: the algorithm sees -G (exact, as torch.optim's maximize)
            work.append((bucket, present, stacked))
        return work, agreed

    def _vector_work(self) -> list[VectorWork]:
        """The vectors (and unblocked parameters) with a gradient on this rank."""
        assert self._plan is not None and self._router is not None
        pieces = self._router.vector_pieces()
        out: list[VectorWork] = []
        if pieces is None:
            index = 0
            for gi, group in enumerate(self.param_groups):
                for p in group["params"]:
                    if self._plan.matrix_shapes[index] is None and p.grad is not None:
                        out.append(VectorWork(index, gi, p, p.grad, None))
                    index += 1
            return out
        # Flat fragments (DeepSpeed ZeRO): elementwise, so each element follows one process.
        for piece in pieces:
            if piece.grad is not None and piece.numel > 0:
                out.append(VectorWork(piece.param_index, self._group_of[piece.param_index], piece.value,
                                      piece.grad, piece.flat_start))
        return out

    def _screen(
        self, work: list[tuple[Bucket, list[int], Tensor]], vectors: list[VectorWork], vector_ok: Tensor,
        verdict: Tensor, agreed: Tensor | None,
    ) -> tuple[list[bool], list[bool], list[bool]]:
        assert self._router is not None
        return screen(work, vectors, self.algorithm.gradient_headroom, self.options.nonfinite_grad, self._router,
                      self._name_of_index, vector_ok, verdict, agreed)

    def _step_blocks(self, work: list[tuple[Bucket, list[int], Tensor]], finite: list[bool], used: list[bool],
                     configs: list[GroupConfig]) -> None:
        assert self._router is not None
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
            updates.extend(self._step_bucket(bucket, present, stacked, flags, configs[bucket.group_index]))
        self._router.apply_updates(updates, [self._decay(config) for config in configs])

    def _decay(self, config: GroupConfig) -> float:
        """The group's weight-decay factor under the ``weight_decay_mode`` option."""
        return self.options.decay(config.lr, config.weight_decay)

    def _step_bucket(
        self, bucket: Bucket, present: list[int], grads: Tensor, finite: list[bool], config: GroupConfig
    ) -> list[BlockUpdate]:
        records = bucket.records
        for i, ok in zip(present, finite):
            if not ok:
                records[i].skipped_steps += 1
                self._note_skip(bucket.blocks[i].param_index, records[i].skipped_steps)
        # Blocks in the same phase and at the same step are computed together.
        phases: dict[tuple[bool, int], list[int]] = {}
        for row, (i, ok) in enumerate(zip(present, finite)):
            if ok:
                phases.setdefault((records[i].initialized, records[i].step), []).append(row)
        updates: list[BlockUpdate] = []
        # W <- decay W - a U (AdamW order), or (W - a U) decay when the algorithm decays after.
        after = self._decay(config) if self.algorithm.decays_after_update(config) else 1.0
        for (initialized, step), rows in phases.items():
            positions = [present[r] for r in rows]
            g = grads if len(rows) == grads.shape[0] else grads[rows]
            with selected(bucket.state, positions, len(bucket.blocks)) as state:
                direction = self.algorithm.step(state, g, self._context(bucket, positions, state, step + 1,
                                                                        not initialized, config))
            for i in positions:
                records[i].initialized = True
                if direction is not None:
                    records[i].step = step + 1
            if direction is None:
                continue
            if self._groups()[bucket.group_index].get("spectral_normalization", False):
                delta = spectrally_normalized(direction.update) * (-config.lr * after)
            else:
                delta = direction.update * (-direction.step_size * after)
            updates.extend(BlockUpdate(bucket.blocks[i], delta[r]) for r, i in enumerate(positions))
        return updates

    def _context(self, bucket: Bucket, positions: list[int], state: Any, step: int, first: bool,
                 config: GroupConfig) -> StepContext:
        policy = self._refresh
        return StepContext(
            step=step,
            first=first,
            config=config,
            refresh_all=lambda method: policy.refresh_sides(bucket, positions, state, method, bucket.sides, 0),
            refresh_if_due=lambda: policy.maybe_refresh(bucket, positions, state, step, config),
        )

    def _step_vectors(self, vectors: list[VectorWork], finite: list[bool], configs: list[GroupConfig]) -> None:
        """AdamW on the vectors whose gradients passed the screen; a refused one is left as
        if it had no gradient (no moment, step count or weight-decay change) and counted."""
        by_group: dict[int, list[tuple[Tensor, Tensor, dict[str, Tensor]]]] = {}
        for v, ok in zip(vectors, finite):
            if not ok:
                self._vector_skips[v.param_index] = self._vector_skips.get(v.param_index, 0) + 1
                self._note_skip(v.param_index, self._vector_skips[v.param_index])
                continue
            if v.flat_start is None:
                if not self.state.get(v.value):
                    self.state[v.value] = zero_adamw_state(v.value)
                state = self.state[v.value]
            else:
                if v.param_index not in self._fragment_state:
                    self._fragment_state[v.param_index] = (v.flat_start, zero_adamw_state(v.value))
                state = self._fragment_state[v.param_index][1]
            by_group.setdefault(v.group_index, []).append((v.value, v.grad, state))
        for group_index, items in by_group.items():
            adamw_step(items, configs[group_index], maximize=self.options.maximize, foreach=self.options.foreach,
                       independent_decay=self.options.weight_decay_mode == "independent")

    def _note_skip(self, param_index: int, count: int) -> None:
        """Warn when a parameter's gradient is refused for the 1st, 10th, 100th, ... time."""
        if count >= 1 and math.log10(count).is_integer() and (param_index, count) not in self._skip_warned:
            self._skip_warned.add((param_index, count))
            warnings.warn(
                f"{self._name_of_index(param_index)}: non-finite (or overflowing) gradient refused, its step "
                f"skipped ({count} time{'s' if count > 1 else ''} so far; skipped_steps() counts them)",
                RuntimeWarning,
                stacklevel=4,
            )

    def skipped_steps(
        self, names: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor] | None = None, gather: bool = False
    ) -> dict[str, int]:
        """Steps refused per parameter (non-finite or overflowing gradients; a block's count
        is also in :class:`FactorStats`), only parameters with skips: held here, or on every
        rank with ``gather=True`` (a collective). Block counts are checkpointed; vector
        counts are not."""
        self._setup()
        lookup = self._names_from(names)
        counts: dict[int, int] = dict(self._vector_skips)
        for bucket in self._buckets:
            for block, record in zip(bucket.blocks, bucket.records):
                if record.skipped_steps:
                    counts[block.param_index] = max(counts.get(block.param_index, 0), record.skipped_steps)
        if gather:
            assert self._router is not None
            merged: dict[int, int] = {}
            for index, count in self._router.gather_objects(list(counts.items())):
                merged[index] = max(merged.get(index, 0), count)
            counts = merged
        return {lookup.get(i) or self._name_of_index(i): n for i, n in sorted(counts.items())}

    # ------------------------------------------------------------------ control (callbacks)
    @property
    def refresh_owner(self) -> object | None:
        """Who schedules refreshes; ``None`` means the optimizer's own ``refresh`` policy."""
        return self._refresh.owner

    def attach_refresh_owner(self, owner: object) -> None:
        """Hand refresh scheduling to ``owner`` (e.g. a callback): the optimizer's own
        frequency-based or adaptive refresh stops until :meth:`detach_refresh_owner`."""
        current = self._refresh.owner
        if current is not None and current is not owner:
            raise RuntimeError(
                f"refresh scheduling is already owned by {type(current).__name__}; "
                "attach only one scheduler (RootRecomputeScheduler or AdaptiveEigenbasisRefresh)"
            )
        self._refresh.owner = owner

    def detach_refresh_owner(self, owner: object | None = None) -> None:
        if owner is None or owner is self._refresh.owner:
            self._refresh.owner = None

    def first_refresh_steps(self) -> list[int]:
        """Per param group, the first step at which bases are refreshed by the schedule (0:
        the algorithm builds its basis from the first gradient)."""
        return [self.algorithm.refresh_start(self._config(gi)) for gi in range(len(self._groups()))]

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
        self._setup()
        assert self._plan is not None
        known = {b.id: b.factored(self.algorithm.sides) for b in self._plan.blocks}
        refreshed = self._refresh.refresh_now(self._buckets, known, select, method, tolerance)
        self._refresh.raise_fatal()
        return refreshed

    def preconditioner_stats(
        self,
        names: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor] | None = None,
        gather: bool = False,
    ) -> list[FactorStats]:
        """One record per factor (see :class:`FactorStats`), sorted by block id and side
        (none for algorithms without factors, such as Muon).

        By default only the factors this rank owns; with ``gather=True`` every rank's
        records are collected on every rank (a collective: all ranks must call it).

        Staleness is computed on demand from the current factors (two batched matmuls per
        stack), so nothing is spent when this is never called. ``names`` (e.g.
        ``model.named_parameters()``) names the parameters when the optimizer was not built
        from named parameters.
        """
        self._setup()
        lookup = self._names_from(names)
        records = factor_stats(
            self.algorithm, self._buckets, lambda index: lookup.get(index) or self._name_of_index(index)
        )
        if gather:
            assert self._router is not None
            records = self._router.gather_objects(records)
        return sorted(records, key=stats_order)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (block state and vector state)."""
        total = sum(t.numel() * t.element_size() for b in self._buckets for t in b.tensors().values())
        states = [*self.state.values(), *(state for _, state in self._fragment_state.values())]
        for state in states:
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor))
        return total

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The standard ``torch.optim`` format, ``{"state": {param_index: {...}}, "param_groups"}``
        (layout: :mod:`lightning_precond.engine.checkpoint`), in one of two forms
        (:mod:`lightning_precond.engine.shards`):

        * **full** (the default): complete on rank 0 only. With several ranks it is a
          collective: every rank calls it (Accelerate does), or every rank calls
          :meth:`consolidate_state_dict` first and then only the writer calls this (Lightning
          does). Blocks stream to the writer one at a time; the other ranks get a dict that
          ``torch.save`` and ``load_state_dict`` refuse.
        * **sharded**: this rank's blocks only, inside :func:`lightning_precond.sharded_state_dict`,
          inside DCP's ``get_optimizer_state_dict`` with ``full_state_dict=False``, and under
          DeepSpeed ZeRO (one file per rank). No collective.

        Under FSDP1 it is the per-rank input of FSDP's own optimizer-state API
        (``FSDP.optim_state_dict``, which gathers it to every rank: the documented exception).
        """
        if self._router is None and (
            self._parameters_final() or shards.wants_sharded(self, CheckpointLayout())
        ):
            self._setup()
        consolidated, self._consolidated = self._consolidated, None
        return checkpoint.state_dict(self, consolidated)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Assemble the complete state on rank ``to`` only (a collective: call it on every
        rank), so that a following :meth:`state_dict` on rank ``to`` needs no collective; the
        other ranks should not call it then. Lightning's ``DDPStrategy`` calls this on all
        ranks and ``state_dict()`` on rank 0 only (the ``ZeroRedundancyOptimizer`` convention).
        """
        if not isinstance(to, int) or isinstance(to, bool) or to < 0:
            raise ValueError(f"to must be a rank (an int >= 0), got {to!r}")
        if self._router is not None:
            world = self._router.world_size
        else:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if to >= world:
            raise ValueError(f"to must be a rank below the world size {world}, got {to}")
        consolidated = checkpoint.consolidate(self, to)
        # Kept on the writer only: a later state_dict() elsewhere is a new collective.
        self._consolidated = consolidated if consolidated.blocks is not None else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved at any world size, full or sharded (a shard only where the
        sharded form is selected, see :meth:`state_dict`); validated fully before anything
        changes. A shard must hold every block this rank owns.

        Under FSDP1 each rank needs only the entries of the parameters it holds a piece of
        (what ``FSDP.optim_state_dict_to_load`` hands it).
        """
        checkpoint.load_state_dict(self, state_dict)
        self._consolidated = None  # what it assembled is not the state any more

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

    def _names_from(self, names: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor] | None) -> dict[int, str]:
        if names is None:
            return {}
        pairs = names.items() if isinstance(names, Mapping) else names
        by_id = {id(p): n for n, p in pairs}
        return {i: by_id[id(p)] for i, p in enumerate(self._all_params()) if id(p) in by_id}
