"""ASGO / one-sided Shampoo (An et al., NeurIPS 2025): one factor, on one side of each block.

The composition is Shampoo's (:class:`~lightning_precond.algorithms.kronecker.StatisticsFirst`:
statistics, roots when due, direction) with the one-sided scaling below; the side without a
factor is an *identity side* of the block plan (:mod:`lightning_precond.blocks`), so the
statistics, the bases, the refresh policy, the checkpoints and the routing are the ones every
other algorithm uses. With the kept side the left one (rows, ``m``)::

    M = EMA(M, G; b1),                M_hat = M / (1 - b1^t)
    V = EMA(V, G G^T; b2)             (b2 = 1: the accumulated sum of the theory)
    (lambda_s, Q) = eigh(V_s)         (s: the step of the last root, every f steps)
    U = Q diag(1 / (sqrt(d / c) + eps)) Q^T M_hat

with, per ``eigenvalues``:

* ``"current"`` (default): ``d = diag(Q^T V_t Q)``, this step's ``V`` in the last root's
  basis, ``c = 1 - b2^t``. At a refresh ``d = lambda_t``: the paper's ``(V_hat_t^{1/2} + eps
  I)^{-1} M_hat``; between refreshes the basis is stale but the scale is this step's.
* ``"refresh"``: ``d = lambda_s``, ``c = 1 - b2^s``: ``(V_hat_s^{1/2} + eps I)^{-1} M_hat``,
  the whole root ``f - 1`` steps stale (the behaviour before this option).

With ``precondition_frequency=1`` both are the paper's update ``(V_hat_t^{1/2} + eps I)^{-1}
M_hat`` (``d`` floored at the eigensolver's accuracy ``d * eps(dtype) * lambda_max``, see
``_accuracy_floor``), and ``M_hat V_hat^{-1/2}`` with ``V = EMA(G^T G)`` on the right. No
grafting: for a rank-one gradient ``U = u v^T`` (spectral norm 1, as Muon's), whatever the
gradient's scale.

Why ``"current"``: the paper's bound ``||V_t^{-1/2} G_t||_op <= 1`` needs ``V_t >= G_t G_t^T``,
i.e. ``V`` of *this* step. A stale root has no such bound: where ``V_s`` is rank-deficient
(the first root is ``G_1 G_1^T``, of rank <= the batch, 128, below a 256-1000-wide side) or
merely small (dead units reviving), the new gradient's component is multiplied by up to
``1 / sqrt(d eps(float32))`` (~180 for ``d = 256``). Measured on the quality suite's MLP fed
the same gradients (``docs/measurements/asgo_stale_roots.md``): steps 2-10 had spectral norms
18-2100x step 1's per unit lr, which forced the lr down to 1e-2 (3e-2 diverged), where every
other step was ~10x smaller than Muon's. ``diag(Q^T V_t Q)`` bounds each row of the scaled
gradient by ``sqrt(c / (1 - b2))`` (1 when ``b2 = 1``), as Adam's ``m / sqrt(v)``; its cost is
one ``d^3`` product per block and step (``<= d^2 n``, the statistics' own cost, on the smaller
side).
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

__all__ = ["ASGOConfig", "OneSidedMoments", "OneSidedRootScaling", "OneSided", "EIGENVALUE_MODES",
           "current_eigenvalues"]

# What the scaling divides by between refreshes (module docstring).
EIGENVALUE_MODES = ("current", "refresh")


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


def current_eigenvalues(factor: Tensor, basis: Tensor) -> Tensor:
    """``diag(Q^T V Q)`` of a stack (``V`` ``[k, d, d]``, ``Q`` ``[k, d, d]`` with eigenvector
    columns): this step's ``V`` in the basis of the last root, the eigenvalues at a refresh.
    One ``d x d x d`` product, in the state dtype (as the eigendecompositions)."""
    return (torch.matmul(factor, basis) * basis).sum(-2)


class OneSidedRootScaling(Scaling):
    """``(V_hat^{1/2} + eps I)^{-1} M_hat`` on the factored side with ``eigenvalues``
    ``"current"`` or ``"refresh"`` (module docstring); before ``start_preconditioning_step``
    the direction is ``M_hat`` (momentum SGD)."""

    moments_type = OneSidedMoments

    def __init__(self, eigenvalues: str = "current") -> None:
        if eigenvalues not in EIGENVALUE_MODES:
            raise ValueError(f"eigenvalues must be one of {EIGENVALUE_MODES}, got {eigenvalues!r}")
        self.eigenvalues = eigenvalues

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
        current = self.eigenvalues == "current"
        # The bias correction of the V the values come from: this step's, or the last root's.
        weight = moments.factor_weight if current else moments.root_weight
        weight = weight.clamp_min(torch.finfo(weight.dtype).tiny)
        for side, dim in (("left", -1), ("right", -2)):
            values = factors.eigenvalues(side)
            if values is not None and current:
                values = current_eigenvalues(factors.factor(side), factors.basis(side))
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
    from ``start_preconditioning_step``, the one-sided root scaling with ``eigenvalues``."""

    config_type = ASGOConfig

    def __init__(self, side: str = "smaller", eigenvalues: str = "current") -> None:
        super().__init__(KroneckerStatistics(), OneSidedRootScaling(eigenvalues), refresh_method="eigh",
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
