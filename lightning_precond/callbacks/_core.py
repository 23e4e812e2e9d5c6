"""The one implementation behind the Lightning callbacks and the Accelerate hooks.

Everything here is framework-free: it sees optimizers and an optimizer-step count. The
Lightning callbacks (:mod:`.refresh`, :mod:`.monitor`) and
:class:`lightning_precond.accelerate.PreconditionerHooks` are thin front-ends that decide
*when* to call into it (after an optimizer step) and *where* metrics go.

Steps are counted like ``Trainer.global_step``: ``step`` is the number of optimizer steps
completed, so the first call after the first ``optimizer.step()`` passes ``step=1``.

Distributed runs: every rank must make the same calls with the same ``step``; the
decisions below depend on ``step`` and the arguments only, never on rank-local data, so
the collectives inside (``refresh_eigenbasis``, ``preconditioner_stats(gather=True)``,
the refreshed-factor count) line up across ranks.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor

from ..algorithms.eigenbasis import REFRESH_METHODS
from ..engine import FactorStats, PreconditionedOptimizer

__all__ = [
    "AdaptiveRefresh",
    "RefreshSchedule",
    "ScheduledRefresh",
    "StalenessReport",
    "preconditioned_optimizers",
    "unwrap_optimizer",
]

# How far back a jump in the step count is searched for a due refresh (a resumed run that
# lost this object's state can jump by thousands; a normal run advances by one).
_MAX_LOOKBACK = 1024

NamedParameters = Iterable[tuple[str, Tensor]] | Mapping[str, Tensor]


# ---------------------------------------------------------------------------- optimizers
def unwrap_optimizer(optimizer: Any) -> Any:
    """The client optimizer inside framework wrappers.

    Unwraps Lightning's ``LightningOptimizer`` (``._optimizer``), DeepSpeed's ZeRO wrapper
    and Accelerate's ``AcceleratedOptimizer`` (both ``.optimizer``), in any nesting.
    """
    for _ in range(8):
        # LightningOptimizer first: it poses as a subclass of the optimizer it wraps, with
        # a *copy* of its __dict__, so attributes set through it never reach the optimizer.
        inner = getattr(optimizer, "_optimizer", None)
        if inner is None:
            if isinstance(optimizer, PreconditionedOptimizer):
                return optimizer
            inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            return optimizer
        optimizer = inner
    return optimizer


def preconditioned_optimizers(
    optimizers: Iterable[Any], user: str, *, with_basis: bool = False
) -> tuple[list[PreconditionedOptimizer], list[Any]]:
    """Split ``optimizers`` (unwrapped) into preconditioned ones and the others; with
    ``with_basis``, optimizers whose algorithm keeps no eigenbasis (Muon) count as others.

    Raises:
        TypeError: if none of them qualifies; the message names ``user`` and the optimizer
            types found.
    """
    found: list[PreconditionedOptimizer] = []
    foreign: list[Any] = []
    for optimizer in optimizers:
        inner = unwrap_optimizer(optimizer)
        usable = isinstance(inner, PreconditionedOptimizer) and (not with_basis or bool(inner.algorithm.sides))
        (found if usable else foreign).append(inner)
    if not found:
        kinds = ", ".join(sorted({type(o).__name__ for o in foreign})) or "no optimizer"
        needed = "with eigenbases (SOAP, Shampoo, KLShampoo, KLSOAP or EigenvalueCorrectedShampoo)"
        raise TypeError(
            f"{user} needs a lightning_precond.PreconditionedOptimizer "
            f"{needed if with_basis else '(e.g. SOAP, Shampoo, KLShampoo, Muon)'}, got {kinds}"
        )
    return found, foreign


def _check_method(method: str | None, name: str = "method") -> None:
    if method is not None and method not in REFRESH_METHODS:
        raise ValueError(f"{name} must be None or one of {REFRESH_METHODS}, got {method!r}")


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _frequency(optimizer: PreconditionedOptimizer) -> tuple[int, bool]:
    """The smallest ``precondition_frequency`` of the groups, and whether the groups differ."""
    values = {int(group["precondition_frequency"]) for group in optimizer.param_groups}
    return min(values), len(values) > 1


def _first_basis_step(optimizer: PreconditionedOptimizer) -> int | None:
    """The last step after which an owner must refresh so the first preconditioned step has
    a basis, or ``None`` when the optimizer builds one from the first gradient (SOAP & co).
    0 when preconditioning starts at step 1 (ASGO; Shampoo told so): its roots are built
    inside that step (the engine refreshes a never-refreshed factor once preconditioning
    starts, also under an owner), and the schedule's phase is ``k, 2k, ...`` as the optimizer's."""
    starts = [start for start in optimizer.first_refresh_steps() if start > 0]
    if not starts:
        return None
    return min(starts) - 1


# ---------------------------------------------------------------------------- decisions
class RefreshSchedule:
    """When eigenbases (Shampoo: roots) are recomputed; pure, so it is trivially resumable.

    Three kinds, decided by :meth:`should_refresh` from the optimizer-step count alone:

    * fixed frequency -- ``RefreshSchedule(every=k)``: after steps ``k, 2k, 3k, ...``;
    * warm-up then sparse -- ``RefreshSchedule(every=k, warmup_steps=n, warmup_every=w)``:
      after every ``w``-th step up to step ``n``, then after ``n + k, n + 2k, ...``;
    * a callable -- ``RefreshSchedule(schedule=lambda step: ...)`` returning a bool.

    ``every=None`` (with or without warm-up) means "the optimizer's own
    ``precondition_frequency``", filled in by :meth:`resolve`. ``RefreshSchedule()``
    resolves to the algorithm's own phase as well: SOAP-like optimizers (basis from the
    first gradient) refresh after steps ``k + 1, 2k + 1, ...``, exactly when they would
    themselves; Shampoo refreshes after step ``start_preconditioning_step - 1`` and every
    ``k`` steps from there, so its first preconditioned step has roots.

    Args:
        every: optimizer steps between refreshes (after the warm-up), or ``None``.
        warmup_steps: number of initial steps refreshed every ``warmup_every`` steps.
        warmup_every: refresh interval during the warm-up.
        schedule: ``step -> bool``; excludes the other arguments.

    Raises:
        ValueError: for a non-positive ``every``/``warmup_every``, a negative
            ``warmup_steps``, a non-callable ``schedule`` or ``schedule`` combined with
            ``every``/``warmup_steps``.

    Example::

        >>> s = RefreshSchedule(every=10, warmup_steps=3)
        >>> [step for step in range(1, 30) if s.should_refresh(step)]
        [1, 2, 3, 13, 23]
    """

    def __init__(
        self,
        every: int | None = None,
        *,
        warmup_steps: int = 0,
        warmup_every: int = 1,
        schedule: Callable[[int], bool] | None = None,
    ) -> None:
        if every is not None:
            _check_int(every, "every", 1)
        _check_int(warmup_steps, "warmup_steps", 0)
        _check_int(warmup_every, "warmup_every", 1)
        if schedule is not None:
            if not callable(schedule):
                raise ValueError(f"schedule must be a callable step -> bool, got {schedule!r}")
            if every is not None or warmup_steps:
                raise ValueError(
                    "schedule (a callable) cannot be combined with every or warmup_steps; "
                    "put the whole rule in the callable"
                )
        self.every = every
        self.warmup_steps = warmup_steps
        self.warmup_every = warmup_every
        self.schedule = schedule
        # The first refresh after the warm-up; the default phase of an algorithm may differ.
        self._first = None if every is None else warmup_steps + every

    def __repr__(self) -> str:
        if self.schedule is not None:
            return f"RefreshSchedule(schedule={self.schedule!r})"
        return (
            f"RefreshSchedule(every={self.every}, warmup_steps={self.warmup_steps}, "
            f"warmup_every={self.warmup_every})"
        )

    @property
    def resolved(self) -> bool:
        """Whether :meth:`should_refresh` can answer without an optimizer."""
        return self.schedule is not None or self.every is not None

    def resolve(self, optimizer: PreconditionedOptimizer) -> RefreshSchedule:
        """This schedule with ``every=None`` replaced by the optimizer's own frequency."""
        if self.resolved:
            return self
        every, _ = _frequency(optimizer)
        out = RefreshSchedule(every, warmup_steps=self.warmup_steps, warmup_every=self.warmup_every)
        if not self.warmup_steps:
            first = _first_basis_step(optimizer)
            out._first = every + 1 if first is None else first
        return out

    def should_refresh(self, step: int) -> bool:
        """Whether to refresh right after optimizer step ``step`` (1-based).

        Raises:
            RuntimeError: if ``every`` is still ``None`` (call :meth:`resolve` first).
        """
        if step < 1:
            return False
        if self.schedule is not None:
            return bool(self.schedule(step))
        if self.every is None or self._first is None:
            raise RuntimeError("RefreshSchedule(every=None) must be resolve()d against an optimizer first")
        if step <= self.warmup_steps:
            return step % self.warmup_every == 0
        return step >= self._first and (step - self._first) % self.every == 0


