"""Helpers shared by the Lightning front-ends (public Trainer API only)."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..engine import PreconditionedOptimizer
from ._core import preconditioned_optimizers


def trainer_optimizers(trainer: pl.Trainer, user: str, *, with_basis: bool = False) -> list[PreconditionedOptimizer]:
    """The preconditioned optimizers of ``trainer`` (unwrapped); warns about the others.

    Raises:
        TypeError: if the trainer has no preconditioned optimizer.
    """
    found, foreign = preconditioned_optimizers(trainer.optimizers, user, with_basis=with_basis)
    if foreign:
        kinds = ", ".join(sorted({type(o).__name__ for o in foreign}))
        rank_zero_warn(f"{user} ignores the optimizers that are not preconditioned: {kinds}")
    return found


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Send ``metrics`` to every logger of the trainer from global rank zero."""
    if not metrics or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)
