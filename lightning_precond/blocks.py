"""The block plan: how every parameter is cut into 2-D blocks that own a preconditioner.

The plan is a pure function of the parameters' *global* shapes and the configuration, so it
is identical on every rank and at every world size. That is what lets checkpoints be
resharded and lets every backend (DDP, FSDP, ZeRO) route the same blocks to the same owners.

Two limits shape it, per param group (:class:`PlanLimits`):

* ``max_dim`` (``max_preconditioner_dim``) cuts a matrix side longer than it into blocks,
  each with its own factor for that side (Distributed Shampoo's way);
* ``max_factor_dim`` gives a side of the *parameter's* matrix view longer than it no factor
  at all: an identity side (SOAP's ``max_precond_dim``), whose projections are the identity.
  That side is never cut: blocking exists to bound a factor, and an identity side has none,
  while one factor on the other side that sees every row (every column) is the reference
  algorithm; cutting it would only split that factor's statistics into independent pieces.
  So ``Embedding(50000, 64)`` is one 50000 x 64 block with a 64 x 64 right factor, and
  ``Embedding(50000, 4096)`` four 50000 x 1024 blocks, each with a 1024 x 1024 right factor.
  The whole identity side then belongs to one owner rank (its moments, ``2 m n`` numbers for
  SOAP, are not spread over ranks by blocking).

A one-sided algorithm (ASGO, ``PlanLimits.one_side``) reuses exactly this mechanism: the side
it does not precondition is an identity side of every matrix, whatever its length.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .algorithms.statistics import SIDES

__all__ = ["Block", "BlockPlan", "PlanLimits", "ONE_SIDE_CHOICES", "matrix_shape", "one_sided_factor", "plan_blocks"]

#: How a one-sided algorithm picks the side it preconditions.
ONE_SIDE_CHOICES = ("smaller", "left", "right")


def one_sided_factor(mshape: tuple[int, int], choice: str) -> str:
    """The side (``"left"``: rows, ``"right"``: columns) that keeps a factor under ``choice``:
    ``"smaller"`` takes the shorter side of the matrix view (left on a tie)."""
    if choice == "smaller":
        return "left" if mshape[0] <= mshape[1] else "right"
    if choice in SIDES:
        return choice
    raise ValueError(f"side must be one of {ONE_SIDE_CHOICES}, got {choice!r}")


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
    # The sides ("left", "right") without a factor: the parameter's dim on that side is
    # above max_factor_dim (identity projection there).
    identity: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """Identity independent of rank and sharding, used in state-dict keys."""
        return f"{self.param_index}.{self.block_index}"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def factored(self, sides: tuple[str, ...]) -> tuple[str, ...]:
        """Those of an algorithm's ``sides`` that have a factor in this block."""
        return tuple(side for side in sides if side not in self.identity)


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


@dataclass(frozen=True)
class PlanLimits:
    """How one param group's matrices are cut (see the module docstring)."""

    max_dim: int  # largest block side (a huge number: whole matrices)
    max_factor_dim: int | None = None  # a matrix side above this has no factor (None: every side has one)
    # One-sided algorithms: which side keeps a factor (ONE_SIDE_CHOICES); None: both may.
    one_side: str | None = None

    def identity_sides(self, mshape: tuple[int, int]) -> tuple[str, ...]:
        """The sides of a matrix view ``mshape`` that get no factor."""
        limit = self.max_factor_dim
        kept = SIDES if self.one_side is None else (one_sided_factor(mshape, self.one_side),)
        return tuple(side for side, dim in zip(SIDES, mshape)
                     if side not in kept or (limit is not None and dim > limit))


def plan_blocks(
    shapes: Sequence[Sequence[int]],
    group_of: Sequence[int],
    limits: int | PlanLimits | Sequence[PlanLimits],
    precondition_1d: bool = False,
    unblocked: Collection[int] = (),
) -> BlockPlan:
    """Cut every parameter (given by its global shape) into blocks.

    ``group_of[i]`` is the param group of parameter ``i``; ``limits`` its group's
    :class:`PlanLimits` (one per group, or one for all; an int is ``max_dim`` alone). With
    ``precondition_1d`` a vector of length n is treated as a 1 x n matrix instead of taking
    the diagonal method. The parameters in ``unblocked`` (groups with ``precondition=False``)
    take the diagonal method.
    """
    if isinstance(limits, int):
        limits = PlanLimits(limits)
    per_group = limits if not isinstance(limits, PlanLimits) else None
    blocks: list[Block] = []
    matrix_shapes: list[tuple[int, int] | None] = []
    for index, shape in enumerate(shapes):
        limit = per_group[group_of[index]] if per_group is not None else limits
        assert isinstance(limit, PlanLimits)
        if limit.max_dim < 1:
            raise ValueError(f"max_preconditioner_dim must be >= 1, got {limit.max_dim}")
        mshape = None if index in unblocked else matrix_shape(shape, limit.max_dim)
        if mshape is None and index not in unblocked and precondition_1d and len(shape) == 1 and shape[0] > 0:
            mshape = (1, int(shape[0]))
        matrix_shapes.append(mshape)
        if mshape is None:
            continue
        identity = limit.identity_sides(mshape)
        # An identity side is not cut (module docstring): one block spans it.
        row_cuts = [(0, mshape[0])] if "left" in identity else _cuts(mshape[0], limit.max_dim)
        col_cuts = [(0, mshape[1])] if "right" in identity else _cuts(mshape[1], limit.max_dim)
        number = 0
        for row_start, rows in row_cuts:
            for col_start, cols in col_cuts:
                blocks.append(
                    Block(index, number, group_of[index], row_start, col_start, rows, cols, identity)
                )
                number += 1
    return BlockPlan(tuple(blocks), tuple(matrix_shapes))
