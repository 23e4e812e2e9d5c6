"""Callbacks that own when eigenbases (Shampoo: inverse roots) are recomputed.

While one of them is attached (from ``on_fit_start`` to ``on_fit_end``/``teardown``) it
*owns* the schedule: the optimizer's own ``precondition_frequency`` / ``refresh="adaptive"``
policy is suspended (:meth:`~lightning_precond.PreconditionedOptimizer.attach_refresh_owner`)
and refreshes happen only when the callback says so, right after an optimizer step. At most
one owner can be attached to a Trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from ._core import AdaptiveRefresh, RefreshSchedule, ScheduledRefresh, _RefreshOwnerCore
from ._lightning import log_metrics, trainer_optimizers

__all__ = ["RootRecomputeScheduler", "AdaptiveEigenbasisRefresh"]


class _RefreshOwnerCallback(Callback):
    """Attach/detach and step bookkeeping shared by the two owners."""

    _core: _RefreshOwnerCore

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        others = [
            type(cb).__name__
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(cb, _RefreshOwnerCallback) and cb is not self
        ]
        if others:
            raise MisconfigurationException(
                f"{type(self).__name__} cannot be combined with {', '.join(others)}: each owns "
                "the eigenbasis refresh schedule; keep one of them"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer_optimizers(trainer, type(self).__name__, with_basis=True)
        for note in self._core.attach(optimizers, self):
            rank_zero_warn(f"{type(self).__name__}: {note}")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The step count is restored from a checkpoint only after on_fit_start.
        self._core.sync(trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._core.detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._core.detach()  # also reached when fit raises

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._core.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._core.load_state_dict(state_dict)

    @property
    def last_refresh_step(self) -> int:
        """The last optimizer step after which this callback refreshed (0: never)."""
        return self._core.last_refresh_step

    @property
    def refresh_calls(self) -> int:
        """Refresh rounds run so far (kept across checkpoint resumption)."""
        return self._core.refresh_calls

    @property
    def refresh_seconds(self) -> float:
        """Wall-clock seconds this rank spent in those rounds."""
        return self._core.refresh_seconds


class RootRecomputeScheduler(_RefreshOwnerCallback):
    """Decide when eigenbases / roots are recomputed, instead of ``precondition_frequency``.

    Schedules (see :class:`~lightning_precond.callbacks.RefreshSchedule`), all counted in
    optimizer steps (``trainer.global_step``, so gradient accumulation is respected):

    * ``RootRecomputeScheduler()`` -- the algorithm's own: every ``precondition_frequency``
      steps with the algorithm's phase and its ``refresh_method``;
    * ``RootRecomputeScheduler(every=k)`` -- after steps ``k, 2k, ...``;
    * ``RootRecomputeScheduler(warmup_steps=n, every=k)`` -- after every step up to ``n``
      (every ``warmup_every``-th), then after ``n + k, n + 2k, ...``;
    * ``RootRecomputeScheduler(schedule=lambda step: step < 100 or step % 50 == 0)``.

    Precedence: while attached (``on_fit_start`` to ``on_fit_end``) this callback owns the
    schedule; the optimizer's ``precondition_frequency`` (and ``refresh="adaptive"``) are
    ignored except as the default for ``every``. It refreshes every factor with
    ``refresh_eigenbasis(method=method)`` in ``on_train_batch_end`` after the step that is
    due. Its counters are checkpointed, so a resumed run continues the schedule.

    Args:
        every: optimizer steps between refreshes; ``None``: the optimizer's frequency.
        warmup_steps: initial steps refreshed every ``warmup_every`` steps.
        warmup_every: refresh interval during the warm-up.
        schedule: a pure callable ``step -> bool`` (excludes ``every`` and ``warmup_steps``).
        method: ``"eigh"``, ``"qr"`` or ``"power"``; ``None``: the optimizer's own.

    Raises:
        ValueError: for invalid arguments (the message names the argument).
        MisconfigurationException: in ``setup`` if :class:`AdaptiveEigenbasisRefresh` is
            attached to the same Trainer.
        TypeError: in ``on_fit_start`` if no optimizer is a
            :class:`~lightning_precond.PreconditionedOptimizer`.

    Example::

        trainer = Trainer(callbacks=[RootRecomputeScheduler(every=20, warmup_steps=10)])
    """

    def __init__(
        self,
        every: int | None = None,
        warmup_steps: int = 0,
        warmup_every: int = 1,
        schedule: Callable[[int], bool] | None = None,
        method: str | None = None,
    ) -> None:
        schedule_ = RefreshSchedule(every, warmup_steps=warmup_steps, warmup_every=warmup_every, schedule=schedule)
        self._core: ScheduledRefresh = ScheduledRefresh(schedule_, method)

    @property
    def schedule(self) -> RefreshSchedule:
        return self._core.schedule

    def should_refresh(self, step: int) -> bool:
        """Whether the callback refreshes right after optimizer step ``step``.

        Before ``on_fit_start`` an ``every=None`` schedule is not resolved yet.

        Raises:
            RuntimeError: for an unresolved ``every=None`` schedule before ``on_fit_start``.
        """
        return self._core.should_refresh(step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._core.advance(trainer.global_step)


class AdaptiveEigenbasisRefresh(_RefreshOwnerCallback):
    """Refresh only the stale eigenbases, checked every ``check_every`` optimizer steps.

    Each check calls ``refresh_eigenbasis(select="stale", method=method,
    tolerance=tolerance)``, which refreshes the factors whose staleness
    ``||offdiag(Q^T A Q)||_F / ||Q^T A Q||_F`` exceeds ``tolerance``, and logs
    ``precond/adaptive_refreshed`` (factors refreshed, summed over ranks) and
    ``precond/adaptive_refreshed_total`` to every logger. Like
    :class:`RootRecomputeScheduler` it owns the schedule while attached; the two cannot be
    combined. Its counters are checkpointed.

    Args:
        tolerance: staleness threshold in ``(0, 1]``.
        check_every: optimizer steps between checks.
        method: ``"qr"`` (default), ``"eigh"`` or ``"power"``.

    Raises:
        ValueError: for invalid arguments (the message names the argument).
        MisconfigurationException: in ``setup`` if :class:`RootRecomputeScheduler` is
            attached to the same Trainer.
        TypeError: in ``on_fit_start`` if no optimizer is a
            :class:`~lightning_precond.PreconditionedOptimizer`.
    """

    def __init__(self, tolerance: float = 0.1, check_every: int = 50, method: str = "qr") -> None:
        self._core: AdaptiveRefresh = AdaptiveRefresh(tolerance, check_every, method)

    @property
    def refreshed_total(self) -> int:
        """Factors refreshed over all checks and ranks (kept across resumption)."""
        return self._core.refreshed_total

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        count = self._core.advance(trainer.global_step)
        if count is not None:
            log_metrics(
                trainer,
                {
                    "precond/adaptive_refreshed": float(count),
                    "precond/adaptive_refreshed_total": float(self._core.refreshed_total),
                },
            )
