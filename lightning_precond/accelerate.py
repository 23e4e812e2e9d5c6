"""Preconditioner hooks for plain training loops (Hugging Face Accelerate or none).

The same three behaviours as the Lightning callbacks -- a refresh schedule, adaptive
refresh of stale factors, staleness metrics -- sharing their implementation
(:mod:`lightning_precond.callbacks._core`); only the "when" (you call :meth:`on_step`
after each optimizer step) and the "where" (you log the returned dict) differ.

Example::

    accelerator = Accelerator()
    model, optimizer = accelerator.prepare(model, SOAP(model.named_parameters(), lr=3e-3))
    hooks = PreconditionerHooks(optimizer, scheduler=RefreshSchedule(every=20, warmup_steps=10),
                                monitor_every=10, names=model.named_parameters())
    accelerator.register_for_checkpointing(hooks)      # resumable schedule
    for step, batch in enumerate(loader, start=1):
        accelerator.backward(loss_fn(model, batch))
        optimizer.step(); optimizer.zero_grad()
        accelerator.log(hooks.on_step(step), step=step)  # every rank calls on_step
    accelerator.log(hooks.report(step), step=step)      # the last steps, if not reported yet
    hooks.close()
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

from .callbacks._core import (
    AdaptiveRefresh,
    PerLayer,
    RefreshSchedule,
    ScheduledRefresh,
    StalenessReport,
    preconditioned_optimizers,
)
from .engine import PreconditionedOptimizer

__all__ = ["PreconditionerHooks"]

SchedulerSpec = RefreshSchedule | int | Callable[[int], bool] | bool | None


def _as_schedule(scheduler: SchedulerSpec) -> RefreshSchedule | None:
    if scheduler is None or scheduler is False:
        return None
    if scheduler is True:
        return RefreshSchedule()
    if isinstance(scheduler, RefreshSchedule):
        return scheduler
    if isinstance(scheduler, int):
        if scheduler < 1:
            raise ValueError(f"scheduler as an int is the refresh interval and must be >= 1, got {scheduler}")
        return RefreshSchedule(every=scheduler)
    if callable(scheduler):
        return RefreshSchedule(schedule=scheduler)
    raise ValueError(
        "scheduler must be None, True (the algorithm's default), an int interval, a callable "
        f"step -> bool or a RefreshSchedule, got {scheduler!r}"
    )


def _as_adaptive(adaptive: AdaptiveRefresh | bool | None) -> AdaptiveRefresh | None:
    if adaptive is None or adaptive is False:
        return None
    if adaptive is True:
        return AdaptiveRefresh()
    if isinstance(adaptive, AdaptiveRefresh):
        return adaptive
    raise ValueError(f"adaptive must be None, a bool or an AdaptiveRefresh, got {adaptive!r}")


class PreconditionerHooks:
    """Refresh scheduling and staleness metrics for a loop that steps the optimizer itself.

    Call :meth:`on_step` on every rank after each optimizer step with the number of
    optimizer steps completed (1 after the first); it refreshes when due and returns the
    metrics due at that step (an empty dict otherwise), ready for ``accelerator.log``.
    With gradient accumulation call it only when the optimizer really stepped
    (``accelerator.sync_gradients``); a repeated ``step`` is ignored.

    While a ``scheduler`` or ``adaptive`` policy is given, the hooks own the optimizer's
    refresh schedule (its ``precondition_frequency`` / ``refresh="adaptive"`` is suspended)
    until :meth:`close` (or the end of a ``with`` block).

    Args:
        optimizer: a :class:`~lightning_precond.PreconditionedOptimizer`, possibly wrapped
            by ``accelerator.prepare`` (``AcceleratedOptimizer``) or DeepSpeed.
        scheduler: ``None`` (keep the optimizer's own schedule), ``True`` (the algorithm's
            default, owned by the hooks), an int ``k`` (every ``k`` steps), a callable
            ``step -> bool`` or a :class:`~lightning_precond.callbacks.RefreshSchedule`.
        refresh_method: method of scheduled refreshes; ``None``: the optimizer's own.
        adaptive: ``True`` or an :class:`~lightning_precond.callbacks.AdaptiveRefresh` to
            refresh only stale factors (excludes ``scheduler``); adds
            ``precond/adaptive_refreshed`` and ``precond/adaptive_refreshed_total`` to the
            metrics of the steps it checks.
        monitor_every: report staleness metrics every this many steps (``None``: only when
            :meth:`report` is called); names as
            :class:`~lightning_precond.callbacks.StalenessReport`. Plain loops have no
            logging interval to follow: pass the one your loop logs at.
        per_layer: ``False`` (default): aggregates only; ``True``: also every factor (six
            columns each); a parameter-name pattern or a list of them: also those factors.
        names: ``model.named_parameters()`` (or a dict) to name the per-factor metrics.

    Raises:
        TypeError: if ``optimizer`` is not (a wrapper of) a preconditioned optimizer.
        ValueError: for invalid or conflicting arguments (the message names them).
        RuntimeError: if another owner already schedules the optimizer's refreshes.
    """

    def __init__(
        self,
        optimizer: Any,
        *,
        scheduler: SchedulerSpec = None,
        refresh_method: str | None = None,
        adaptive: AdaptiveRefresh | bool | None = None,
        monitor_every: int | None = None,
        per_layer: PerLayer = False,
        names: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor] | None = None,
    ) -> None:
        schedule = _as_schedule(scheduler)
        adaptive_ = _as_adaptive(adaptive)
        if schedule is not None and adaptive_ is not None:
            raise ValueError("scheduler and adaptive cannot be combined: each owns the refresh schedule")
        if refresh_method is not None and schedule is None:
            raise ValueError("refresh_method applies to scheduled refreshes: pass scheduler too")
        if monitor_every is not None and (
            isinstance(monitor_every, bool) or not isinstance(monitor_every, int) or monitor_every < 1
        ):
            raise ValueError(f"monitor_every must be None or an int >= 1, got {monitor_every!r}")
        found, _ = preconditioned_optimizers([optimizer], type(self).__name__)
        self.optimizer: PreconditionedOptimizer = found[0]
        self._names = None if names is None else dict(names.items() if isinstance(names, Mapping) else names)
        self._report = StalenessReport(monitor_every, per_layer)
        self._owner: ScheduledRefresh | AdaptiveRefresh | None = None
        if schedule is not None:
            self._owner = ScheduledRefresh(schedule, refresh_method)
        elif adaptive_ is not None:
            self._owner = adaptive_
        self.notes: list[str] = []  # warnings about the resolved schedule (also warned)
        if self._owner is not None:
            self.notes = self._owner.attach([self.optimizer], self)
            for note in self.notes:
                warnings.warn(f"PreconditionerHooks: {note}", UserWarning, stacklevel=2)

    @property
    def owns_schedule(self) -> bool:
        """Whether the hooks (not the optimizer) decide when to refresh."""
        return self._owner is not None and self.optimizer.refresh_owner is self

    def should_refresh(self, step: int) -> bool:
        """Whether a scheduled refresh runs right after optimizer step ``step``.

        Raises:
            ValueError: if the hooks have no ``scheduler``.
        """
        if not isinstance(self._owner, ScheduledRefresh):
            raise ValueError("should_refresh needs a scheduler")
        return self._owner.should_refresh(step)

    def on_step(self, step: int) -> dict[str, float]:
        """Run what is due after optimizer step ``step`` (on every rank); returns metrics.

        Raises:
            ValueError: for a negative or non-int ``step``.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0 (optimizer steps completed), got {step!r}")
        metrics: dict[str, float] = {}
        if isinstance(self._owner, AdaptiveRefresh):
            count = self._owner.advance(step)
            if count is not None:
                metrics["precond/adaptive_refreshed"] = float(count)
                metrics["precond/adaptive_refreshed_total"] = float(self._owner.refreshed_total)
        elif isinstance(self._owner, ScheduledRefresh):
            self._owner.advance(step)
        if self._report.due(step):
            metrics.update(self._report.collect([self.optimizer], self._names, step))
        return metrics

    def report(self, step: int) -> dict[str, float]:
        """The staleness metrics after optimizer step ``step``, whatever ``monitor_every``
        says (e.g. after the last step); ``{}`` if ``step`` was reported already. Call it on
        every rank (a collective when distributed).

        Raises:
            ValueError: for a negative or non-int ``step``.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0 (optimizer steps completed), got {step!r}")
        if not self._report.pending(step):
            return {}
        return self._report.collect([self.optimizer], self._names, step)

    def close(self) -> None:
        """Hand the refresh schedule back to the optimizer (idempotent)."""
        if self._owner is not None:
            self._owner.detach()

    def __enter__(self) -> PreconditionerHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Counters of the schedule and the monitor (for ``accelerator.register_for_checkpointing``)."""
        return {
            "owner": None if self._owner is None else self._owner.state_dict(),
            "monitor": self._report.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self._owner is not None and state_dict.get("owner") is not None:
            self._owner.load_state_dict(state_dict["owner"])
        if state_dict.get("monitor") is not None:
            self._report.load_state_dict(state_dict["monitor"])

    @property
    def last_refresh_step(self) -> int:
        """The last step after which the hooks refreshed (0: never or not owning)."""
        return 0 if self._owner is None else self._owner.last_refresh_step

    @property
    def refresh_calls(self) -> int:
        return 0 if self._owner is None else self._owner.refresh_calls
