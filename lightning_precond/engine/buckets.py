"""Buckets: the owned blocks of one shape and param group, their state stacked ``[k, ...]``,
and the host-side records that let the engine decide without syncing a device."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..algorithms.base import map_state, tensor_fields
from ..algorithms.statistics import SIDES
from ..blocks import Block

__all__ = ["Bucket", "BlockRecord", "SideRecord", "new_record", "selected", "RECORD_FIELDS"]

# The per-side counters saved in checkpoints (``"<side>.<field>"``).
RECORD_FIELDS = ("refreshes", "last_refresh_step", "failures", "consecutive_failures")


@dataclass
class SideRecord:
    refreshes: int = 0
    last_refresh_step: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    refresh_seconds: float = 0.0


@dataclass
class BlockRecord:
    """Host-side counters of one block: Python ints, so reading them never syncs a device."""

    step: int = 0  # updates applied
    initialized: bool = False  # has received a gradient
    skipped_steps: int = 0
    sides: dict[str, SideRecord] = field(default_factory=lambda: {s: SideRecord() for s in SIDES})


def new_record(sides: Sequence[str]) -> BlockRecord:
    """A fresh record with counters for the factored ``sides``."""
    return BlockRecord(sides={side: SideRecord() for side in sides})


class Bucket:
    """The owned blocks of one shape, param group and set of identity sides; ``state`` is
    the algorithm's typed state, ``sides`` the sides with a factor (a subset of the
    algorithm's: an identity side has none)."""

    def __init__(self, blocks: list[Block], state: Any, sides: tuple[str, ...]) -> None:
        self.blocks = blocks
        self.state = state
        self.sides = sides
        self.records = [new_record(sides) for _ in blocks]

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks[0].shape

    @property
    def group_index(self) -> int:
        return self.blocks[0].group_index

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by checkpoint name."""
        return tensor_fields(self.state)


@contextlib.contextmanager
def selected(state: Any, rows: Sequence[int], size: int) -> Iterator[Any]:
    """The state of a subset of a stack; written back on exit (no copy when it is all of it).

    Tensors may be replaced inside the block (e.g. a new basis); the write-back handles both.
    """
    if len(rows) == size:
        yield state
        return
    first = next(iter(tensor_fields(state).values()))
    index = torch.tensor(list(rows), dtype=torch.long, device=first.device)
    sub = map_state(state, lambda t: t.index_select(0, index))
    yield sub
    _write_rows(state, sub, index)


def _write_rows(state: Any, sub: Any, index: torch.Tensor) -> None:
    for f in dataclasses.fields(state):
        whole, part = getattr(state, f.name), getattr(sub, f.name)
        if dataclasses.is_dataclass(whole):
            _write_rows(whole, part, index)
        elif isinstance(whole, torch.Tensor):
            whole.index_copy_(0, index, part)
