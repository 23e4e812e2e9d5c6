"""The public optimizers: each is a :class:`~lightning_precond.engine.Recipe` plus defaults.

Every optimizer accepts, besides its hyperparameters (which may differ per param group),
the optimizer-wide options of :class:`~lightning_precond.engine.EngineOptions` as keyword
arguments: ``max_preconditioner_dim``, ``preconditioner_dtype``, ``refresh``
(``"periodic"`` | ``"adaptive"``), ``refresh_method``, ``refresh_tolerance``,
``refresh_check_interval``, ``max_qr_iterations``, ``nonfinite_grad`` (``"skip"`` |
``"raise"``), ``max_consecutive_failures``, ``precondition_1d`` and ``distributed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .engine import EngineOptions, PreconditionedOptimizer, Recipe
from .grafting import GRAFTING_METHODS
from .scaling import (
    AdamInBasisScaling,
    EigenvalueCorrectedScaling,
    InverseRootScaling,
    KLEigenvalueScaling,
)
from .statistics import KroneckerStatistics, TwoSidedStatistics

__all__ = ["SOAP", "Shampoo", "KLShampoo", "KLSOAP", "EigenvalueCorrectedShampoo"]


def _check_unit_interval(value: float | None, name: str) -> None:
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


class _BasisFirstOptimizer(PreconditionedOptimizer):
    """Algorithms whose first call builds the basis (SOAP, KL, eigenvalue-corrected).

    They share their hyperparameters; each preset only sets defaults and its ``RECIPE``.
    """

    RECIPE: Recipe

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float],
        shampoo_beta: float | None,
        eps: float,
        weight_decay: float,
        precondition_frequency: int,
        **options: Any,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
            weight_decay=weight_decay, precondition_frequency=precondition_frequency,
        )
        super().__init__(params, defaults, self.RECIPE, EngineOptions(**options))

    def _check_group(self, group: Mapping[str, Any]) -> None:
        super()._check_group(group)
        _check_unit_interval(group.get("shampoo_beta"), "shampoo_beta")


class SOAP(_BasisFirstOptimizer):
    r"""SOAP: Adam in Shampoo's eigenbasis (Vyas et al. 2024).

    .. math::
        \tilde G = Q_L^\top G Q_R,\quad M \leftarrow \mathrm{EMA}(M, \tilde G),\quad
        V \leftarrow \mathrm{EMA}(V, \tilde G^2),\quad
        W \leftarrow W - \eta\tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} Q_L \tfrac{M}{\sqrt V + \epsilon} Q_R^\top

    The first call only builds the factors and an exact basis; every
    ``precondition_frequency`` steps the basis is refreshed by one warm-started power/QR
    step, with ``V`` permuted along with the eigenvectors and ``M`` re-expressed in the new
    basis.

    Args:
        params: parameters or param groups (``named_parameters()`` is accepted).
        lr: learning rate.
        betas: Adam's ``(beta1, beta2)`` in the eigenbasis.
        shampoo_beta: EMA coefficient of the Kronecker factors (default: ``betas[1]``).
        eps: Adam's epsilon.
        weight_decay: decoupled weight decay, applied after the update as in the reference.
        precondition_frequency: steps between basis refreshes.
        **options: optimizer-wide options (see module docstring).

    Example::

        def configure_optimizers(self):
            return SOAP(self.parameters(), lr=3e-3)
    """

    RECIPE = Recipe(
        statistics=KroneckerStatistics(),
        scaling=AdamInBasisScaling(),
        basis_from_first_gradient=True,
        decay_after_update=True,
        sort_on_refresh=True,
        refresh_method="power",
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr, betas, shampoo_beta, eps, weight_decay, precondition_frequency, **options
        )


class KLSOAP(SOAP):
    """KL-SOAP: SOAP's Adam in the eigenbasis with KL-Shampoo's two-sided factor update
    (Lin et al. 2025). Arguments and defaults as :class:`SOAP`; ``shampoo_beta`` (default
    ``betas[1]``) drives the factors and the EMA eigenvalues."""

    RECIPE = Recipe(
        statistics=TwoSidedStatistics(),
        scaling=AdamInBasisScaling(),
        basis_from_first_gradient=True,
        decay_after_update=True,
        sort_on_refresh=True,
        refresh_method="power",
    )


class KLShampoo(_BasisFirstOptimizer):
    r"""KL-Shampoo (Lin et al. 2025): two-sided Kronecker estimation with EMA eigenvalues.

    ``M = EMA(M, G; betas[0])`` (no bias correction) and
    ``U = Q_a [(Q_a^T M Q_b) / (sqrt(lambda_a lambda_b^T) + eps)] Q_b^T``; each factor is
    updated with the other's inverse in the old basis, the eigenvalues are EMA estimates in
    that basis (clamped), and the bases are refreshed by a QR step every
    ``precondition_frequency`` steps. No grafting and no second moment: its state is one
    ``m x n`` buffer smaller per block than SOAP's.

    Args:
        betas: ``(momentum, shampoo_beta)``; ``shampoo_beta`` (default ``betas[1]``, 0.98)
            is the EMA coefficient of the factors and eigenvalues (weight of the old value).
        Other arguments as :class:`SOAP`.
    """

    RECIPE = Recipe(
        statistics=TwoSidedStatistics(),
        scaling=KLEigenvalueScaling(),
        basis_from_first_gradient=True,
        sort_on_refresh=False,
        refresh_method="power",
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr, betas, shampoo_beta, eps, weight_decay, precondition_frequency, **options
        )


class EigenvalueCorrectedShampoo(_BasisFirstOptimizer):
    r"""Eigenvalue-corrected Shampoo (George et al. 2018; Eschenhagen et al. 2025).

    Shampoo's eigenbasis with the Kronecker eigenvalues replaced by a running estimate of
    the second moment in that basis: ``D = EMA((Q_L^T G Q_R)^2; betas[1])`` and
    ``U = Q_L [(Q_L^T M_hat Q_R) / sqrt(D_hat + eps)] Q_R^T`` (bias-corrected like Adam).
    Needs no grafting. The basis is recomputed exactly (``eigh``) every
    ``precondition_frequency`` steps unless ``refresh_method`` or ``refresh="adaptive"``
    say otherwise.
    """

    RECIPE = Recipe(
        statistics=KroneckerStatistics(),
        scaling=EigenvalueCorrectedScaling(),
        basis_from_first_gradient=True,
        sort_on_refresh=True,
        refresh_method="eigh",
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        shampoo_beta: float | None = None,
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        precondition_frequency: int = 10,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr, betas, shampoo_beta, eps, weight_decay, precondition_frequency, **options
        )


class Shampoo(PreconditionedOptimizer):
    r"""Shampoo with grafting (Gupta et al. 2018; Anil et al. 2020).

    ``L = EMA(L, G G^T; betas[1])`` and ``R`` likewise (``betas[1] == 1`` sums, AdaGrad
    style); every ``precondition_frequency`` steps from ``start_preconditioning_step`` the
    roots are recomputed by eigendecomposition; the direction
    ``P = (L + eps I)^{-p} M_hat (R + eps I)^{-p}`` (``M`` the EMA of gradients with
    ``betas[0]``, bias-corrected) is rescaled per block to the norm of the grafted method's
    direction, then optionally passed through heavy-ball / Nesterov momentum.
    Before preconditioning starts the grafted method alone is used, so
    ``Shampoo(grafting="adam")`` is AdamW until then.

    Args:
        lr: learning rate.
        betas: ``(beta1, beta2)``: gradient EMA and factor EMA (``beta2 = 1``: sum).
        epsilon: damping added to the factors' eigenvalues (group key ``"eps"``).
        weight_decay: decoupled weight decay.
        momentum, nesterov: heavy-ball momentum on the final direction.
        exponent: per-factor root ``p`` (1/4 is classic two-factor Shampoo, 1/2 allowed).
        precondition_frequency: steps between root recomputations.
        start_preconditioning_step: first preconditioned step (default: the frequency).
        grafting: ``"adam"``, ``"adagrad"``, ``"rmsprop"``, ``"sgd"`` or ``None``.
        grafting_beta2, grafting_eps: the grafted method's (default beta2: ``betas[1]``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        exponent: float = 0.25,
        precondition_frequency: int = 10,
        start_preconditioning_step: int | None = None,
        grafting: str | None = "adam",
        grafting_beta2: float | None = None,
        grafting_eps: float = 1e-8,
        **options: Any,
    ) -> None:
        if start_preconditioning_step is None:
            start_preconditioning_step = precondition_frequency
        defaults = dict(
            lr=lr, betas=betas, eps=epsilon, weight_decay=weight_decay, momentum=momentum,
            nesterov=nesterov, exponent=exponent, precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step, grafting=grafting,
            grafting_beta2=grafting_beta2, grafting_eps=grafting_eps,
        )
        recipe = Recipe(
            statistics=KroneckerStatistics(),
            scaling=InverseRootScaling(),
            basis_from_first_gradient=False,
            statistics_first=True,
            sort_on_refresh=False,
            refresh_method="eigh",
        )
        super().__init__(params, defaults, recipe, EngineOptions(**options))

    def _check_group(self, group: Mapping[str, Any]) -> None:
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas}")
        _check_unit_interval(betas[0], "betas[0]")
        if not 0.0 < betas[1] <= 1.0:
            raise ValueError(f"betas[1] must be in (0, 1] (1 sums the factors), got {betas[1]}")
        super()._check_group({**group, "betas": (betas[0], 0.0)})
        if group["grafting"] not in GRAFTING_METHODS:
            raise ValueError(f"grafting must be one of {GRAFTING_METHODS}, got {group['grafting']!r}")
        if not 0.0 < group["exponent"] <= 1.0:
            raise ValueError(f"exponent must be in (0, 1], got {group['exponent']}")
        _check_unit_interval(group["momentum"], "momentum")
        if group["nesterov"] and group["momentum"] <= 0.0:
            raise ValueError("nesterov=True requires momentum > 0")
        start = group["start_preconditioning_step"]
        if not (isinstance(start, int) and start >= 1):
            raise ValueError(f"start_preconditioning_step must be a positive int, got {start}")
        _check_unit_interval(group["grafting_beta2"], "grafting_beta2")
        if not group["grafting_eps"] >= 0.0:
            raise ValueError(f"grafting_eps must be >= 0, got {group['grafting_eps']}")

    def _diagonal_hyperparameters(self, group: Mapping[str, Any]) -> tuple[float, float, float]:
        """Vectors take AdamW with the grafting method's beta2 and epsilon."""
        beta2 = group["grafting_beta2"]
        if beta2 is None:
            beta2 = group["betas"][1] if group["betas"][1] < 1.0 else 0.999
        return float(group["betas"][0]), float(beta2), float(group["grafting_eps"])