class _StepTracker:
    """Which optimizer steps were completed since the last call (gradient accumulation and
    several optimizer steps per batch both make the count move by 0 or by more than 1).

    Before the first call (and without a synced or loaded count) only the given step is
    new: an object created in the middle of a run does not replay earlier steps.
    """

    def __init__(self) -> None:
        self.last_step: int | None = None

    def sync(self, step: int | None) -> None:
        """Start counting from ``step`` (a new or resumed run)."""
        self.last_step = None if step is None else int(step)

    def new_steps(self, step: int) -> range:
        step = int(step)
        last = step - 1 if self.last_step is None or step < self.last_step else self.last_step
        self.last_step = step
        return range(max(last + 1, step - _MAX_LOOKBACK + 1), step + 1)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def count_across_ranks(keys: Sequence[Any]) -> int:
    """Number of distinct ``keys`` over all ranks (a collective when distributed).

    Distinct, not summed: with block ownership each factor is refreshed by one rank, but a
    replicated optimizer refreshes the same factor on every rank.
    """
    if _world_size() == 1:
        return len(set(keys))
    gathered: list[Any] = [None] * _world_size()
    dist.all_gather_object(gathered, list(keys))
    return len({key for part in gathered for key in part})


# ---------------------------------------------------------------------------- actions
class _RefreshOwnerCore:
    """Shared by the two owners: attaching to optimizers and resumable counters."""

    def __init__(self) -> None:
        self._steps = _StepTracker()
        self._optimizers: list[PreconditionedOptimizer] = []
        self._owner: object | None = None
        self.last_refresh_step = 0  # last step after which this owner refreshed anything
        self.refresh_calls = 0  # number of refresh rounds run
        self.refresh_seconds = 0.0  # wall-clock time spent in those rounds (this rank)

    def attach(self, optimizers: Sequence[PreconditionedOptimizer], owner: object) -> list[str]:
        """Own the refresh schedule of ``optimizers`` (their own refresh stops); returns
        notes worth a warning (none here).

        Raises:
            RuntimeError: if another owner is attached to one of them (nothing stays attached).
        """
        attached: list[PreconditionedOptimizer] = []
        try:
            for optimizer in optimizers:
                optimizer.attach_refresh_owner(owner)
                attached.append(optimizer)
        except RuntimeError:
            for optimizer in attached:
                optimizer.detach_refresh_owner(owner)
            raise
        self._optimizers, self._owner = list(optimizers), owner
        return []

    def detach(self) -> None:
        """Give the schedule back to the optimizers (idempotent)."""
        for optimizer in self._optimizers:
            optimizer.detach_refresh_owner(self._owner)
        self._optimizers, self._owner = [], None

    @property
    def optimizers(self) -> list[PreconditionedOptimizer]:
        return list(self._optimizers)

    def sync(self, step: int) -> None:
        self._steps.sync(step)

    def _timed_refresh(self, step: int, calls: Iterable[Callable[[], list[Any]]]) -> list[Any]:
        started = time.perf_counter()
        refreshed: list[Any] = []
        for call in calls:
            refreshed.extend(call())
        self.refresh_seconds += time.perf_counter() - started
        self.refresh_calls += 1
        self.last_refresh_step = step
        return refreshed

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._steps.last_step,
            "last_refresh_step": self.last_refresh_step,
            "refresh_calls": self.refresh_calls,
            "refresh_seconds": self.refresh_seconds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._steps.sync(state.get("last_step"))
        self.last_refresh_step = int(state.get("last_refresh_step", 0))
        self.refresh_calls = int(state.get("refresh_calls", 0))
        self.refresh_seconds = float(state.get("refresh_seconds", 0.0))


