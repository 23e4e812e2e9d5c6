"""Kronecker-factor statistics: how each block's left and right factors track its gradients.

Both flavours update the stacked factors of :class:`KroneckerFactors` in place from a
stacked gradient ``[k, m, n]``:

* :class:`KroneckerStatistics` -- Shampoo / SOAP: ``L = EMA(L, G G^T)``, ``R = EMA(R, G^T G)``
  (``beta == 1`` sums, AdaGrad style). Eigenvalue estimates come from the last refresh.
* :class:`TwoSidedStatistics` -- KL-Shampoo / KL-SOAP: each factor is updated with the other
  factor's inverse in its (possibly outdated) basis, and the eigenvalues are EMA estimates in
  that basis, which is what keeps a stale basis usable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .eigenbasis import BasisResult

__all__ = ["KroneckerFactors", "KroneckerStatistics", "TwoSidedStatistics", "ema_", "SIDES"]

SIDES = ("left", "right")


def ema_(average: Tensor, new: Tensor, beta: float) -> Tensor:
    """``average <- beta * average + (1 - beta) * new`` in place; ``beta == 1`` accumulates."""
    if beta == 1.0:
        return average.add_(new)
    return average.mul_(beta).add_(new, alpha=1.0 - beta)


def permute_along(values: Tensor, order: Tensor, dim: int) -> Tensor:
    """Reorder a stack along ``dim`` (-1 or -2 of a matrix, -1 of a vector) by ``order [k, d]``."""
    if values.dim() == 2:
        return values.gather(-1, order)
    index = order.unsqueeze(-1) if dim == -2 else order.unsqueeze(-2)
    return values.gather(dim, index.expand_as(values))


@dataclass
class KroneckerFactors:
    """Two-sided Kronecker state of a bucket of ``k`` blocks of shape ``m x n``."""

    factor_left: Tensor  # [k, m, m]  L, the left statistic
    factor_right: Tensor  # [k, n, n]  R
    basis_left: Tensor  # [k, m, m]  Q_L, eigenvector columns (descending eigenvalue at refresh)
    basis_right: Tensor  # [k, n, n]  Q_R
    eigenvalues_left: Tensor  # [k, m]  the eigenvalue estimates in use
    eigenvalues_right: Tensor  # [k, n]

    @staticmethod
    def shapes(m: int, n: int) -> dict[str, tuple[int, ...]]:
        return {
            "factor_left": (m, m), "factor_right": (n, n),
            "basis_left": (m, m), "basis_right": (n, n),
            "eigenvalues_left": (m,), "eigenvalues_right": (n,),
        }

    def factor(self, side: str) -> Tensor:
        return self.factor_left if side == "left" else self.factor_right

    def basis(self, side: str) -> Tensor:
        return self.basis_left if side == "left" else self.basis_right

    def eigenvalues(self, side: str) -> Tensor:
        return self.eigenvalues_left if side == "left" else self.eigenvalues_right

    # Stored contiguous: eigh's descending order is a flipped view and LAPACK returns
    # column-major Q, and matmuls round differently by layout, so a live basis and the
    # contiguous copy a checkpoint restores would diverge in the last bits.
    def set_basis(self, side: str, basis: Tensor) -> None:
        setattr(self, f"basis_{side}", basis.contiguous())

    def set_eigenvalues(self, side: str, values: Tensor) -> None:
        setattr(self, f"eigenvalues_{side}", values.contiguous())

    def to_basis(self, x: Tensor) -> Tensor:
        """``Q_L^T X Q_R``."""
        return self.basis_left.mT @ x @ self.basis_right

    def from_basis(self, x: Tensor) -> Tensor:
        """``Q_L X Q_R^T``."""
        return self.basis_left @ x @ self.basis_right.mT


class KroneckerStatistics:
    """One-sided factors ``L = EMA(L, G G^T; beta)``, ``R = EMA(R, G^T G; beta)``."""

    # Entries of G G^T are at most ||G||_F^2: a gradient whose squared norm times this
    # factor is finite cannot make the statistics overflow.
    headroom = 1.0

    def initial_values(self, factors: KroneckerFactors) -> None:
        for side in SIDES:
            basis = factors.basis(side)
            basis.copy_(torch.eye(basis.shape[-1], dtype=basis.dtype, device=basis.device))

    def initialize_from(self, factors: KroneckerFactors, grad: Tensor, beta: float) -> None:
        """First gradient of a basis-first algorithm (SOAP): ``L = (1 - beta) G G^T``."""
        self.update(factors, grad, beta)

    def update(self, factors: KroneckerFactors, grad: Tensor, beta: float) -> None:
        ema_(factors.factor_left, grad @ grad.mT, beta)
        ema_(factors.factor_right, grad.mT @ grad, beta)

    def on_refresh(self, factors: KroneckerFactors, side: str, result: BasisResult) -> None:
        factors.set_eigenvalues(side, result.eigenvalues)


# Eigenvalue estimates of a fresh two-sided factor pair (KL-Shampoo reference: c0 = 0.1).
KL_INITIAL_EIGENVALUE = 0.1


def kl_inverse(eigenvalues: Tensor) -> Tensor:
    """``1 / lambda`` with KL-Shampoo's clamp ``lambda^{-1/2} <= max(10, min(d, 4000))``;
    non-finite inverses become 0 (that direction is then left alone)."""
    dim = eigenvalues.shape[-1]
    cap = float(max(10, min(dim, 4000)))
    inv_sqrt = eigenvalues.clamp_min(0.0).rsqrt().clamp(max=cap)
    return torch.nan_to_num(inv_sqrt, nan=0.0, posinf=0.0, neginf=0.0).square()


class TwoSidedStatistics(KroneckerStatistics):
    """KL two-sided estimation with EMA eigenvalues (Lin et al. 2025).

    With the old bases ``Q_a, Q_b`` and eigenvalues ``lambda_a, lambda_b`` (both sides use
    the values from before this step)::

        S_a = EMA(S_a, G Q_b diag(1/lambda_b) Q_b^T G^T / n)
        S_b = EMA(S_b, G^T Q_a diag(1/lambda_a) Q_a^T G / m)
        lambda_a = EMA(lambda_a, (Gt^2 @ (1/lambda_b)) / n),  Gt = Q_a^T G Q_b
        lambda_b = EMA(lambda_b, ((1/lambda_a) @ Gt^2) / m)
    """

    # The inverse eigenvalues weigh G G^T by up to the clamp squared (<= 4000^2).
    headroom = 4000.0**2

    def initial_values(self, factors: KroneckerFactors) -> None:
        super().initial_values(factors)
        factors.eigenvalues_left.fill_(KL_INITIAL_EIGENVALUE)
        factors.eigenvalues_right.fill_(KL_INITIAL_EIGENVALUE)

    def initialize_from(self, factors: KroneckerFactors, grad: Tensor, beta: float) -> None:
        """First gradient: the one-sided factors scaled by 1/n and 1/m."""
        m, n = grad.shape[-2], grad.shape[-1]
        ema_(factors.factor_left, grad @ grad.mT / n, beta)
        ema_(factors.factor_right, grad.mT @ grad / m, beta)

    def update(self, factors: KroneckerFactors, grad: Tensor, beta: float) -> None:
        m, n = grad.shape[-2], grad.shape[-1]
        inv_a = kl_inverse(factors.eigenvalues_left)
        inv_b = kl_inverse(factors.eigenvalues_right)
        grad_qb = grad @ factors.basis_right  # [k, m, n]
        qa_grad = factors.basis_left.mT @ grad  # [k, m, n]
        ema_(factors.factor_left, (grad_qb * inv_b.unsqueeze(-2)) @ grad_qb.mT / n, beta)
        ema_(factors.factor_right, qa_grad.mT @ (qa_grad * inv_a.unsqueeze(-1)) / m, beta)
        projected_sq = (qa_grad @ factors.basis_right).square()
        new_a = (projected_sq @ inv_b.unsqueeze(-1)).squeeze(-1) / n
        new_b = (inv_a.unsqueeze(-2) @ projected_sq).squeeze(-2) / m
        ema_(factors.eigenvalues_left, new_a, beta)
        ema_(factors.eigenvalues_right, new_b, beta)

    def on_refresh(self, factors: KroneckerFactors, side: str, result: BasisResult) -> None:
        # The EMA eigenvalues stay; only their order follows the basis columns.
        if result.permutation is not None:
            factors.set_eigenvalues(side, permute_along(factors.eigenvalues(side), result.permutation, -1))
