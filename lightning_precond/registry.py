"""Every public optimizer, once: the table that tests, integration tests, benchmarks and the
demo iterate, so that an optimizer added here is covered everywhere without a new row.

Example::

    from lightning_precond.registry import ALGORITHMS
    for entry in ALGORITHMS.values():
        opt = entry.build(model.parameters())  # short-run settings, see AlgorithmEntry
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from . import optimizers

__all__ = ["AlgorithmEntry", "ALGORITHMS", "names"]


@dataclass(frozen=True, kw_only=True)
class AlgorithmEntry:
    """One optimizer and the settings that make a run of a few dozen steps exercise it.

    ``short_run`` refreshes bases every 5 steps (the defaults, 10, would leave a 20-step test
    with one refresh) at an lr that trains the small test models; Shampoo's epsilon 1e-6
    keeps multi-process comparisons about the distribution, not about last-bit differences
    of batched LAPACK calls on rank-deficient factors (``(1e-9 + 1e-12)^(-1/4)``).
    """

    name: str
    optimizer: type[torch.optim.Optimizer]
    short_run: Mapping[str, Any] = field(default_factory=dict)
    # Whether the algorithm keeps Kronecker factors and eigenbases (refresh schedules,
    # staleness and the refresh callbacks apply to it).
    has_basis: bool = True
    # How many sides of a 2-D block keep a factor (ASGO, one-sided: 1).
    factored_sides: int = 2

    def build(self, params: Iterable[Any], **overrides: Any) -> torch.optim.Optimizer:
        """The optimizer with ``short_run`` settings, ``overrides`` taking precedence."""
        return self.optimizer(params, **{**self.short_run, **overrides})


def _entries(*entries: AlgorithmEntry) -> Mapping[str, AlgorithmEntry]:
    return MappingProxyType({entry.name: entry for entry in entries})


ALGORITHMS: Mapping[str, AlgorithmEntry] = _entries(
    AlgorithmEntry(name="SOAP", optimizer=optimizers.SOAP,
                   short_run={"lr": 3e-3, "precondition_frequency": 5}),
    AlgorithmEntry(name="Shampoo", optimizer=optimizers.Shampoo,
                   short_run={"lr": 3e-3, "precondition_frequency": 5, "epsilon": 1e-6}),
    AlgorithmEntry(name="KLShampoo", optimizer=optimizers.KLShampoo,
                   short_run={"lr": 3e-3, "precondition_frequency": 5}),
    AlgorithmEntry(name="KLSOAP", optimizer=optimizers.KLSOAP,
                   short_run={"lr": 3e-3, "precondition_frequency": 5}),
    AlgorithmEntry(name="EigenvalueCorrectedShampoo", optimizer=optimizers.EigenvalueCorrectedShampoo,
                   short_run={"lr": 3e-3, "precondition_frequency": 5}),
    AlgorithmEntry(name="Muon", optimizer=optimizers.Muon, short_run={"lr": 3e-3}, has_basis=False),
    AlgorithmEntry(name="ASGO", optimizer=optimizers.ASGO,
                   short_run={"lr": 3e-3, "precondition_frequency": 5}, factored_sides=1),
)


def names(*, has_basis: bool | None = None) -> list[str]:
    """The registered names, optionally only those with (or without) eigenbases."""
    return [n for n, e in ALGORITHMS.items() if has_basis is None or e.has_basis == has_basis]