class ScheduledRefresh(_RefreshOwnerCore):
    """Refresh every factor when a :class:`RefreshSchedule` says so.

    Args:
        schedule: the decision rule (``every=None`` is resolved per optimizer on attach).
        method: ``"eigh"``, ``"qr"`` or ``"power"``; ``None`` is the optimizer's own
            ``refresh_method`` (the algorithm's default unless the user chose one).

    Raises:
        ValueError: for an unknown ``method``.
    """

    def __init__(self, schedule: RefreshSchedule, method: str | None = None) -> None:
        super().__init__()
        if not isinstance(schedule, RefreshSchedule):
            raise ValueError(f"schedule must be a RefreshSchedule, got {type(schedule).__name__}")
        _check_method(method)
        self.schedule = schedule
        self.method = method
        self._resolved: list[RefreshSchedule] = []

    def attach(self, optimizers: Sequence[PreconditionedOptimizer], owner: object) -> list[str]:
        """Attach and resolve the schedule per optimizer; returns warnings for the user."""
        super().attach(optimizers, owner)
        self._resolved = [self.schedule.resolve(opt) for opt in optimizers]
        notes: list[str] = []
        for optimizer, resolved in zip(optimizers, self._resolved, strict=True):
            name = type(optimizer).__name__
            if not self.schedule.resolved and _frequency(optimizer)[1]:
                notes.append(
                    f"{name} param groups have different precondition_frequency values; the "
                    f"schedule refreshes every factor every {resolved.every} steps (the smallest)"
                )
            first = _first_basis_step(optimizer)
            if first and not any(resolved.should_refresh(s) for s in range(1, first + 1)):
                notes.append(
                    f"{name} starts preconditioning after step {first} but {resolved!r} does not "
                    "refresh its roots by then: until the first refresh it preconditions with "
                    "empty roots (only grafting keeps the step size sane)"
                )
        return notes

    def should_refresh(self, step: int) -> bool:
        """The decision for ``step``: of the schedule as resolved for the (first) attached
        optimizer, or of the schedule itself when nothing is attached.

        Raises:
            RuntimeError: if nothing is attached and the schedule needs an optimizer.
        """
        return (self._resolved[0] if self._resolved else self.schedule).should_refresh(step)

    def advance(self, step: int) -> list[Any] | None:
        """Call after the optimizer step(s) up to ``step``; refreshes when due.

        Returns the factors refreshed on this rank (``[(optimizer_index, block_id, side)]``),
        or ``None`` when nothing was due.
        """
        new = self._steps.new_steps(step)
        calls = []
        for index, (optimizer, resolved) in enumerate(zip(self._optimizers, self._resolved, strict=True)):
            if any(resolved.should_refresh(s) for s in new):
                calls.append(_refresh_call(index, optimizer, method=self.method))
        if not calls:
            return None
        return self._timed_refresh(step, calls)


