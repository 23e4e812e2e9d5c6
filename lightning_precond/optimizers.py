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

from .algorithms.kronecker import BasisFirst, EigenbasisConfig, EigenvalueCorrected, KLConfig, ShampooConfig, StatisticsFirst
from .algorithms.muon import MuonConfig, Orthogonalized
from .algorithms.scaling import AdamInBasisScaling, EigenvalueCorrectedScaling, InverseRootScaling, KLEigenvalueScaling
from .algorithms.statistics import KroneckerStatistics, TwoSidedStatistics
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
                 precondition_frequency: int = 10, reference: bool = False, shifted_refresh: bool | None = None,
                 **options: Unpack[EngineOptionsDict]) -> None:
        config = EigenbasisConfig(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                  weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                                  reference=reference, shifted_refresh=shifted_refresh)
        algorithm = BasisFirst(KroneckerStatistics(), AdamInBasisScaling(), refresh_method="power",
                               sort_on_refresh=True, decay_after_update=True)
        super().__init__(params, config, algorithm, **options)


class KLSOAP(PreconditionedOptimizer):
    """KL-SOAP (Lin et al. 2025): SOAP's Adam in the eigenbasis over KL-Shampoo's two-sided
    factors and EMA eigenvalues.

    Example: ``KLSOAP(model.parameters(), lr=3e-3)``
    """

    def __init__(self, params: Params, lr: float = 3e-3, *, betas: tuple[float, float] = (0.9, 0.98),
                 shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, reference: bool = False, shifted_refresh: bool | None = None,
                 debias: bool | None = None, init_factor: float | Literal["gradient"] | None = None,
                 max_clamp_value: float | None = 4000.0, **options: Unpack[EngineOptionsDict]) -> None:
        config = KLConfig(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                          precondition_frequency=precondition_frequency, reference=reference,
                          shifted_refresh=shifted_refresh, debias=debias, init_factor=init_factor,
                          max_clamp_value=max_clamp_value)
        algorithm = BasisFirst(TwoSidedStatistics(), AdamInBasisScaling(reference_bias_correction=False),
                               refresh_method="power", sort_on_refresh=True, decay_after_update=True,
                               reference_sort=False, config_type=KLConfig)
        super().__init__(params, config, algorithm, **options)


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
                 precondition_frequency: int = 10, reference: bool = False, shifted_refresh: bool | None = None,
                 debias: bool | None = None, init_factor: float | Literal["gradient"] | None = None,
                 max_clamp_value: float | None = 4000.0, **options: Unpack[EngineOptionsDict]) -> None:
        config = KLConfig(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                          precondition_frequency=precondition_frequency, reference=reference,
                          shifted_refresh=shifted_refresh, debias=debias, init_factor=init_factor,
                          max_clamp_value=max_clamp_value)
        algorithm = BasisFirst(TwoSidedStatistics(), KLEigenvalueScaling(), refresh_method="power",
                               sort_on_refresh=False, reference_decay_after=True, config_type=KLConfig)
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
                 precondition_frequency: int = 10, reference: bool = False, shifted_refresh: bool | None = None,
                 **options: Unpack[EngineOptionsDict]) -> None:
        config = EigenbasisConfig(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                  weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                                  reference=reference, shifted_refresh=shifted_refresh)
        algorithm = EigenvalueCorrected(KroneckerStatistics(), EigenvalueCorrectedScaling(), refresh_method="eigh",
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
                 grafting_beta2: float | None = None, grafting_eps: float = 1e-8, reference: bool = False,
                 **options: Unpack[EngineOptionsDict]) -> None:
        config = ShampooConfig(
            lr=lr, betas=betas, eps=epsilon, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            exponent=exponent, precondition_frequency=precondition_frequency,
            start_preconditioning_step=precondition_frequency if start_preconditioning_step is None
            else start_preconditioning_step,
            grafting=grafting, grafting_beta2=grafting_beta2, grafting_eps=grafting_eps, reference=reference)
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
                 update_scale: Literal["rms", "shape"] | None = None, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, reference: bool = False, **options: Unpack[EngineOptionsDict]) -> None:
        config = MuonConfig(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                            ns_steps=ns_steps, ns_dtype=ns_dtype, update_scale=update_scale, betas=betas, eps=eps,
                            reference=reference)
        options.setdefault("max_preconditioner_dim", None)  # whole matrices: Newton–Schulz needs them
        options.setdefault("max_factor_dim", None)  # no factors: nothing to leave unpreconditioned
        super().__init__(params, config, Orthogonalized(), **options)


for _preset in (SOAP, KLSOAP, KLShampoo, EigenvalueCorrectedShampoo, Shampoo):
    _preset.__doc__ = (_preset.__doc__ or "") + options_help()
Muon.__doc__ = (Muon.__doc__ or "") + options_help(max_preconditioner_dim=None, max_factor_dim=None)
