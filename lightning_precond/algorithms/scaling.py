"""Scalings: how a block's direction is formed from its momentum in the eigenbasis.

Every algorithm of the Kronecker family projects into the bases ``Q_L, Q_R``, scales there,
and projects back: ``U = Q_L [ S(Q_L^T X Q_R) ] Q_R^T``. They differ only in ``S``, and each
owns the moments it needs as a typed state:

* :class:`InverseRootScaling` -- Shampoo: ``(lambda_L + eps)^{-p} (lambda_R + eps)^{-p}``,
  i.e. ``(L + eps I)^{-p} M (R + eps I)^{-p}``, with grafting and heavy-ball momentum.
* :class:`AdamInBasisScaling` -- SOAP / KL-SOAP: Adam's moments kept in the eigenbasis.
* :class:`EigenvalueCorrectedScaling` -- ``D = EMA((Q_L^T G Q_R)^2)`` replaces the Kronecker
  eigenvalues (George et al. 2018).
* :class:`KLEigenvalueScaling` -- KL-Shampoo: ``1 / sqrt(lambda_a lambda_b)`` from the EMA
  eigenvalues of :class:`~lightning_precond.algorithms.statistics.TwoSidedStatistics`.

``direction`` returns the unit direction ``U`` and the step size it is taken with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .eigenbasis import BasisResult
from .grafting import graft_direction, graft_norm
from .statistics import GradientProjections, KroneckerFactors, ema_, permute_along
from .precision import matmul_dtype_of

__all__ = [
    "Scaling",
    "InverseRootScaling",
    "AdamInBasisScaling",
    "EigenvalueCorrectedScaling",
    "KLEigenvalueScaling",
    "Moments",
    "ShampooMoments",
]


@dataclass
class Moments:
    """First moment, and the second moment in the eigenbasis where the scaling keeps one."""

    exp_avg: Tensor  # [k, m, n]  (SOAP: in the eigenbasis; otherwise in parameter space)
    exp_avg_sq: Tensor | None = None  # [k, m, n]  in the eigenbasis (SOAP, eigenvalue-corrected)


@dataclass
class ShampooMoments:
    exp_avg: Tensor  # [k, m, n]  EMA of gradients (betas[0])
    graft_exp_avg_sq: Tensor | None = None  # [k, m, n]  the grafted method's (adam, adagrad, rmsprop)
    momentum_buffer: Tensor | None = None  # [k, m, n]  heavy-ball buffer (momentum > 0)


class Scaling:
    """Base class: the part of a block's state and math that turns gradients into a direction."""

    moments_type: type = Moments

    def state_shapes(self, m: int, n: int, config: Any) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (m, n)}

    def direction(self, factors: KroneckerFactors, moments: Any, grad: Tensor, step: int,
                  config: Any, projections: GradientProjections | None = None) -> tuple[Tensor, float]:
        raise NotImplementedError

    def on_refresh(self, moments: Any, side: str, old_basis: Tensor, result: BasisResult) -> None:
        """Keep basis-dependent state consistent when ``side``'s basis changes."""


