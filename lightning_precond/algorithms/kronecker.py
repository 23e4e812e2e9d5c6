"""The Kronecker family as compositions: statistics x basis refresh x scaling, in one of two
step orders.

* :class:`BasisFirst` -- SOAP, KL-SOAP, KL-Shampoo, eigenvalue-corrected Shampoo: the first
  gradient only builds the factors and an exact basis; afterwards the direction uses the
  current basis, then the statistics absorb the gradient, then the refresh policy may
  refresh the basis.
* :class:`StatisticsFirst` -- Shampoo: statistics absorb the gradient, the policy may
  recompute roots (from ``start_preconditioning_step``), then the direction is formed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Direction, GroupConfig, StepContext, check_beta, check_betas, check_nonnegative, check_positive_int
from .eigenbasis import eigh_descending, power_step, qr_algorithm
from .grafting import GRAFTING_METHODS
from .scaling import Scaling
from .statistics import SIDES, KroneckerFactors, KroneckerStatistics

__all__ = ["EigenbasisConfig", "ShampooConfig", "KroneckerState", "BasisFirst", "StatisticsFirst"]


@dataclass(frozen=True, kw_only=True)
class EigenbasisConfig(GroupConfig):
    """Per-group hyperparameters of SOAP, KL-SOAP, KL-Shampoo and eigenvalue-corrected Shampoo."""

    betas: tuple[float, float]
    shampoo_beta: float | None
    eps: float
    precondition_frequency: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonnegative(self.eps, "eps")
        check_betas(self.betas)
        if self.shampoo_beta is not None:
            check_beta(self.shampoo_beta, "shampoo_beta")
        check_positive_int(self.precondition_frequency, "precondition_frequency")

    @property
    def factor_beta(self) -> float:
        """The factors' EMA coefficient: ``shampoo_beta``, else ``betas[1]``."""
        return float(self.betas[1] if self.shampoo_beta is None else self.shampoo_beta)

    def vector_adamw(self) -> tuple[float, float, float]:
        return float(self.betas[0]), float(self.betas[1]), float(self.eps)


@dataclass(frozen=True, kw_only=True)
class ShampooConfig(GroupConfig):
    """Per-group hyperparameters of Shampoo (``eps`` is the ``epsilon`` argument)."""

    betas: tuple[float, float]
    eps: float
    momentum: float
    nesterov: bool
    exponent: float
    precondition_frequency: int
    start_preconditioning_step: int
    grafting: str | None
    grafting_beta2: float | None
    grafting_eps: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_betas(self.betas, second_may_be_one=True)
        check_nonnegative(self.eps, "epsilon")
        if self.grafting not in GRAFTING_METHODS:
            raise ValueError(f"grafting must be one of {GRAFTING_METHODS}, got {self.grafting!r}")
        if not 0.0 < self.exponent <= 1.0:
            raise ValueError(f"exponent must be in (0, 1], got {self.exponent}")
        check_beta(self.momentum, "momentum")
        if self.nesterov and self.momentum <= 0.0:
            raise ValueError("nesterov=True requires momentum > 0")
        check_positive_int(self.precondition_frequency, "precondition_frequency")
        check_positive_int(self.start_preconditioning_step, "start_preconditioning_step")
        if self.grafting_beta2 is not None:
            check_beta(self.grafting_beta2, "grafting_beta2")
        check_nonnegative(self.grafting_eps, "grafting_eps")

    @property
    def factor_beta(self) -> float:
        return float(self.betas[1])

    @property
    def graft_beta2(self) -> float:
        """The grafted method's beta2, resolved once for blocks and vectors alike:
        ``grafting_beta2``, else ``betas[1]`` unless that is 1 (the factors' AdaGrad-style
        sum, which would zero Adam's bias correction), where it is 0.999."""
        if self.grafting_beta2 is not None:
            return float(self.grafting_beta2)
        return float(self.betas[1]) if self.betas[1] < 1.0 else 0.999

    def vector_adamw(self) -> tuple[float, float, float]:
        """Vectors take AdamW with the grafting method's beta2 and epsilon."""
        return float(self.betas[0]), self.graft_beta2, float(self.grafting_eps)


@dataclass
class KroneckerState:
    """A bucket's state: the factors and bases, and the scaling's moments."""

    factors: KroneckerFactors
    moments: Any  # the scaling's moments dataclass (Moments, ShampooMoments)


