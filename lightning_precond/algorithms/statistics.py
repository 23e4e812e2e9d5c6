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
from typing import Any

import torch
from torch import Tensor

from .eigenbasis import BasisResult
from .precision import MatmulPrecision, matmul_dtype_of, product

__all__ = ["GradientProjections", "KroneckerFactors", "KroneckerStatistics", "TwoSidedStatistics", "ema_", "SIDES"]

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
    """Kronecker state of a bucket of ``k`` blocks of shape ``m x n``.

    A side without a factor (an identity side: the parameter's dim there is above
    ``max_factor_dim``) has ``None`` in its three fields; its projections are the identity
    (``Q = I``), and its eigenvalues count as 1 wherever a scaling multiplies them in.
    """

    factor_left: Tensor | None  # [k, m, m]  L, the left statistic
    factor_right: Tensor | None  # [k, n, n]  R
    basis_left: Tensor | None  # [k, m, m]  Q_L, eigenvector columns (descending eigenvalue at refresh)
    basis_right: Tensor | None  # [k, n, n]  Q_R
    eigenvalues_left: Tensor | None  # [k, m]  the eigenvalue estimates in use
    eigenvalues_right: Tensor | None  # [k, n]

    @staticmethod
    def shapes(m: int, n: int, sides: tuple[str, ...] = SIDES) -> dict[str, tuple[int, ...]]:
        """The state shapes of the factored ``sides`` (no entry for an identity side)."""
        out: dict[str, tuple[int, ...]] = {}
        for side, d in (("left", m), ("right", n)):
            if side in sides:
                out.update({f"factor_{side}": (d, d), f"basis_{side}": (d, d), f"eigenvalues_{side}": (d,)})
        return out

    @property
    def sides(self) -> tuple[str, ...]:
        """The sides that have a factor."""
        return tuple(side for side in SIDES if self.factor(side) is not None)

    def factor(self, side: str) -> Tensor | None:
        return self.factor_left if side == "left" else self.factor_right

    def basis(self, side: str) -> Tensor | None:
        return self.basis_left if side == "left" else self.basis_right

    def eigenvalues(self, side: str) -> Tensor | None:
        return self.eigenvalues_left if side == "left" else self.eigenvalues_right

    # Stored contiguous: eigh's descending order is a flipped view and LAPACK returns
    # column-major Q, and matmuls round differently by layout, so a live basis and the
    # contiguous copy a checkpoint restores would diverge in the last bits.
    def set_basis(self, side: str, basis: Tensor) -> None:
        setattr(self, f"basis_{side}", basis.contiguous())

    def set_eigenvalues(self, side: str, values: Tensor) -> None:
        setattr(self, f"eigenvalues_{side}", values.contiguous())

    def to_basis(self, x: Tensor, dtype: MatmulPrecision = None) -> Tensor:
        """``Q_L^T X Q_R`` (an identity side leaves that product out), computed in ``dtype``
        (None: the state dtype; see :mod:`.precision`)."""
        return GradientProjections(self, x, dtype).both()

    def from_basis(self, x: Tensor, dtype: MatmulPrecision = None) -> Tensor:
        """``Q_L X Q_R^T`` (an identity side leaves that product out), computed in ``dtype``."""
        left, right = self.basis_left, self.basis_right
        if left is not None and right is not None:
            return product(left, x, right.mT, dtype=dtype)
        if left is not None:
            return product(left, x, dtype=dtype)
        return product(x, right.mT, dtype=dtype) if right is not None else x


