"""Scalings: how a block's direction is formed from its momentum in the eigenbasis.

Every algorithm of the family projects into the bases ``Q_L, Q_R``, scales there, and
projects back: ``U = Q_L [ S(Q_L^T X Q_R) ] Q_R^T``. They differ only in ``S``:

* :class:`InverseRootScaling` -- Shampoo: ``(lambda_L + eps)^{-p} (lambda_R + eps)^{-p}``,
  i.e. ``(L + eps I)^{-p} M (R + eps I)^{-p}``, with grafting and heavy-ball momentum.
* :class:`AdamInBasisScaling` -- SOAP / KL-SOAP: Adam's moments kept in the eigenbasis.
* :class:`EigenvalueCorrectedScaling` -- ``D = EMA((Q_L^T G Q_R)^2)`` replaces the Kronecker
  eigenvalues (George et al. 2018).
* :class:`KLEigenvalueScaling` -- KL-Shampoo: ``1 / sqrt(lambda_a lambda_b)`` from the EMA
  eigenvalues of :class:`~lightning_precond.statistics.TwoSidedStatistics`.

``direction`` returns the unit direction ``U`` and the step size it is taken with, so the
engine's update is ``W <- (1 - lr * wd) W - step_size * U`` for every algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from torch import Tensor

from .eigenbasis import BasisResult
from .grafting import graft_direction, graft_norm, graft_state_shapes
from .statistics import ema_, kl_inverse, permute_along

__all__ = [
    "Scaling",
    "InverseRootScaling",
    "AdamInBasisScaling",
    "EigenvalueCorrectedScaling",
    "KLEigenvalueScaling",
]

State = MutableMapping[str, Tensor]
Hyper = Mapping[str, Any]


def to_basis(state: State, x: Tensor) -> Tensor:
    return state["basis_left"].mT @ x @ state["basis_right"]


def from_basis(state: State, x: Tensor) -> Tensor:
    return state["basis_left"] @ x @ state["basis_right"].mT


class Scaling:
    """Base class: the part of a block's state and math that turns gradients into a direction."""

    def state_shapes(self, m: int, n: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (m, n)}

    def direction(self, state: State, grad: Tensor, step: int, hyper: Hyper) -> tuple[Tensor, float]:
        raise NotImplementedError

    def on_refresh(self, state: State, side: str, old_basis: Tensor, result: BasisResult) -> None:
        """Keep basis-dependent state consistent when ``side``'s basis changes."""


