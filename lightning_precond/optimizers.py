"""The public optimizers: each is a composition of parts (see :mod:`lightning_precond.algorithms`)
with its defaults; equations in ``docs/algorithms.md``.

Besides its hyperparameters (which may differ per param group), every optimizer accepts the
optimizer-wide options of :class:`~lightning_precond.options.EngineOptionsDict` as keyword
arguments (``max_preconditioner_dim``, ``refresh``, ``nonfinite_grad``, ``distributed``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from typing_extensions import Unpack

from .algorithms.asgo import ASGOConfig, OneSided
from .algorithms.kronecker import BasisFirst, EigenbasisConfig, ShampooConfig, StatisticsFirst
from .algorithms.muon import MuonConfig, Orthogonalized
from .algorithms.scaling import AdamInBasisScaling, EigenvalueCorrectedScaling, InverseRootScaling, KLEigenvalueScaling
from .algorithms.statistics import KroneckerStatistics, TwoSidedStatistics
from .blocks import ONE_SIDE_CHOICES
from .engine import PreconditionedOptimizer
from .options import EngineOptionsDict, options_help

__all__ = ["SOAP", "Shampoo", "KLShampoo", "KLSOAP", "EigenvalueCorrectedShampoo", "Muon"]

Params = Iterable[Any]


class SOAP(PreconditionedOptimizer):
    """SOAP: Adam in Shampoo's eigenbasis (Vyas et al. 2024).

    The first call builds the factors (EMA ``shampoo_beta``, default ``betas[1]``) and an
    exact basis, without an update; every ``precondition_frequency`` steps a warm-started
    power/QR step refreshes it. Weight decay follows the update, as in the reference.

    Example::

        def configure_optimizers(self):
            return SOAP(self.parameters(), lr=3e-3)
    """

    def __init__(self, params: Params, lr: float = 3e-3, *, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, **options: Unpack[EngineOptionsDict]) -> None:
        config = EigenbasisConfig(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                  weight_decay=weight_decay, precondition_frequency=precondition_frequency)
        super().__init__(params, config, self._algorithm(), **options)

    @staticmethod
    def _algorithm() -> BasisFirst:
        return BasisFirst(KroneckerStatistics(), AdamInBasisScaling(), refresh_method="power",
                          sort_on_refresh=True, decay_after_update=True)


class KLSOAP(SOAP):
    """KL-SOAP (Lin et al. 2025): SOAP's Adam in the eigenbasis over KL-Shampoo's two-sided
    factors and EMA eigenvalues. Arguments and defaults as :class:`SOAP`.

    Example: ``KLSOAP(model.parameters(), lr=3e-3)``
    """

    @staticmethod
    def _algorithm() -> BasisFirst:
        return BasisFirst(TwoSidedStatistics(), AdamInBasisScaling(), refresh_method="power",
                          sort_on_refresh=True, decay_after_update=True)


class KLShampoo(PreconditionedOptimizer):
    """KL-Shampoo (Lin et al. 2025): two-sided Kronecker estimation with EMA eigenvalues.

    ``betas = (momentum, factor EMA)``; the direction is ``Q_a [(Q_a^T M Q_b) /
    (sqrt(lambda_a lambda_b^T) + eps)] Q_b^T`` with ``M`` the gradient EMA (no bias correction)
    and bases refreshed by a QR step every ``precondition_frequency`` steps. No grafting and
    no second moment.

    Example: ``KLShampoo(model.parameters(), lr=3e-3)``
    """

    def __init__(self, params: Params, lr: float = 3e-3, *, betas: tuple[float, float] = (0.9, 0.98),
                 shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, **options: Unpack[EngineOptionsDict]) -> None:
        config = EigenbasisConfig(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                  weight_decay=weight_decay, precondition_frequency=precondition_frequency)
        algorithm = BasisFirst(TwoSidedStatistics(), KLEigenvalueScaling(), refresh_method="power",
                               sort_on_refresh=False)
        super().__init__(params, config, algorithm, **options)


class EigenvalueCorrectedShampoo(PreconditionedOptimizer):
    """Eigenvalue-corrected Shampoo (George et al. 2018; Eschenhagen et al. 2025).

    Shampoo's eigenbasis with the Kronecker eigenvalues replaced by a bias-corrected EMA of
    ``(Q_L^T G Q_R)^2`` (``betas[1]``); no grafting. Bases are recomputed exactly (``eigh``)
    every ``precondition_frequency`` steps unless ``refresh_method`` / ``refresh`` say otherwise.

    Example: ``EigenvalueCorrectedShampoo(model.parameters(), lr=1e-3)``
    """

    def __init__(self, params: Params, lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 shampoo_beta: float | None = None, eps: float = 1e-12, weight_decay: float = 0.0,
                 precondition_frequency: int = 10, **options: Unpack[EngineOptionsDict]) -> None:
        config = EigenbasisConfig(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                  weight_decay=weight_decay, precondition_frequency=precondition_frequency)
        algorithm = BasisFirst(KroneckerStatistics(), EigenvalueCorrectedScaling(), refresh_method="eigh",
                               sort_on_refresh=True)
        super().__init__(params, config, algorithm, **options)


class Shampoo(PreconditionedOptimizer):
    """Shampoo with grafting (Gupta et al. 2018; Anil et al. 2020).

    Factors ``EMA(G G^T; betas[1])`` (``betas[1] = 1`` sums, AdaGrad style); from
    ``start_preconditioning_step`` (default: ``precondition_frequency``) roots are recomputed
    every ``precondition_frequency`` steps and ``(L + eps I)^{-p} M_hat (R + eps I)^{-p}`` is
    rescaled to the norm of the ``grafting`` method's direction (``"adam"``, ``"adagrad"``,
    ``"rmsprop"``, ``"sgd"``, None), then optionally heavy-ball / Nesterov ``momentum``.
    Before that, the grafted method alone runs: ``Shampoo(grafting="adam")`` is AdamW.

    Example: ``Shampoo(model.parameters(), lr=1e-3, precondition_frequency=20)``
    """

    def __init__(self, params: Params, lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 epsilon: float = 1e-12, weight_decay: float = 0.0, momentum: float = 0.0,
                 nesterov: bool = False, exponent: float = 0.25, precondition_frequency: int = 10,
                 start_preconditioning_step: int | None = None,
                 grafting: Literal["adam", "adagrad", "rmsprop", "sgd"] | None = "adam",
                 grafting_beta2: float | None = None, grafting_eps: float = 1e-8,
                 **options: Unpack[EngineOptionsDict]) -> None:
        config = ShampooConfig(
            lr=lr, betas=betas, eps=epsilon, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            exponent=exponent, precondition_frequency=precondition_frequency,
            start_preconditioning_step=precondition_frequency if start_preconditioning_step is None
            else start_preconditioning_step,
            grafting=grafting, grafting_beta2=grafting_beta2, grafting_eps=grafting_eps)
        algorithm = StatisticsFirst(KroneckerStatistics(), InverseRootScaling(), refresh_method="eigh",
                                    sort_on_refresh=False)
        super().__init__(params, config, algorithm, **options)


class Muon(PreconditionedOptimizer):
    """Muon (Jordan et al. 2024): Nesterov momentum orthogonalized by ``ns_steps`` quintic
    Newton–Schulz iterations in ``ns_dtype``, scaled by ``0.2 sqrt(max(m, n))``
    (``update_scale="rms"``: AdamW's update RMS, so one ``lr`` serves matrices and vectors)
    or ``sqrt(max(1, m / n))`` (``"shape"``, the original), decoupled weight decay.

    Whole matrices by default (``max_preconditioner_dim=None``), each orthogonalized by its
    owner rank; vectors, and groups with ``"precondition": False`` (embeddings, heads), take
    AdamW with ``betas`` and ``eps``. Muon keeps no Kronecker factors, so ``max_factor_dim``
    (an identity side) does not apply and is refused.

    Example: ``Muon(model.parameters(), lr=1e-3)``
    """

    def __init__(self, params: Params, lr: float = 1e-3, *, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.01, ns_steps: int = 5,
                 ns_dtype: Literal["float32", "float64", "bfloat16", "float16"] | torch.dtype = "float32",
                 update_scale: Literal["rms", "shape"] = "rms", betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, **options: Unpack[EngineOptionsDict]) -> None:
        config = MuonConfig(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                            ns_steps=ns_steps, ns_dtype=ns_dtype, update_scale=update_scale, betas=betas, eps=eps)
        options.setdefault("max_preconditioner_dim", None)  # whole matrices: Newton–Schulz needs them
        options.setdefault("max_factor_dim", None)  # no factors: nothing to leave unpreconditioned
        super().__init__(params, config, Orthogonalized(), **options)


for _preset in (SOAP, KLSOAP, KLShampoo, EigenvalueCorrectedShampoo, Shampoo):
    _preset.__doc__ = (_preset.__doc__ or "") + options_help()
Muon.__doc__ = (Muon.__doc__ or "") + options_help(max_preconditioner_dim=None, max_factor_dim=None)


class ASGO(PreconditionedOptimizer):
    """ASGO, one-sided Shampoo (An et al., NeurIPS 2025): ``(V^{1/2} + eps I)^{-1} M`` on one
    side of each block, the identity on the other; no grafting.

    ``V = EMA(G G^T; betas[1])`` for the left side (``G^T G`` for the right; ``betas[1] = 1``
    accumulates, the theory's form), bias-corrected, with exact roots (``eigh``) every
    ``precondition_frequency`` steps from ``start_preconditioning_step``; ``M`` the
    bias-corrected gradient EMA (``betas[0]``); decoupled weight decay. ``side`` picks the
    preconditioned side of every matrix: ``"smaller"`` (default; rows on a tie), ``"left"``
    (rows) or ``"right"`` (columns). The other side is an identity side of the block plan, so
    it is never cut into blocks: a tall ``50000 x 1024`` embedding is one block with one
    ``1024 x 1024`` factor (equations: ``docs/algorithms.md``).

    ``lr=3e-3`` was the best of 3e-4 .. 1e-2 on the benchmarks' char-GPT
    (``benchmarks/asgo_vs_shampoo.py``).

    Example: ``ASGO(model.parameters(), lr=3e-3)``
    """

    def __init__(self, params: Params, lr: float = 3e-3, *, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, precondition_frequency: int = 10,
                 start_preconditioning_step: int = 1,
                 side: Literal["smaller", "left", "right"] = "smaller",
                 **options: Unpack[EngineOptionsDict]) -> None:
        if side not in ONE_SIDE_CHOICES:
            raise ValueError(f"side must be one of {ONE_SIDE_CHOICES}, got {side!r}")
        config = ASGOConfig(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            precondition_frequency=precondition_frequency,
                            start_preconditioning_step=start_preconditioning_step)
        super().__init__(params, config, OneSided(side), **options)


ASGO.__doc__ = (ASGO.__doc__ or "") + options_help()
__all__.append("ASGO")