class InverseRootScaling(Scaling):
    """Shampoo: ``P = (L + eps I)^{-p} M_hat (R + eps I)^{-p}``, grafted, then momentum."""

    moments_type = ShampooMoments

    def state_shapes(self, m: int, n: int, config: Any) -> dict[str, tuple[int, ...]]:
        shapes = {"exp_avg": (m, n)}
        if config.grafting not in ("sgd", None):
            shapes["graft_exp_avg_sq"] = (m, n)
        if config.momentum > 0:
            shapes["momentum_buffer"] = (m, n)
        return shapes

    def direction(self, factors: KroneckerFactors, moments: ShampooMoments, grad: Tensor, step: int,
                  config: Any, projections: GradientProjections | None = None) -> tuple[Tensor, float]:
        beta1 = config.betas[0]
        exp_avg = ema_(moments.exp_avg, grad, beta1)
        momentum = exp_avg / (1.0 - beta1**step) if beta1 > 0 else exp_avg
        graft = graft_direction(
            config.grafting, moments.graft_exp_avg_sq, grad, momentum, config.graft_beta2,
            config.grafting_eps, step,
        )
        if step >= config.start_preconditioning_step:
            p = config.exponent
            eps = config.eps
            # An identity side contributes no factor (1, not (1 + eps)^-p): the block is
            # L^-p M or M R^-p with the same exponent p.
            scaled = factors.to_basis(momentum, matmul_dtype_of(config))
            if factors.eigenvalues_left is not None:
                scaled = scaled * (factors.eigenvalues_left.clamp_min(0.0) + eps).pow(-p).unsqueeze(-1)
            if factors.eigenvalues_right is not None:
                scaled = scaled * (factors.eigenvalues_right.clamp_min(0.0) + eps).pow(-p).unsqueeze(-2)
            update = factors.from_basis(scaled, matmul_dtype_of(config))
            if graft is not None:
                update = graft_norm(update, graft)
        else:
            update = graft if graft is not None else momentum
        mu = config.momentum
        if mu > 0:
            assert moments.momentum_buffer is not None
            buffer = moments.momentum_buffer.mul_(mu).add_(update)
            update = update + mu * buffer if config.nesterov else buffer.clone()
        return update, config.lr


class _SecondMomentInBasis(Scaling):
    """Scalings that keep ``V`` (``exp_avg_sq``) in the eigenbasis: it follows any
    permutation of the basis columns."""

    def state_shapes(self, m: int, n: int, config: Any) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (m, n), "exp_avg_sq": (m, n)}

    def on_refresh(self, moments: Moments, side: str, old_basis: Tensor, result: BasisResult) -> None:
        assert moments.exp_avg_sq is not None
        if result.permutation is not None:
            dim = -2 if side == "left" else -1
            moments.exp_avg_sq = permute_along(moments.exp_avg_sq, result.permutation, dim)