class AdaptiveRefresh(_RefreshOwnerCore):
    """Every ``check_every`` steps, refresh only the factors whose staleness exceeds
    ``tolerance`` (``refresh_eigenbasis(select="stale")``); factors never refreshed count
    as stale. For optimizers without a basis from the first gradient (Shampoo) one extra
    check runs right before preconditioning starts, so the first preconditioned step has
    roots.

    Args:
        tolerance: staleness threshold in ``(0, 1]`` (``||offdiag(Q^T A Q)|| / ||Q^T A Q||``).
        check_every: optimizer steps between checks.
        method: ``"qr"`` (warm-started QR algorithm, default), ``"eigh"`` or ``"power"``.

    Raises:
        ValueError: for a tolerance outside ``(0, 1]``, ``check_every < 1`` or an unknown method.
    """

    def __init__(self, tolerance: float = 0.1, check_every: int = 50, method: str = "qr") -> None:
        super().__init__()
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 < tolerance <= 1.0:
            raise ValueError(f"tolerance must be in (0, 1], got {tolerance!r}")
        _check_int(check_every, "check_every", 1)
        if method is None:
            raise ValueError(f"method must be one of {REFRESH_METHODS}, got None")
        _check_method(method)
        self.tolerance = float(tolerance)
        self.check_every = check_every
        self.method = method
        self.refreshed_total = 0  # factors refreshed over all checks (all ranks)
        self._early: set[int] = set()

    def attach(self, optimizers: Sequence[PreconditionedOptimizer], owner: object) -> list[str]:
        super().attach(optimizers, owner)
        self._early = {s for s in map(_first_basis_step, optimizers) if s is not None}
        return []

    def should_check(self, step: int) -> bool:
        return step >= 1 and (step % self.check_every == 0 or step in self._early)

    def advance(self, step: int) -> int | None:
        """Call after the optimizer step(s) up to ``step`` on every rank; returns the number of
        factors refreshed over all ranks when a check ran, else ``None``."""
        if not any(self.should_check(s) for s in self._steps.new_steps(step)):
            return None
        calls = [
            _refresh_call(i, opt, select="stale", method=self.method, tolerance=self.tolerance)
            for i, opt in enumerate(self._optimizers)
        ]
        count = count_across_ranks(self._timed_refresh(step, calls))
        self.refreshed_total += count
        return count

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "refreshed_total": self.refreshed_total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.refreshed_total = int(state.get("refreshed_total", 0))