class InverseRootScaling(Scaling):
    """Shampoo: ``P = (L + eps I)^{-p} M_hat (R + eps I)^{-p}``, grafted, then momentum."""

    def state_shapes(self, m: int, n: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        shapes = {"exp_avg": (m, n), **graft_state_shapes(hyper["grafting"], m, n)}
        if hyper["momentum"] > 0:
            shapes["momentum_buffer"] = (m, n)
        return shapes

    def direction(self, state: State, grad: Tensor, step: int, hyper: Hyper) -> tuple[Tensor, float]:
        beta1 = hyper["betas"][0]
        exp_avg = ema_(state["exp_avg"], grad, beta1)
        momentum = exp_avg / (1.0 - beta1**step) if beta1 > 0 else exp_avg
        graft_beta2 = hyper["grafting_beta2"]
        if graft_beta2 is None:
            graft_beta2 = hyper["betas"][1]
        graft = graft_direction(
            hyper["grafting"], state, grad, momentum, graft_beta2, hyper["grafting_eps"], step
        )
        if step >= hyper["start_preconditioning_step"]:
            p = hyper["exponent"]
            eps = hyper["eps"]
            left = (state["eigenvalues_left"].clamp_min(0.0) + eps).pow(-p)
            right = (state["eigenvalues_right"].clamp_min(0.0) + eps).pow(-p)
            scaled = to_basis(state, momentum) * left.unsqueeze(-1) * right.unsqueeze(-2)
            update = from_basis(state, scaled)
            if graft is not None:
                update = graft_norm(update, graft)
        else:
            update = graft if graft is not None else momentum
        mu = hyper["momentum"]
        if mu > 0:
            buffer = state["momentum_buffer"].mul_(mu).add_(update)
            update = update + mu * buffer if hyper["nesterov"] else buffer.clone()
        return update, hyper["lr"]


class AdamInBasisScaling(Scaling):
    """SOAP: Adam's first and second moments both live in the eigenbasis.

    ``M = EMA(M, Gt; b1)``, ``V = EMA(V, Gt^2; b2)`` with ``Gt = Q_L^T G Q_R``;
    ``U = Q_L [M / (sqrt(V) + eps)] Q_R^T`` taken with ``lr sqrt(1 - b2^t) / (1 - b1^t)``.
    On a basis change, ``V`` is permuted with the eigenvectors and ``M`` is re-expressed in
    the new basis (``M <- Q_new^T Q_old M`` on the left, likewise on the right).
    """

    def state_shapes(self, m: int, n: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (m, n), "exp_avg_sq": (m, n)}

    def direction(self, state: State, grad: Tensor, step: int, hyper: Hyper) -> tuple[Tensor, float]:
        beta1, beta2 = hyper["betas"]
        projected = to_basis(state, grad)
        exp_avg = ema_(state["exp_avg"], projected, beta1)
        exp_avg_sq = ema_(state["exp_avg_sq"], projected * projected, beta2)
        update = from_basis(state, exp_avg / (exp_avg_sq.sqrt() + hyper["eps"]))
        step_size = hyper["lr"] * (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
        return update, step_size

    def on_refresh(self, state: State, side: str, old_basis: Tensor, result: BasisResult) -> None:
        if result.permutation is not None:
            dim = -2 if side == "left" else -1
            state["exp_avg_sq"] = permute_along(state["exp_avg_sq"], result.permutation, dim)
        change = old_basis.mT @ result.basis  # [k, d, d]: old coordinates -> new coordinates
        if side == "left":
            state["exp_avg"] = change.mT @ state["exp_avg"]
        else:
            state["exp_avg"] = state["exp_avg"] @ change


class EigenvalueCorrectedScaling(Scaling):
    """Eigenvalue-corrected Shampoo: ``U = Q_L [ (Q_L^T M_hat Q_R) / sqrt(D_hat + eps) ] Q_R^T``.

    ``M = EMA(M, G; b1)`` lives in parameter space, so it needs nothing on a basis change;
    ``D = EMA((Q_L^T G Q_R)^2; b2)`` lives in the basis and follows any permutation.
    Both are bias-corrected like Adam's.
    """

    def state_shapes(self, m: int, n: int, hyper: Hyper) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (m, n), "exp_avg_sq": (m, n)}

    def direction(self, state: State, grad: Tensor, step: int, hyper: Hyper) -> tuple[Tensor, float]:
        beta1, beta2 = hyper["betas"]
        exp_avg = ema_(state["exp_avg"], grad, beta1)
        projected = to_basis(state, grad)
        correction = ema_(state["exp_avg_sq"], projected * projected, beta2)
        momentum = to_basis(state, exp_avg) / (1.0 - beta1**step)
        scaled = momentum / (correction / (1.0 - beta2**step) + hyper["eps"]).sqrt()
        return from_basis(state, scaled), hyper["lr"]

    def on_refresh(self, state: State, side: str, old_basis: Tensor, result: BasisResult) -> None:
        if result.permutation is not None:
            dim = -2 if side == "left" else -1
            state["exp_avg_sq"] = permute_along(state["exp_avg_sq"], result.permutation, dim)


class KLEigenvalueScaling(Scaling):
    """KL-Shampoo: ``M = EMA(M, G; b1)`` (no bias correction) and
    ``U = Q_a [ (Q_a^T M Q_b) * P ] Q_b^T`` with ``P_ij = 1 / (sqrt(lambda_a_i lambda_b_j) + eps)``,
    using the clamped EMA eigenvalues."""

    def direction(self, state: State, grad: Tensor, step: int, hyper: Hyper) -> tuple[Tensor, float]:
        exp_avg = ema_(state["exp_avg"], grad, hyper["betas"][0])
        inv_sqrt_a = kl_inverse(state["eigenvalues_left"]).sqrt()
        inv_sqrt_b = kl_inverse(state["eigenvalues_right"]).sqrt()
        inv = inv_sqrt_a.unsqueeze(-1) * inv_sqrt_b.unsqueeze(-2)
        # 1 / (sqrt(la lb) + eps) written so that a zeroed inverse gives 0, not 1/eps.
        scale = inv / (1.0 + hyper["eps"] * inv)
        return from_basis(state, to_basis(state, exp_avg) * scale), hyper["lr"]
