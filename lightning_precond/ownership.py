"""Which rank computes which block: a deterministic, cost-balanced assignment.

Longest-processing-time first on the cost model of ``algorithms.md``: blocks sorted by
decreasing cost (ties broken by block order, so every rank computes the same map) go to the
currently least-loaded rank.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from .blocks import Block

__all__ = ["block_cost", "assign_owners"]


def block_cost(rows: int, cols: int) -> float:
    """Relative per-step cost of a ``rows x cols`` block.

    Factor updates cost m^2 n + m n^2 every step; a refresh costs m^3 + n^3, amortized over
    the refresh interval (counted at a tenth). Memory (m^2 + n^2) follows the same ordering.
    """
    m, n = float(rows), float(cols)
    return m * m * n + m * n * n + 0.1 * (m**3 + n**3)


def assign_owners(blocks: Sequence[Block], world_size: int) -> list[int]:
    """Owner rank of every block (same order as ``blocks``); identical on every rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(blocks)
    if world_size == 1:
        return owners
    order = sorted(range(len(blocks)), key=lambda i: (-block_cost(*blocks[i].shape), i))
    loads = [(0.0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    for i in order:
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + block_cost(*blocks[i].shape), rank))
    return owners
