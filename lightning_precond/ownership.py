"""Which rank computes which block: a deterministic, cost-balanced assignment.

Longest-processing-time first on the cost model of ``algorithms.md``: blocks sorted by
decreasing cost (ties broken by block order, so every rank computes the same map) go to the
currently least-loaded rank.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence

from .blocks import Block

__all__ = ["block_cost", "assign_owners"]


def block_cost(rows: int, cols: int, identity: Collection[str] = ()) -> float:
    """Relative per-step cost of a ``rows x cols`` block.

    Factor updates cost m^2 n + m n^2 every step; a refresh costs m^3 + n^3, amortized over
    the refresh interval (counted at a tenth). Memory (m^2 + n^2) follows the same ordering.
    A side in ``identity`` has no factor: its terms drop, and the elementwise work (m n:
    moments, projections) is counted instead, so that a block without factors is not free.
    """
    m, n = float(rows), float(cols)
    if not identity:
        return m * m * n + m * n * n + 0.1 * (m**3 + n**3)
    cost = m * n
    if "left" not in identity:
        cost += m * m * n + 0.1 * m**3
    if "right" not in identity:
        cost += m * n * n + 0.1 * n**3
    return cost


def _cost(block: Block) -> float:
    return block_cost(block.rows, block.cols, block.identity)


def assign_owners(
    blocks: Sequence[Block],
    world_size: int,
    candidates: Sequence[Collection[int]] | None = None,
    keep: Sequence[int] = (),
) -> list[int]:
    """Owner rank of every block (same order as ``blocks``); identical on every rank.

    ``candidates[i]``, when given, restricts block ``i`` to those ranks (FSDP1 needs each
    block's owner to hold a piece of its parameter, see ``FSDP1Router``); the least-loaded
    candidate takes it. ``keep`` fixes the owners of the first ``len(keep)`` blocks (blocks
    planned before a param group was added keep theirs); the others balance around them.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(blocks)
    if world_size == 1:
        return owners
    if keep:
        load = [0.0] * world_size
        for i, rank in enumerate(keep):
            owners[i] = rank
            load[rank] += _cost(blocks[i])
        rest = sorted(range(len(keep), len(blocks)), key=lambda i: (-_cost(blocks[i]), i))
        for i in rest:
            owners[i] = min(range(world_size), key=lambda rank: (load[rank], rank))
            load[owners[i]] += _cost(blocks[i])
        return owners
    order = sorted(range(len(blocks)), key=lambda i: (-_cost(blocks[i]), i))
    if candidates is not None:
        load = [0.0] * world_size
        for i in order:
            allowed = sorted(candidates[i])
            if not allowed or not all(0 <= rank < world_size for rank in allowed):
                raise ValueError(f"candidates[{i}] must name ranks in [0, {world_size}), got {allowed}")
            owners[i] = min(allowed, key=lambda rank: (load[rank], rank))
            load[owners[i]] += _cost(blocks[i])
        return owners
    loads = [(0.0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    for i in order:
        load_i, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load_i + _cost(blocks[i]), rank))
    return owners
