"""A callback that logs how stale the preconditioners' eigenbases are."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from ..engine import PreconditionedOptimizer
from ._core import StalenessReport
from ._lightning import log_metrics, trainer_optimizers

__all__ = ["EigenStalenessMonitor"]


class EigenStalenessMonitor(Callback):
    """Log eigenbasis staleness and refresh statistics every ``log_every_n_steps`` steps.

    Every ``log_every_n_steps`` optimizer steps it reads
    :meth:`~lightning_precond.PreconditionedOptimizer.preconditioner_stats` (with
    ``gather=True`` when distributed, on every rank) and sends to every logger, from rank
    zero:

    * per factor (``per_layer=True``): ``precond/<param_name>/<side>/staleness``,
      ``.../eigenvalue_staleness``, ``.../steps_since_refresh``, ``.../refresh_count``,
      ``.../failure_count`` and ``.../refresh_seconds``;
    * aggregated: ``precond/staleness_mean``/``_max``,
      ``precond/eigenvalue_staleness_mean``/``_max``, ``precond/steps_since_refresh_mean``
      /``_max``, ``precond/refresh_count_total``, ``precond/failure_count_total``,
      ``precond/refresh_seconds_total`` and ``precond/factors``.

    See :class:`~lightning_precond.callbacks.StalenessReport` for the exact names. Reading
    the statistics costs two batched matmuls per factor stack, so keep the interval coarse
    for large models.

    Args:
        log_every_n_steps: optimizer steps between reports.
        per_layer: also log every factor (else only the aggregates).

    Raises:
        ValueError: if ``log_every_n_steps`` is not a positive int.
        MisconfigurationException: in ``setup`` if the Trainer has no logger.
        TypeError: in ``on_fit_start`` if no optimizer is a
            :class:`~lightning_precond.PreconditionedOptimizer`.

    Example::

        trainer = Trainer(logger=CSVLogger("logs"), callbacks=[EigenStalenessMonitor(10)])
    """

    def __init__(self, log_every_n_steps: int = 50, per_layer: bool = True) -> None:
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be an int >= 1, got {log_every_n_steps!r}")
        self._report = StalenessReport(log_every_n_steps, per_layer)
        self._optimizers: list[PreconditionedOptimizer] = []

    @property
    def log_every_n_steps(self) -> int:
        return self._report.every

    @property
    def last_logged_step(self) -> int:
        """The last optimizer step that was reported (0: none yet)."""
        return self._report.last_report_step

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use EigenStalenessMonitor with a Trainer that has no logger "
                "(pass e.g. logger=CSVLogger(...) or TensorBoardLogger(...))"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._optimizers = trainer_optimizers(trainer, type(self).__name__)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report.sync(trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._report.due(trainer.global_step):
            return
        # All ranks collect (gathering is a collective); rank zero logs.
        metrics = self._report.collect(self._optimizers, pl_module.named_parameters(), trainer.global_step)
        log_metrics(trainer, metrics)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._optimizers = []

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._report.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._report.load_state_dict(state_dict)