class GradientProjections:
    """One step's gradient in a block stack's bases, each product formed at most once.

    KL-SOAP's scaling takes ``Q_a^T G Q_b`` and its two-sided statistics take ``G Q_b``,
    ``Q_a^T G`` and ``Q_a^T G Q_b``: shared, its step forms 7 ``m x n``-sized products instead
    of 9. ``both()`` is ``(Q_a^T G) Q_b``, the association of :meth:`KroneckerFactors.to_basis`,
    so sharing changes no bit. An identity side leaves its product out.
    """

    def __init__(self, factors: KroneckerFactors, grad: Tensor, dtype: MatmulPrecision) -> None:
        self.factors, self.grad, self.dtype = factors, grad, dtype
        self._left: Tensor | None = None
        self._right: Tensor | None = None
        self._both: Tensor | None = None

    def left(self) -> Tensor:
        """``Q_a^T G``."""
        if self._left is None:
            basis = self.factors.basis_left
            self._left = self.grad if basis is None else product(basis.mT, self.grad, dtype=self.dtype)
        return self._left

    def right(self) -> Tensor:
        """``G Q_b``."""
        if self._right is None:
            basis = self.factors.basis_right
            self._right = self.grad if basis is None else product(self.grad, basis, dtype=self.dtype)
        return self._right

    def both(self) -> Tensor:
        """``Q_a^T G Q_b``."""
        if self._both is None:
            basis = self.factors.basis_right
            self._both = self.left() if basis is None else product(self.left(), basis, dtype=self.dtype)
        return self._both


class KroneckerStatistics:
    """One-sided factors ``L = EMA(L, G G^T; beta)``, ``R = EMA(R, G^T G; beta)``."""

    # Entries of G G^T are at most ||G||_F^2: a gradient whose squared norm times this
    # factor is finite cannot make the statistics overflow.
    headroom = 1.0

    def initial_values(self, factors: KroneckerFactors) -> None:
        for side in factors.sides:
            basis = factors.basis(side)
            assert basis is not None
            basis.copy_(torch.eye(basis.shape[-1], dtype=basis.dtype, device=basis.device))

    def initialize_from(self, factors: KroneckerFactors, grad: Tensor, beta: float, config: Any = None) -> None:
        """First gradient of a basis-first algorithm (SOAP): ``L = (1 - beta) G G^T``."""
        self.update(factors, grad, beta, config)

    def update(self, factors: KroneckerFactors, grad: Tensor, beta: float, config: Any = None,
               projections: GradientProjections | None = None) -> None:
        dtype = matmul_dtype_of(config)
        if factors.factor_left is not None:
            ema_(factors.factor_left, product(grad, grad.mT, dtype=dtype), beta)
        if factors.factor_right is not None:
            ema_(factors.factor_right, product(grad.mT, grad, dtype=dtype), beta)

    def on_refresh(self, factors: KroneckerFactors, side: str, result: BasisResult) -> None:
        factors.set_eigenvalues(side, result.eigenvalues)


# Eigenvalue estimates of a fresh two-sided factor pair (KL-Shampoo reference: c0 = 0.1).
KL_INITIAL_EIGENVALUE = 0.1


def kl_inverse(eigenvalues: Tensor, max_clamp_value: float | None = 4000.0, *, reference: bool = False) -> Tensor:
    """``1 / lambda`` with KL-Shampoo's clamp ``lambda^{-1/2} <= max(10, min(d, max_clamp_value))``
    (None: no clamp); non-finite inverses become 0 (that direction is then left alone).

    The clamp comes first, so ``lambda = 0`` gets the largest inverse; ``reference=True``
    takes KL-Methods' order (non-finite to 0 first, then the clamp: ``lambda = 0`` gives 0).
    """
    inv_sqrt = eigenvalues.clamp_min(0.0).rsqrt()
    cap = None if max_clamp_value is None else float(max(10, min(eigenvalues.shape[-1], max_clamp_value)))
    if reference:
        inv_sqrt = torch.nan_to_num(inv_sqrt, nan=0.0, posinf=0.0, neginf=0.0)
        return (inv_sqrt if cap is None else inv_sqrt.clamp(max=cap)).square()
    if cap is not None:
        inv_sqrt = inv_sqrt.clamp(max=cap)
    return torch.nan_to_num(inv_sqrt, nan=0.0, posinf=0.0, neginf=0.0).square()