class KroneckerAlgorithm:
    """Statistics + basis refresh + scaling over :class:`KroneckerState`."""

    config_type: ClassVar[type[GroupConfig]] = EigenbasisConfig
    sides = SIDES

    def __init__(
        self,
        statistics: KroneckerStatistics,
        scaling: Scaling,
        *,
        refresh_method: str,
        sort_on_refresh: bool,
        decay_after_update: bool = False,
    ) -> None:
        self.statistics = statistics
        self.scaling = scaling
        self.refresh_method = refresh_method
        # SOAP: reorder columns by diag(Q^T A Q) before a power / QR refresh.
        self.sort_on_refresh = sort_on_refresh
        self.decay_after_update = decay_after_update
        self.gradient_headroom = statistics.headroom

    # -- state ----------------------------------------------------------------------
    def state_shapes(self, m: int, n: int, config: Any, sides: tuple[str, ...] = SIDES) -> dict[str, tuple[int, ...]]:
        """Per-block state shapes; ``sides``: the sides with a factor (the others are identity)."""
        return {**KroneckerFactors.shapes(m, n, sides), **self.scaling.state_shapes(m, n, config)}

    def state_from(self, tensors: Mapping[str, Tensor]) -> KroneckerState:
        factor_names = KroneckerFactors.shapes(1, 1)
        factors = KroneckerFactors(**{name: tensors.get(name) for name in factor_names})
        moments = self.scaling.moments_type(**{k: v for k, v in tensors.items() if k not in factor_names})
        return KroneckerState(factors, moments)

    def create_state(self, k: int, m: int, n: int, config: Any, dtype: torch.dtype,
                     device: torch.device, sides: tuple[str, ...] = SIDES) -> KroneckerState:
        shapes = self.state_shapes(m, n, config, sides)
        state = self.state_from({name: torch.zeros((k, *s), dtype=dtype, device=device) for name, s in shapes.items()})
        self.statistics.initial_values(state.factors)
        return state

    # -- bases ------------------------------------------------------------------------
    def refresh_start(self, config: Any) -> int:
        """The first step at which the refresh policy applies."""
        return 0

    def refresh(self, state: KroneckerState, side: str, method: str, tolerance: float,
                max_iterations: int) -> list[bool]:
        """Recompute ``side``'s basis of every block in ``state``; failed blocks keep theirs."""
        factors = state.factors
        factor, old = factors.factor(side), factors.basis(side)
        assert factor is not None and old is not None, f"the {side} side is an identity side: nothing to refresh"
        if method == "eigh":
            result = eigh_descending(factor, old)
        elif method == "power":
            result = power_step(factor, old, self.sort_on_refresh)
        else:
            result = qr_algorithm(factor, old, tolerance, max_iterations, self.sort_on_refresh)
        if not all(result.ok):
            # A failed matrix keeps its basis and the eigenvalues that go with it.
            keep = torch.tensor(result.ok, device=old.device).view(-1, 1, 1)
            result.basis = torch.where(keep, result.basis, old)
            result.eigenvalues = torch.where(keep[..., 0], result.eigenvalues, factors.eigenvalues(side))
        self.statistics.on_refresh(factors, side, result)
        self.scaling.on_refresh(state.moments, side, old, result)
        factors.set_basis(side, result.basis)
        return result.ok

    def projected(self, state: KroneckerState, side: str) -> Tensor:
        basis = state.factors.basis(side)
        return basis.mT @ state.factors.factor(side) @ basis

    def eigenvalues_in_use(self, state: KroneckerState, side: str) -> Tensor:
        return state.factors.eigenvalues(side)


class BasisFirst(KroneckerAlgorithm):
    """First gradient: factors and an exact basis, no update. Then direction, statistics, refresh."""

    def step(self, state: KroneckerState, grads: Tensor, ctx: StepContext) -> Direction | None:
        beta = ctx.config.factor_beta
        if ctx.first:
            self.statistics.initialize_from(state.factors, grads, beta)
            ctx.refresh_all("eigh")
            return None
        update, step_size = self.scaling.direction(state.factors, state.moments, grads, ctx.step, ctx.config)
        self.statistics.update(state.factors, grads, beta)
        ctx.refresh_if_due()
        return Direction(update, step_size)


class StatisticsFirst(KroneckerAlgorithm):
    """Shampoo's order: statistics, then roots when due, then the direction from this step's G."""

    config_type = ShampooConfig

    def refresh_start(self, config: Any) -> int:
        return int(config.start_preconditioning_step)

    def step(self, state: KroneckerState, grads: Tensor, ctx: StepContext) -> Direction | None:
        self.statistics.update(state.factors, grads, ctx.config.factor_beta)
        ctx.refresh_if_due()
        update, step_size = self.scaling.direction(state.factors, state.moments, grads, ctx.step, ctx.config)
        return Direction(update, step_size)
