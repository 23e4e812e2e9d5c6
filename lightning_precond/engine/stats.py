"""Preconditioner health, computed on demand from the owned buckets (nothing is spent when
nobody asks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..algorithms.eigenbasis import eigenvalue_staleness, staleness
from .buckets import Bucket

__all__ = ["FactorStats", "factor_stats"]


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
    skipped_steps: int = 0  # steps of this block refused (non-finite or overflowing gradient)


def factor_stats(algorithm: Any, buckets: Sequence[Bucket], name_of: Callable[[int], str]) -> list[FactorStats]:
    """One record per factor of ``buckets`` (none for algorithms without factors, nor for
    identity sides, which have no factor), unsorted."""
    records: list[FactorStats] = []
    for bucket in buckets:
        for side in bucket.sides:
            projected = algorithm.projected(bucket.state, side)
            stale = staleness(projected).tolist()
            current = torch.diagonal(projected, dim1=-2, dim2=-1)
            eig_stale = eigenvalue_staleness(algorithm.eigenvalues_in_use(bucket.state, side), current).tolist()
            for i, block in enumerate(bucket.blocks):
                rec, side_rec = bucket.records[i], bucket.records[i].sides[side]
                records.append(
                    FactorStats(
                        param_name=name_of(block.param_index),
                        block_id=block.id,
                        side=side,
                        dim=block.shape[0 if side == "left" else 1],
                        staleness=float(stale[i]),
                        eigenvalue_staleness=float(eig_stale[i]),
                        steps_since_refresh=rec.step - side_rec.last_refresh_step,
                        refresh_count=side_rec.refreshes,
                        failure_count=side_rec.failures,
                        refresh_seconds=side_rec.refresh_seconds,
                        skipped_steps=rec.skipped_steps,
                    )
                )
    return records


def stats_order(record: FactorStats) -> tuple[int, int, str]:
    param, block = record.block_id.split(".")
    return int(param), int(block), record.side