def _refresh_call(index: int, optimizer: PreconditionedOptimizer, **kwargs: Any) -> Callable[[], list[Any]]:
    def call() -> list[Any]:
        return [(index, f.block_id, f.side) for f in optimizer.refresh_eigenbasis(**kwargs)]

    return call


# ---------------------------------------------------------------------------- metrics
_PER_FACTOR = (
    "staleness",
    "eigenvalue_staleness",
    "steps_since_refresh",
    "refresh_count",
    "failure_count",
    "refresh_seconds",
)


PerLayer = bool | str | Sequence[str]


def check_per_layer(per_layer: Any) -> bool | tuple[str, ...]:
    """``per_layer`` as the report uses it: a bool, or a tuple of name patterns.

    Raises:
        ValueError: for anything but a bool, a pattern or a sequence of patterns.
    """
    if isinstance(per_layer, bool):
        return per_layer
    if isinstance(per_layer, str):
        return (per_layer,)
    if isinstance(per_layer, Sequence) and per_layer and all(isinstance(p, str) for p in per_layer):
        return tuple(per_layer)
    raise ValueError(
        f"per_layer must be a bool, a parameter-name pattern or a non-empty list of patterns, got {per_layer!r}"
    )


class StalenessReport:
    """Every ``every`` optimizer steps, the preconditioner health as flat metrics.

    Names (``prefix`` is ``"precond"``; with several preconditioned optimizers it becomes
    ``"precond/optimizer<i>"``):

    * aggregated (always): ``<prefix>/staleness_mean`` and ``_max``,
      ``eigenvalue_staleness_mean`` and ``_max``, ``steps_since_refresh_mean`` and ``_max``,
      ``refresh_count_total``, ``failure_count_total``, ``refresh_seconds_total`` and
      ``factors``;
    * refused gradients (non-finite or overflowing; blocks and vectors, every algorithm):
      ``<prefix>/skipped_steps_max`` (the most any parameter was skipped) and
      ``<prefix>/skipped_parameters`` (how many parameters were ever skipped);
    * per factor, when ``per_layer`` selects it: ``<prefix>/<param_name>/<side>/<field>`` for
      the fields of :class:`~lightning_precond.FactorStats` (``staleness``,
      ``eigenvalue_staleness``, ``steps_since_refresh``, ``refresh_count``,
      ``failure_count``, ``refresh_seconds``); a parameter cut into several blocks gets
      ``<param_name>/block<b>/<side>/<field>``. Six columns per factor: a 24-layer
      transformer of width 768 has 480 factors (blocks of 1024), so about 2,900 columns with
      ``per_layer=True``.

    ``refresh_seconds`` is, as the engine reports it, the duration of each factor's latest
    refresh, so ``refresh_seconds_total`` is the cost of one refresh of everything.

    Args:
        every: optimizer steps between reports; ``None``: only when :meth:`collect` is
            called outside :meth:`due` (e.g. at the end of training).
        per_layer: ``False`` (default): aggregates only; ``True``: also every factor; a
            pattern or a list of patterns (:func:`fnmatch.fnmatchcase` on the parameter
            name, ``*`` matching dots too, e.g. ``"blocks.0.*"``): also the factors of the
            matching parameters.

    Raises:
        ValueError: for ``every < 1`` or an invalid ``per_layer``.
    """

    def __init__(self, every: int | None = 50, per_layer: PerLayer = False) -> None:
        self.every = every
        self.per_layer = check_per_layer(per_layer)
        self.last_report_step = 0
        self._steps = _StepTracker()

    @property
    def every(self) -> int | None:
        return self._every

    @every.setter
    def every(self, every: int | None) -> None:
        if every is not None:
            _check_int(every, "every", 1)
        self._every = every

    def sync(self, step: int) -> None:
        self._steps.sync(step)

    def due(self, step: int) -> bool:
        """Whether a report is due after the optimizer step(s) up to ``step`` (call once per step)."""
        new = self._steps.new_steps(step)
        return self._every is not None and any(s % self._every == 0 for s in new)

    def pending(self, step: int) -> bool:
        """Whether optimizer steps up to ``step`` were taken since the last report (a final
        report at the end of training is worth it)."""
        return int(step) > self.last_report_step

    def collect(
        self,
        optimizers: Sequence[PreconditionedOptimizer],
        names: NamedParameters | None = None,
        step: int | None = None,
    ) -> dict[str, float]:
        """The metrics of ``optimizers`` (all ranks' factors; a collective when distributed)."""
        pairs = list(names.items() if isinstance(names, Mapping) else names) if names is not None else None
        gather = _world_size() > 1
        metrics: dict[str, float] = {}
        for index, optimizer in enumerate(optimizers):
            prefix = "precond" if len(optimizers) == 1 else f"precond/optimizer{index}"
            records = optimizer.preconditioner_stats(names=pairs, gather=gather)
            metrics.update(_metrics(records, prefix, self.per_layer))
            skipped = optimizer.skipped_steps(names=pairs, gather=gather)
            metrics[f"{prefix}/skipped_steps_max"] = float(max(skipped.values(), default=0))
            metrics[f"{prefix}/skipped_parameters"] = float(len(skipped))
        if step is not None:
            self.last_report_step = int(step)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._steps.last_step, "last_report_step": self.last_report_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._steps.sync(state.get("last_step"))
        self.last_report_step = int(state.get("last_report_step", 0))


