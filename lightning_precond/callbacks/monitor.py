"""A callback that logs how stale the preconditioners' eigenbases are."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from ..engine import PreconditionedOptimizer
from ._core import PerLayer, StalenessReport
from ._lightning import log_metrics, trainer_optimizers

__all__ = ["EigenStalenessMonitor"]


class EigenStalenessMonitor(Callback):
    """Log eigenbasis staleness and refresh statistics as the Trainer logs its own metrics.

    Every ``log_every_n_steps`` optimizer steps (by default the Trainer's own
    ``log_every_n_steps``, as Lightning's ``LearningRateMonitor`` follows it), and once more
    at the end of training if steps were taken since the last report, it reads
    :meth:`~lightning_precond.PreconditionedOptimizer.preconditioner_stats` (with
    ``gather=True`` when distributed, on every rank) and sends to every logger, from rank
    zero:

    * aggregated (always, a dozen columns whatever the model's size):
      ``precond/staleness_mean``/``_max``, ``precond/eigenvalue_staleness_mean``/``_max``,
      ``precond/steps_since_refresh_mean``/``_max``, ``precond/refresh_count_total``,
      ``precond/failure_count_total``, ``precond/refresh_seconds_total``,
      ``precond/factors``, ``precond/skipped_steps_max`` and ``precond/skipped_parameters``;
    * per factor, opt-in (``per_layer``): ``precond/<param_name>/<side>/staleness``,
      ``.../eigenvalue_staleness``, ``.../steps_since_refresh``, ``.../refresh_count``,
      ``.../failure_count`` and ``.../refresh_seconds`` -- six columns per factor, so for a
      large model select a few parameters by pattern.

    See :class:`~lightning_precond.callbacks.StalenessReport` for the exact names. Reading
    the statistics costs two batched matmuls per factor stack.

    Args:
        log_every_n_steps: optimizer steps between reports; ``None`` (default): the
            Trainer's ``log_every_n_steps`` (``0`` there: only the report at the end).
        per_layer: ``False`` (default): aggregates only; ``True``: also every factor; a
            parameter-name pattern or a list of them (:func:`fnmatch.fnmatchcase`, ``*``
            matching dots too, e.g. ``["blocks.0.*", "blocks.23.*"]``): also the factors of
            those parameters.

    Raises:
        ValueError: if ``log_every_n_steps`` is neither ``None`` nor a positive int, or
            ``per_layer`` is invalid.
        MisconfigurationException: in ``setup`` if the Trainer has no logger.
        TypeError: in ``on_fit_start`` if no optimizer is a
            :class:`~lightning_precond.PreconditionedOptimizer`.

    Example::

        trainer = Trainer(logger=CSVLogger("logs"), log_every_n_steps=10,
                          callbacks=[EigenStalenessMonitor(per_layer="blocks.0.*")])
    """

    def __init__(self, log_every_n_steps: int | None = None, per_layer: PerLayer = False) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be None or an int >= 1, got {log_every_n_steps!r}")
        self._every = log_every_n_steps
        self._report = StalenessReport(log_every_n_steps, per_layer)
        self._optimizers: list[PreconditionedOptimizer] = []

    @property
    def log_every_n_steps(self) -> int | None:
        """The interval in use: the one given, else the Trainer's once ``setup`` ran
        (``None``: not known yet, or the Trainer logs no steps)."""
        return self._report.every

    @property
    def last_logged_step(self) -> int:
        """The last optimizer step that was reported (0: none yet)."""
        return self._report.last_report_step

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use EigenStalenessMonitor with a Trainer that has no logger "
                "(pass e.g. logger=CSVLogger(...) or TensorBoardLogger(...))"
            )
        if self._every is None:
            self._report.every = trainer.log_every_n_steps or None

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
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A last report when the run ended between intervals (a short run logs something).
        if self._optimizers and self._report.pending(trainer.global_step):
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
