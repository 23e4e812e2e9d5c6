"""The sharded routers' geometry: a (block, piece) segment as runs of views of the piece.

The multi-process tests exercise the routes end to end on a few layouts; this table covers
the corners in one process: pieces starting and ending mid-row, blocks cut in columns and
rows, pieces inside a single row, and a piece covering a whole block.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_precond.blocks import plan_blocks
from lightning_precond.distributed.sharded import _block_flat_indices, _runs, _segments

SHAPES = [(7, 10), (12, 5), (1, 9), (9, 1)]


def _pieces(numel: int, cuts: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(flat_start, numel)`` of the pieces between ``cuts`` (empty pieces included)."""
    bounds = [0, *cuts, numel]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("max_dim", [3, 4, 100])
def test_runs_are_exactly_each_segment_of_the_piece(shape, max_dim):
    rows, cols = shape
    plan = plan_blocks([shape], [0], max_dim)
    param = torch.arange(rows * cols, dtype=torch.float32)  # value = flat index
    numel = rows * cols
    cut_sets = {tuple(sorted(c)) for c in itertools.combinations(range(1, numel), 2)}
    for cuts in sorted(cut_sets)[:: max(1, len(cut_sets) // 40)] + [(), (numel // 2,)]:
        geometry = [(0, start, n) for start, n in _pieces(numel, cuts)]
        covered = torch.zeros(numel, dtype=torch.long)
        for b, segments in enumerate(_segments(plan, range(len(plan.blocks)), geometry)):
            block = plan.blocks[b]
            expected = _block_flat_indices(block, cols).float()
            for segment in segments:
                start = geometry[segment.piece][1]
                piece = param[start : start + geometry[segment.piece][2]]
                runs = _runs(block, cols, segment.block_offset, segment.length, start)
                got = torch.cat([run.of(piece).reshape(-1) for run in runs])
                want = expected[segment.block_offset : segment.block_offset + segment.length]
                assert torch.equal(got, want), (shape, max_dim, cuts, block, segment)
                assert sum(run.numel for run in runs) == segment.length
                assert len(runs) <= 3  # a partial row, whole rows, a partial row
                for run in runs:  # views, written in place when updates are applied
                    assert run.of(piece).data_ptr() >= piece.data_ptr()
                covered[got.long()] += 1
        assert torch.equal(covered, torch.ones(numel, dtype=torch.long)), (shape, max_dim, cuts)