def _selected(records: Sequence[FactorStats], per_layer: bool | tuple[str, ...]) -> list[FactorStats]:
    if isinstance(per_layer, bool):
        return list(records) if per_layer else []
    return [r for r in records if any(fnmatch.fnmatchcase(r.param_name, p) for p in per_layer)]


def _metrics(records: Sequence[FactorStats], prefix: str, per_layer: bool | tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    layers = _selected(records, per_layer)
    if layers:
        blocks_of: dict[str, set[str]] = {}
        for r in layers:
            blocks_of.setdefault(r.param_name, set()).add(r.block_id)
        for r in layers:
            name = "_".join(r.param_name.split())  # logger tags do not take whitespace
            if len(blocks_of[r.param_name]) > 1:
                name += f"/block{r.block_id.split('.')[-1]}"
            for field in _PER_FACTOR:
                out[f"{prefix}/{name}/{r.side}/{field}"] = float(getattr(r, field))
    out[f"{prefix}/factors"] = float(len(records))
    if not records:
        return out
    for field in ("staleness", "eigenvalue_staleness", "steps_since_refresh"):
        values = [float(getattr(r, field)) for r in records]
        out[f"{prefix}/{field}_mean"] = math.fsum(values) / len(values)
        out[f"{prefix}/{field}_max"] = max(values)
    for field in ("refresh_count", "failure_count", "refresh_seconds"):
        out[f"{prefix}/{field}_total"] = math.fsum(float(getattr(r, field)) for r in records)
    return out

