"""The refresh policy: when bases are recomputed (periodic, adaptive, or by an external
owner such as a callback), with which method, and the accounting of failures."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..algorithms.eigenbasis import (PRODUCT_CHECK_MIN_TOLERANCE, REFRESH_METHODS, staleness,
                                     staleness_from_product)
from ..options import EngineOptions, check_tolerance
from .buckets import Bucket, selected

__all__ = ["RefreshPolicy", "RefreshedFactor"]


@dataclass(frozen=True)
class RefreshedFactor:
    block_id: str
    side: str


class RefreshPolicy:
    """Decides and performs refreshes for one optimizer's buckets."""

    def __init__(self, algorithm: Any, options: EngineOptions, name_of: Callable[[int], str],
                 config_of: Callable[[int], Any] = lambda group_index: None) -> None:
        self.algorithm = algorithm
        self.options = options
        self.name_of = name_of
        self.config_of = config_of  # a param group's config (its refresh options: shift, sort)
        self.owner: object | None = None
        self._warned_failure = False
        self.fatal: str | None = None  # a failure that must stop the run, raised after the step

    def raise_fatal(self) -> None:
        message, self.fatal = self.fatal, None
        if message is not None:
            raise RuntimeError(message)

    def method(self, method: str | None = None) -> str:
        return method or self.options.refresh_method or self.algorithm.refresh_method

    # -- inside step() -------------------------------------------------------------------
    def maybe_refresh(self, bucket: Bucket, positions: list[int], state: Any, step: int, config: Any) -> None:
        """Refresh what is due after ``step`` for the blocks at ``positions`` (rows of ``state``)."""
        start = self.algorithm.refresh_start(config)
        if step < start:
            return
        sides = bucket.sides
        if self.owner is not None:
            # The owner schedules refreshes, but roots must exist once preconditioning starts.
            for side in sides:
                rows = [r for r, i in enumerate(positions) if bucket.records[i].sides[side].refreshes == 0]
                if rows:
                    with selected(state, rows, len(positions)) as sub:
                        chosen = [positions[r] for r in rows]
                        self.refresh_sides(bucket, chosen, sub, self.method(), (side,), step)
            return
        if self.options.refresh == "periodic":
            if self.algorithm.refresh_due(step, config):
                self.refresh_sides(bucket, positions, state, self.method(), sides, step)
            return
        never = any(bucket.records[i].sides[side].refreshes == 0 for i in positions for side in sides[:1])
        if never or step % self.options.refresh_check_interval == 0:
            self.refresh_stale(bucket, positions, state, step, self.options.refresh_tolerance, self.method())

    def refresh_stale(
        self, bucket: Bucket, positions: list[int], state: Any, step: int, tolerance: float, method: str = "qr"
    ) -> list[RefreshedFactor]:
        """Refresh, side by side, the factors whose staleness exceeds ``tolerance``.

        The check costs one ``d^3`` product per factor, ``P = A Q``
        (:func:`staleness_from_product`), and the power and QR refreshes of the stale ones start
        from it: checking and refreshing a stale factor costs what refreshing it alone does.
        """
        refreshed: list[RefreshedFactor] = []
        for side in bucket.sides:
            basis, product = self.algorithm.basis_and_product(state, side)
            if tolerance >= PRODUCT_CHECK_MIN_TOLERANCE:
                current = staleness_from_product(product, basis)
            else:
                current = staleness(basis.mT @ product)
            stale = (current > tolerance).tolist()
            rows = [
                r for r, i in enumerate(positions)
                if stale[r] or bucket.records[i].sides[side].refreshes == 0
            ]
            if not rows:
                continue
            chosen = [positions[r] for r in rows]
            reused = product if len(rows) == len(positions) else product[torch.tensor(rows, device=product.device)]
            with selected(state, rows, len(positions)) as sub:
                self.refresh_sides(bucket, chosen, sub, method, (side,), step, tolerance, reused)
            refreshed.extend(RefreshedFactor(bucket.blocks[i].id, side) for i in chosen)
        return refreshed

    def refresh_sides(
        self,
        bucket: Bucket,
        positions: list[int],
        state: Any,
        method: str,
        sides: Sequence[str],
        step: int,
        tolerance: float | None = None,
        product: Tensor | None = None,
    ) -> None:
        """Recompute the bases of ``sides`` for the blocks at ``positions`` (rows of ``state``);
        ``product``: the single side's ``A Q`` when the caller computed it."""
        tol = self.options.refresh_tolerance if tolerance is None else tolerance
        assert product is None or len(sides) == 1, "a product belongs to one side"
        for side in sides:
            started = time.perf_counter()
            ok = self.algorithm.refresh(state, side, method, tol, self.options.max_qr_iterations,
                                        self.config_of(bucket.group_index), product=product)
            seconds = (time.perf_counter() - started) / max(1, len(positions))
            self._record(bucket, positions, side, ok, step, seconds)

    def _record(self, bucket: Bucket, positions: list[int], side: str, ok: list[bool], step: int,
                seconds: float) -> None:
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
            block = bucket.blocks[i]
            where = f"{self.name_of(block.param_index)} block {block.id} ({side} factor)"
            if record.consecutive_failures >= self.options.max_consecutive_failures:
                # Raised by step() once the step is complete, so nothing is half-applied.
                self.fatal = self.fatal or (
                    f"eigendecomposition failed {record.consecutive_failures} times in a row for "
                    f"{where}; the factor is likely corrupted (non-finite or badly scaled)"
                )
                continue
            if not self._warned_failure:
                self._warned_failure = True
                warnings.warn(
                    f"eigendecomposition failed for {where} (also in float64); keeping the "
                    "previous basis. Failures are counted in preconditioner_stats().",
                    RuntimeWarning,
                    stacklevel=6,
                )

    # -- on demand (refresh_eigenbasis) -------------------------------------------------
    def refresh_now(
        self,
        buckets: Sequence[Bucket],
        known_ids: Mapping[str, tuple[str, ...]],
        select: str | Iterable[str | tuple[str, str]] | None,
        method: str | None,
        tolerance: float | None,
    ) -> list[RefreshedFactor]:
        """:meth:`PreconditionedOptimizer.refresh_eigenbasis` over ``buckets``; ``known_ids``:
        every planned block's id and its sides with a factor."""
        if method is not None and method not in REFRESH_METHODS:
            raise ValueError(f"method must be one of {REFRESH_METHODS}, got {method!r}")
        if tolerance is not None:
            check_tolerance(tolerance, "tolerance")
        tol = self.options.refresh_tolerance if tolerance is None else tolerance
        sides = self.algorithm.sides
        wanted: dict[str, set[str]] | None = None
        if select is not None and select != "stale":
            if isinstance(select, str):
                raise ValueError(f"select must be None, 'stale' or an iterable of block ids, got {select!r}")
            wanted = {}
            for item in select:
                block_id = item if isinstance(item, str) else item[0]
                if block_id not in known_ids:
                    raise ValueError(f"select names an unknown block id {block_id!r}")
                chosen = known_ids[block_id] if isinstance(item, str) else (item[1],)
                for side in chosen:
                    if side not in sides:
                        raise ValueError(f"side must be one of {sides}, got {side!r}")
                    if side not in known_ids[block_id]:
                        raise ValueError(
                            f"block {block_id} has no {side} factor (an identity side: its dim is above "
                            "max_factor_dim), so there is no basis to refresh there"
                        )
                wanted.setdefault(block_id, set()).update(chosen)
        refreshed: list[RefreshedFactor] = []
        for bucket in buckets:
            ready = [i for i, r in enumerate(bucket.records) if r.initialized or r.step > 0]
            if wanted is not None:
                ready = [i for i in ready if bucket.blocks[i].id in wanted]
            if not ready:
                continue
            with selected(bucket.state, ready, len(bucket.blocks)) as state:
                if select == "stale":
                    step = max(bucket.records[i].step for i in ready)
                    refreshed += self.refresh_stale(bucket, ready, state, step, tol, method or "qr")
                    continue
                for side in bucket.sides:
                    rows = [r for r, i in enumerate(ready) if wanted is None or side in wanted[bucket.blocks[i].id]]
                    if not rows:
                        continue
                    positions = [ready[r] for r in rows]
                    with selected(state, rows, len(ready)) as sub:
                        step = max(bucket.records[i].step for i in positions)
                        self.refresh_sides(bucket, positions, sub, self.method(method), (side,), step, tol)
                    refreshed += [RefreshedFactor(bucket.blocks[i].id, side) for i in positions]
        return refreshed