class AdamInBasisScaling(_SecondMomentInBasis):
    """SOAP: Adam's first and second moments both live in the eigenbasis.

    ``M = EMA(M, Gt; b1)``, ``V = EMA(V, Gt^2; b2)`` with ``Gt = Q_L^T G Q_R``;
    ``U = Q_L [M / (sqrt(V) + eps)] Q_R^T`` taken with ``lr sqrt(1 - b2^t) / (1 - b1^t)``.
    On a basis change, ``V`` is permuted with the eigenvectors and ``M`` is re-expressed in
    the new basis (``M <- Q_new^T Q_old M`` on the left, likewise on the right).
    """

    def __init__(self, *, reference_bias_correction: bool = True) -> None:
        # Whether the reference (reference=True groups) corrects the bias (SOAP: yes; KL-SOAP: no).
        self.reference_bias_correction = reference_bias_correction

    def direction(self, factors: KroneckerFactors, moments: Moments, grad: Tensor, step: int,
                  config: Any, projections: GradientProjections | None = None) -> tuple[Tensor, float]:
        assert moments.exp_avg_sq is not None
        beta1, beta2 = config.betas
        projected = (projections.both() if projections is not None
                     else factors.to_basis(grad, matmul_dtype_of(config)))
        exp_avg = ema_(moments.exp_avg, projected, beta1)
        exp_avg_sq = ema_(moments.exp_avg_sq, projected * projected, beta2)
        update = factors.from_basis(exp_avg / (exp_avg_sq.sqrt() + config.eps), matmul_dtype_of(config))
        if config.reference and not self.reference_bias_correction:
            return update, config.lr
        step_size = config.lr * (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
        return update, step_size

    def on_refresh(self, moments: Moments, side: str, old_basis: Tensor, result: BasisResult) -> None:
        super().on_refresh(moments, side, old_basis, result)
        change = old_basis.mT @ result.basis  # [k, d, d]: old coordinates -> new coordinates
        if side == "left":
            moments.exp_avg = change.mT @ moments.exp_avg
        else:
            moments.exp_avg = moments.exp_avg @ change


def rounding_floor(momentum: Tensor, dtype: torch.dtype) -> Tensor:
    """``(u * rms(M))^2`` per block, ``u`` the unit roundoff of ``dtype``: the square of the
    rounding noise an entry of a product of ``M`` takes in that dtype, below which a second
    moment carries no signal."""
    rms_sq = momentum.square().mean(dim=(-2, -1), keepdim=True)
    return torch.finfo(dtype).eps ** 2 * rms_sq


class EigenvalueCorrectedScaling(_SecondMomentInBasis):
    """Eigenvalue-corrected Shampoo: ``U = Q_L [ (Q_L^T M_hat Q_R) / sqrt(D_hat + eps) ] Q_R^T``.

    ``M = EMA(M, G; b1)`` lives in parameter space, so it needs nothing on a basis change;
    ``D = EMA((Q_L^T G Q_R)^2; b2)`` lives in the basis and follows any permutation.
    Both are bias-corrected like Adam's.

    ``Q^T M Q`` and ``Q^T G Q`` are separate products, so with a low-precision ``matmul_dtype``
    their rounding noise is independent: in a direction where the projected gradient is
    almost zero (just after a refresh, every direction the basis makes orthogonal to ``G``),
    ``D_hat`` holds the square of one noise and the momentum another: their ratio reached 12
    (bfloat16) and 72 (float16) where float32's is 1, and the second step moved a parameter
    12x / 53x as far as in float32 on a least-squares problem.
    There ``D_hat`` is floored at :func:`rounding_floor`, which bounds such a ratio near 1;
    float32 products (noise below ``sqrt(eps)``) are left exactly as they were.
    """

    def direction(self, factors: KroneckerFactors, moments: Moments, grad: Tensor, step: int,
                  config: Any, projections: GradientProjections | None = None) -> tuple[Tensor, float]:
        assert moments.exp_avg_sq is not None
        beta1, beta2 = config.betas
        dtype = matmul_dtype_of(config)
        exp_avg = ema_(moments.exp_avg, grad, beta1)
        projected = factors.to_basis(grad, dtype)
        correction = ema_(moments.exp_avg_sq, projected * projected, beta2)
        momentum = factors.to_basis(exp_avg, dtype) / (1.0 - beta1**step)
        corrected = correction / (1.0 - beta2**step)
        if isinstance(dtype, torch.dtype) and torch.finfo(dtype).eps > torch.finfo(momentum.dtype).eps:
            corrected = corrected.maximum(rounding_floor(momentum, dtype))
        if config.reference:  # distributed_shampoo: epsilon added after the root
            scaled = momentum / (corrected.sqrt() + config.eps)
        else:
            scaled = momentum / (corrected + config.eps).sqrt()
        return factors.from_basis(scaled, dtype), config.lr


class KLEigenvalueScaling(Scaling):
    """KL-Shampoo: ``M = EMA(M, G; b1)`` (no bias correction) and
    ``U = Q_a [ (Q_a^T M Q_b) * P ] Q_b^T`` with ``P_ij = 1 / (sqrt(lambda_a_i lambda_b_j) + eps)``,
    using the clamped EMA eigenvalues."""

    def direction(self, factors: KroneckerFactors, moments: Moments, grad: Tensor, step: int,
                  config: Any, projections: GradientProjections | None = None) -> tuple[Tensor, float]:
        exp_avg = ema_(moments.exp_avg, grad, config.betas[0])
        # An identity side has lambda = 1: its factor of the outer product is 1.
        inv: Tensor | float = 1.0
        if factors.eigenvalues_left is not None:
            inv = config.inverse(factors.eigenvalues_left).sqrt().unsqueeze(-1)
        if factors.eigenvalues_right is not None:
            inv_sqrt_b = config.inverse(factors.eigenvalues_right).sqrt().unsqueeze(-2)
            inv = inv * inv_sqrt_b if isinstance(inv, Tensor) else inv_sqrt_b
        # 1 / (sqrt(la lb) + eps) written so that a zeroed inverse gives 0, not 1/eps.
        scale = inv / (1.0 + config.eps * inv)
        dtype = matmul_dtype_of(config)
        return factors.from_basis(factors.to_basis(exp_avg, dtype) * scale, dtype), config.lr
