"""ASGO / one-sided Shampoo (An et al., NeurIPS 2025): one factor, on one side of each block.

The composition is Shampoo's (:class:`~lightning_precond.algorithms.kronecker.StatisticsFirst`:
statistics, roots when due, direction) with the one-sided scaling below; the side without a
factor is an *identity side* of the block plan (:mod:`lightning_precond.blocks`), so the
statistics, the bases, the refresh policy, the checkpoints and the routing are the ones every
other algorithm uses. With the kept side the left one (rows, ``m``)::

    M = EMA(M, G; b1),                M_hat = M / (1 - b1^t)
    V = EMA(V, G G^T; b2)             (b2 = 1: the accumulated sum of the theory)
    V_hat = V / (1 - b2^s)            (s: the step of the last root; b2 = 1: V_hat = V)
    U = (V_hat^{1/2} + eps I)^{-1} M_hat = Q diag(1 / (sqrt(lambda / c) + eps)) Q^T M_hat

(``lambda`` floored at the eigensolver's accuracy ``d * eps(dtype) * lambda_max``, see
``_accuracy_floor``)

and ``M_hat V_hat^{-1/2}`` with ``V = EMA(G^T G)`` on the right. No grafting: for a rank-one
gradient ``U = u v^T`` (spectral norm 1, as Muon's), whatever the gradient's scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import Direction, FactoredConfig, GroupConfig, StepContext, check_betas, check_nonnegative, check_positive_int
from .eigenbasis import BasisResult
from .kronecker import KroneckerState, StatisticsFirst
from .scaling import Scaling
from .statistics import GradientProjections, KroneckerFactors, KroneckerStatistics, ema_
from .precision import matmul_dtype_of

__all__ = ["ASGOConfig", "OneSidedMoments", "OneSidedRootScaling", "OneSided"]


@dataclass(frozen=True, kw_only=True)
class ASGOConfig(FactoredConfig):
    """Per-group hyperparameters of ASGO."""

    betas: tuple[float, float]
    eps: float
    precondition_frequency: int
    start_preconditioning_step: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_betas(self.betas, second_may_be_one=True)
        check_nonnegative(self.eps, "eps")
        check_positive_int(self.precondition_frequency, "precondition_frequency")
        check_positive_int(self.start_preconditioning_step, "start_preconditioning_step")
        if self.reference:
            # No public implementation to reproduce; the paper's equations are the default mode.
            raise ValueError("reference=True is not available for ASGO (it has no reference implementation; "
                             "its default mode is the paper's equations); leave reference=False")

    @property
    def factor_beta(self) -> float:
        return float(self.betas[1])

    def vector_adamw(self) -> tuple[float, float, float]:
        """Vectors take AdamW with ``betas`` (0.999 as beta2 when the factor sums, ``b2 = 1``)."""
        beta2 = float(self.betas[1]) if self.betas[1] < 1.0 else 0.999
        return float(self.betas[0]), beta2, float(self.eps)


@dataclass
class OneSidedMoments:
    exp_avg: Tensor  # [k, m, n]  EMA of gradients (betas[0]), parameter space
    factor_weight: Tensor  # [k, 1]  total weight of the factor's EMA now: 1 - b2^t (1 when b2 = 1)
    root_weight: Tensor  # [k, 1]  factor_weight when the eigenvalues in use were computed


def _accuracy_floor(values: Tensor) -> Tensor:
    """Eigenvalues floored at ``d * eps(dtype) * lambda_max``, the eigensolver's accuracy:
    below it an eigenvalue of ``V`` is rounding noise (often 0 in float32 where V's condition
    number passes ~1e7), and ``1 / (0 + eps)`` would multiply M's component there by 1/eps.
    Without grafting nothing else bounds the step. No effect in float64 but on null spaces."""
    values = values.clamp_min(0.0)
    limit = values.shape[-1] * torch.finfo(values.dtype).eps
    return torch.maximum(values, values.amax(-1, keepdim=True) * limit)


class OneSidedRootScaling(Scaling):
    """``(V_hat^{1/2} + eps I)^{-1} M_hat`` on the factored side (module docstring); before
    ``start_preconditioning_step`` the direction is ``M_hat`` (momentum SGD)."""

    moments_type = OneSidedMoments

    def state_shapes(self, m: int, n: int, config: Any) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (m, n), "factor_weight": (1,), "root_weight": (1,)}

    def direction(self, factors: KroneckerFactors, moments: OneSidedMoments, grad: Tensor, step: int,
                  config: Any, projections: GradientProjections | None = None) -> tuple[Tensor, float]:
        beta1 = config.betas[0]
        exp_avg = ema_(moments.exp_avg, grad, beta1)
        momentum = exp_avg / (1.0 - beta1**step) if beta1 > 0 else exp_avg
        if step < config.start_preconditioning_step:
            return momentum.clone(), config.lr
        scaled = factors.to_basis(momentum, matmul_dtype_of(config))
        weight = moments.root_weight.clamp_min(torch.finfo(moments.root_weight.dtype).tiny)
        for side, dim in (("left", -1), ("right", -2)):
            values = factors.eigenvalues(side)
            if values is not None:
                root = (_accuracy_floor(values) / weight).sqrt()
                scaled = scaled * (1.0 / (root + config.eps)).unsqueeze(dim)
        return factors.from_basis(scaled, matmul_dtype_of(config)), config.lr

    def on_refresh(self, moments: OneSidedMoments, side: str, old_basis: Tensor, result: BasisResult) -> None:
        # The new eigenvalues are those of V now: their bias correction is today's weight
        # (a failed refresh keeps its eigenvalues, and their weight).
        keep = torch.tensor(result.ok, device=moments.root_weight.device).view(-1, 1)
        moments.root_weight.copy_(torch.where(keep, moments.factor_weight, moments.root_weight))


class OneSided(StatisticsFirst):
    """ASGO's composition: Kronecker statistics on the kept side only (the plan makes the
    other an identity side), exact roots (``eigh``) every ``precondition_frequency`` steps
    from ``start_preconditioning_step``, the one-sided root scaling."""

    config_type = ASGOConfig

    def __init__(self, side: str = "smaller") -> None:
        super().__init__(KroneckerStatistics(), OneSidedRootScaling(), refresh_method="eigh",
                         sort_on_refresh=False)
        # Read by the engine when it plans blocks (PlanLimits.one_side).
        self.one_side = side

    def step(self, state: KroneckerState, grads: Tensor, ctx: StepContext) -> Direction | None:
        beta = ctx.config.factor_beta
        self.statistics.update(state.factors, grads, beta)
        weight = state.moments.factor_weight
        if beta < 1.0:
            ema_(weight, torch.ones_like(weight), beta)
        else:
            weight.fill_(1.0)
        ctx.refresh_if_due()
        update, step_size = self.scaling.direction(state.factors, state.moments, grads, ctx.step, ctx.config)
        return Direction(update, step_size)
