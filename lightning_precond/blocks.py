"""The block plan: how every parameter is cut into 2-D blocks that own a preconditioner.

The plan is a pure function of the parameters' *global* shapes and the configuration, so it
is identical on every rank and at every world size. That is what lets checkpoints be
resharded and lets every backend (DDP, FSDP, ZeRO) route the same blocks to the same owners.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

__all__ = ["Block", "BlockPlan", "matrix_shape", "plan_blocks"]


@dataclass(frozen=True)
class Block:
    """One preconditioned block: rows ``row_start:row_start+rows`` and columns
    ``col_start:col_start+cols`` of its parameter viewed as a matrix."""

    param_index: int  # position of the parameter in the optimizer (over all groups)
    block_index: int  # position of the block inside its parameter (row-major)
    group_index: int  # param group, which fixes the hyperparameters
    row_start: int
    col_start: int
    rows: int
    cols: int

    @property
    def id(self) -> str:
        """Identity independent of rank and sharding, used in state-dict keys."""
        return f"{self.param_index}.{self.block_index}"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)


def matrix_shape(shape: Sequence[int], max_dim: int) -> tuple[int, int] | None:
    """The 2-D view of a parameter, or ``None`` for parameters that take the diagonal method.

    Tensors of order > 2 merge adjacent dims into two groups: the first split whose sides
    both fit ``max_dim`` (so a conv weight is ``out x (in * kh * kw)`` as usual), else the
    most balanced split, which blocking then cuts into the fewest pieces. Order 0 and 1
    (biases, norms, scalars) return ``None``.
    """
    dims = [int(d) for d in shape]
    if len(dims) < 2 or any(d == 0 for d in dims):
        return None
    if len(dims) == 2:
        return dims[0], dims[1]
    candidates = [(math.prod(dims[:s]), math.prod(dims[s:])) for s in range(1, len(dims))]
    for sides in candidates:
        if max(sides) <= max_dim:
            return sides
    return min(candidates, key=max)


def _cuts(size: int, max_dim: int) -> list[tuple[int, int]]:
    return [(start, min(max_dim, size - start)) for start in range(0, size, max_dim)]


@dataclass(frozen=True)
class BlockPlan:
    """All blocks of an optimizer, plus each parameter's matrix shape (``None``: diagonal)."""

    blocks: tuple[Block, ...]
    matrix_shapes: tuple[tuple[int, int] | None, ...]

    def blocks_of(self, param_index: int) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.param_index == param_index)


def plan_blocks(
    shapes: Sequence[Sequence[int]],
    group_of: Sequence[int],
    max_dim: int,
    precondition_1d: bool = False,
    unblocked: Collection[int] = (),
) -> BlockPlan:
    """Cut every parameter (given by its global shape) into blocks of at most ``max_dim``.

    ``group_of[i]`` is the param group of parameter ``i``. With ``precondition_1d`` a vector
    of length n is treated as a 1 x n matrix instead of taking the diagonal method. The
    parameters in ``unblocked`` (groups with ``precondition=False``) take the diagonal method.
    """
    if max_dim < 1:
        raise ValueError(f"max_preconditioner_dim must be >= 1, got {max_dim}")
    blocks: list[Block] = []
    matrix_shapes: list[tuple[int, int] | None] = []
    for index, shape in enumerate(shapes):
        mshape = None if index in unblocked else matrix_shape(shape, max_dim)
        if mshape is None and index not in unblocked and precondition_1d and len(shape) == 1 and shape[0] > 0:
            mshape = (1, int(shape[0]))
        matrix_shapes.append(mshape)
        if mshape is None:
            continue
        number = 0
        for row_start, rows in _cuts(mshape[0], max_dim):
            for col_start, cols in _cuts(mshape[1], max_dim):
                blocks.append(
                    Block(index, number, group_of[index], row_start, col_start, rows, cols)
                )
                number += 1
    return BlockPlan(tuple(blocks), tuple(matrix_shapes))