def _inverse(config: Any, eigenvalues: Tensor) -> Tensor:
    return config.inverse(eigenvalues) if config is not None else kl_inverse(eigenvalues)


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
        for side in factors.sides:
            values = factors.eigenvalues(side)
            assert values is not None
            values.fill_(KL_INITIAL_EIGENVALUE)

    def initialize_from(self, factors: KroneckerFactors, grad: Tensor, beta: float, config: Any = None) -> None:
        """First gradient: the one-sided factors scaled by 1/n and 1/m; the eigenvalue estimates
        start at ``config.initial_eigenvalue``: a constant, or ``"gradient"``: the RMS of the
        block's gradient on both sides, where ``sqrt(lambda_a lambda_b) = rms(G)`` makes the
        first direction ``G / rms(G)`` and ``S_a = G S_b^{-1} G^T / n`` holds on average."""
        m, n = grad.shape[-2], grad.shape[-1]
        dtype = matmul_dtype_of(config)
        if factors.factor_left is not None:
            ema_(factors.factor_left, product(grad, grad.mT, dtype=dtype) / n, beta)
        if factors.factor_right is not None:
            ema_(factors.factor_right, product(grad.mT, grad, dtype=dtype) / m, beta)
        initial = getattr(config, "initial_eigenvalue", KL_INITIAL_EIGENVALUE)
        for side in factors.sides:
            values = factors.eigenvalues(side)
            assert values is not None
            if initial == "gradient":
                rms = grad.square().mean(dim=(-2, -1)).sqrt()  # [k]
                # A zero gradient keeps the constant: its inverse would be clamped to the cap.
                rms = torch.where(rms > 0, rms, torch.full_like(rms, KL_INITIAL_EIGENVALUE))
                values.copy_(rms.unsqueeze(-1).expand_as(values))
            else:
                values.fill_(float(initial))

    def update(self, factors: KroneckerFactors, grad: Tensor, beta: float, config: Any = None,
               projections: GradientProjections | None = None) -> None:
        """The update of the class docstring; an identity side is ``S = I`` (``Q = I``,
        ``lambda = 1``): the other factor is then ``EMA(G G^T / n)`` (or ``G^T G / m``), the
        KL fixed point with that side held at the identity. ``projections``: ``grad``'s, shared
        with the scaling of the same step (None: formed here)."""
        m, n = grad.shape[-2], grad.shape[-1]
        left, right = factors.factor_left, factors.factor_right
        inv_a = _inverse(config, factors.eigenvalues_left) if left is not None else None
        inv_b = _inverse(config, factors.eigenvalues_right) if right is not None else None
        dtype = matmul_dtype_of(config)
        if projections is None:
            projections = GradientProjections(factors, grad, dtype)
        grad_qb, qa_grad = projections.right(), projections.left()  # [k, m, n] each
        if left is not None:
            weighted = grad_qb * inv_b.unsqueeze(-2) if inv_b is not None else grad_qb
            ema_(left, product(weighted, grad_qb.mT, dtype=dtype) / n, beta)
        if right is not None:
            weighted = qa_grad * inv_a.unsqueeze(-1) if inv_a is not None else qa_grad
            ema_(right, product(qa_grad.mT, weighted, dtype=dtype) / m, beta)
        projected_sq = projections.both().square()
        if left is not None:
            new_a = (projected_sq @ inv_b.unsqueeze(-1)).squeeze(-1) if inv_b is not None else projected_sq.sum(-1)
            ema_(factors.eigenvalues_left, new_a / n, beta)
        if right is not None:
            new_b = (inv_a.unsqueeze(-2) @ projected_sq).squeeze(-2) if inv_a is not None else projected_sq.sum(-2)
            ema_(factors.eigenvalues_right, new_b / m, beta)
        if config is not None and config.reference:
            # KL-Methods stores the clamped values: the floor feeds the next EMA step.
            for side in factors.sides:
                values = factors.eigenvalues(side)
                inv = config.inverse(values)
                factors.set_eigenvalues(side, torch.where(inv > 0, 1.0 / inv, torch.zeros_like(inv)))

    def on_refresh(self, factors: KroneckerFactors, side: str, result: BasisResult) -> None:
        # The EMA eigenvalues stay; only their order follows the basis columns.
        if result.permutation is not None:
            factors.set_eigenvalues(side, permute_along(factors.eigenvalues(side), result.permutation, -1))
