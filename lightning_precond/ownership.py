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


def block_cost(rows: int, cols: int) -> float:
    """Relative per-step cost of a ``rows x cols`` block.

    Factor updates cost m^2 n + m n^2 every step; a refresh costs m^3 + n^3, amortized over
    the refresh interval (counted at a tenth). Memory (m^2 + n^2) follows the same ordering.
    """
    m, n = float(rows), float(cols)
    return m * m * n + m * n * n + 0.1 * (m**3 + n**3)


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
            load[rank] += block_cost(*blocks[i].shape)
        rest = sorted(range(len(keep), len(blocks)), key=lambda i: (-block_cost(*blocks[i].shape), i))
        for i in rest:
            owners[i] = min(range(world_size), key=lambda rank: (load[rank], rank))
            load[owners[i]] += block_cost(*blocks[i].shape)
        return owners
    order = sorted(range(len(blocks)), key=lambda i: (-block_cost(*blocks[i].shape), i))
    if candidates is not None:
        load = [0.0] * world_size
        for i in order:
            allowed = sorted(candidates[i])
            if not allowed or not all(0 <= rank < world_size for rank in allowed):
                raise ValueError(f"candidates[{i}] must name ranks in [0, {world_size}), got {allowed}")
            owners[i] = min(allowed, key=lambda rank: (load[rank], rank))
            load[owners[i]] += block_cost(*blocks[i].shape)
        return owners
    loads = [(0.0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    for i in order:
        load_i, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load_i + block_cost(*blocks[i].shape), rank))
    return owners
