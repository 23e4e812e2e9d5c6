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

from .base import (
    Direction,
    FactoredConfig,
    GroupConfig,
    StepContext,
    check_beta,
    check_betas,
    check_bool,
    check_nonnegative,
    check_positive_int,
    debiased_beta,
)
from .eigenbasis import eigh_descending, power_step, qr_algorithm
from .grafting import GRAFTING_METHODS
from .scaling import Scaling
from .precision import matmul_dtype_of
from .statistics import SIDES, GradientProjections, KroneckerFactors, KroneckerStatistics, kl_inverse

__all__ = ["EigenbasisConfig", "KLConfig", "ShampooConfig", "KroneckerState", "BasisFirst", "StatisticsFirst",
           "EigenvalueCorrected"]


@dataclass(frozen=True, kw_only=True)
class EigenbasisConfig(FactoredConfig):
    """Per-group hyperparameters of SOAP, KL-SOAP, KL-Shampoo and eigenvalue-corrected Shampoo."""

    betas: tuple[float, float]
    shampoo_beta: float | None
    eps: float
    precondition_frequency: int
    # The power refresh is shifted (eigenbasis.power_shift); None: yes unless reference=True.
    shifted_refresh: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonnegative(self.eps, "eps")
        check_betas(self.betas)
        if self.shampoo_beta is not None:
            check_beta(self.shampoo_beta, "shampoo_beta")
        check_positive_int(self.precondition_frequency, "precondition_frequency")
        check_bool(self.shifted_refresh, "shifted_refresh", optional=True)
        if self.reference and self.shifted_refresh:
            raise ValueError("shifted_refresh=True is not the reference's refresh (plain qr(A Q)); with "
                             "reference=True pass shifted_refresh=None or False")

    @property
    def shift(self) -> bool:
        """Whether the power refresh is shifted."""
        return (not self.reference) if self.shifted_refresh is None else self.shifted_refresh

    @property
    def factor_beta(self) -> float:
        """The factors' EMA coefficient: ``shampoo_beta``, else ``betas[1]``."""
        return float(self.betas[1] if self.shampoo_beta is None else self.shampoo_beta)

    def vector_adamw(self) -> tuple[float, float, float]:
        return float(self.betas[0]), float(self.betas[1]), float(self.eps)


INIT_FROM_GRADIENT = "gradient"


@dataclass(frozen=True, kw_only=True)
class KLConfig(EigenbasisConfig):
    """Per-group hyperparameters of KL-Shampoo and KL-SOAP: :class:`EigenbasisConfig` and the
    two-sided statistics' options (None: the default mode's choice, or the reference's when
    ``reference=True``)."""

    # Debiased factor and eigenvalue EMAs, beta_t = 1 - (1 - beta) / (1 - beta^(t+1)) with
    # t updates since the first gradient. None: True, False when reference=True.
    debias: bool | None = None
    # The eigenvalue estimates' initial value: a constant (the reference's c0 = 0.1), or
    # "gradient" (the first gradient's RMS, per block). None: "gradient", 0.1 when reference.
    init_factor: float | str | None = None
    # The clamp lambda^{-1/2} <= max(10, min(d, max_clamp_value)); None: no clamp.
    max_clamp_value: float | None = 4000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self.debias, "debias", optional=True)
        if self.reference and self.debias:
            raise ValueError("debias=True is not the reference's statistics (plain EMAs); with reference=True "
                             "pass debias=None or False")
        factor = self.init_factor
        if isinstance(factor, str):
            if factor != INIT_FROM_GRADIENT:
                raise ValueError(f"init_factor must be a float > 0, {INIT_FROM_GRADIENT!r} or None, got {factor!r}")
            if self.reference:
                raise ValueError(f"init_factor={INIT_FROM_GRADIENT!r} is not the reference's initialization (a "
                                 "constant, 0.1); with reference=True pass a float or None")
        elif factor is not None:
            check_nonnegative(factor, "init_factor")
            if factor == 0:
                raise ValueError(f"init_factor must be a float > 0, {INIT_FROM_GRADIENT!r} or None, got {factor!r}")
        if self.max_clamp_value is not None:
            check_nonnegative(self.max_clamp_value, "max_clamp_value")
            if self.max_clamp_value == 0:
                raise ValueError(f"max_clamp_value must be a float > 0 or None, got {self.max_clamp_value!r}")

    @property
    def debiased(self) -> bool:
        return (not self.reference) if self.debias is None else self.debias

    @property
    def initial_eigenvalue(self) -> float | str:
        if self.init_factor is None:
            return 0.1 if self.reference else INIT_FROM_GRADIENT
        return self.init_factor

    def factor_beta_at(self, samples: int) -> float:
        """The factors' and eigenvalues' EMA coefficient for the ``samples``-th gradient they
        absorb (the first gradient, which builds them, is sample 1)."""
        beta = self.factor_beta
        return debiased_beta(beta, samples) if self.debiased else beta

    def inverse(self, eigenvalues: Tensor) -> Tensor:
        """``1 / lambda`` under this group's clamp (the reference's operation order when
        ``reference=True``)."""
        return kl_inverse(eigenvalues, self.max_clamp_value, reference=self.reference)


@dataclass(frozen=True, kw_only=True)
class ShampooConfig(FactoredConfig):
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
        if self.reference and self.momentum > 0 and self.weight_decay > 0:
            raise ValueError("reference=True with momentum > 0 and weight_decay > 0 is not supported: "
                             "distributed_shampoo adds the decay to the direction before its momentum")

    @property
    def factor_beta(self) -> float:
        return float(self.betas[1])

    def factor_beta_at(self, step: int) -> float:
        """The factors' EMA coefficient at update ``step``: with ``reference=True`` the factors
        are kept bias-corrected, ``L / (1 - beta2^t)``, as distributed_shampoo takes its roots."""
        beta = self.factor_beta
        return debiased_beta(beta, step) if self.reference else beta

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
        reference_sort: bool | None = None,
        reference_decay_after: bool | None = None,
        config_type: type[GroupConfig] | None = None,
    ) -> None:
        if config_type is not None:
            self.config_type = config_type
        self.statistics = statistics
        self.scaling = scaling
        self.refresh_method = refresh_method
        # SOAP: reorder columns by diag(Q^T A Q) before a power / QR refresh.
        self.sort_on_refresh = sort_on_refresh
        self.decay_after_update = decay_after_update
        # The named reference's choices where they differ (reference=True groups).
        self.reference_sort = sort_on_refresh if reference_sort is None else reference_sort
        self.reference_decay_after = decay_after_update if reference_decay_after is None else reference_decay_after
        self.gradient_headroom = statistics.headroom

    def decays_after_update(self, config: Any) -> bool:
        return self.reference_decay_after if config.reference else self.decay_after_update

    def sorts(self, config: Any) -> bool:
        if config is None:
            return self.sort_on_refresh
        return self.reference_sort if config.reference else self.sort_on_refresh

    def refresh_due(self, step: int, config: Any) -> bool:
        return (step - self.refresh_start(config)) % config.precondition_frequency == 0

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
                max_iterations: int, config: Any = None, product: Tensor | None = None) -> list[bool]:
        """Recompute ``side``'s basis of every block in ``state``; failed blocks keep theirs.
        ``config``: the group's (its refresh options); None: the default mode's. ``product``:
        :meth:`basis_and_product`'s when the caller has it (the power and QR methods start from it)."""
        factors = state.factors
        factor, old = factors.factor(side), factors.basis(side)
        assert factor is not None and old is not None, f"the {side} side is an identity side: nothing to refresh"
        sort = self.sorts(config)
        if method == "eigh":
            result = eigh_descending(factor, old)
        elif method == "power":
            shift = bool(getattr(config, "shift", False)) if config is not None else False
            result = power_step(factor, old, sort, shift, product)
        else:
            result = qr_algorithm(factor, old, tolerance, max_iterations, sort, product)
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

    def basis_and_product(self, state: KroneckerState, side: str) -> tuple[Tensor, Tensor]:
        basis = state.factors.basis(side)
        return basis, state.factors.factor(side) @ basis

    def eigenvalues_in_use(self, state: KroneckerState, side: str) -> Tensor:
        return state.factors.eigenvalues(side)


class BasisFirst(KroneckerAlgorithm):
    """First gradient: factors and an exact basis, no update. Then direction, statistics, refresh."""

    def step(self, state: KroneckerState, grads: Tensor, ctx: StepContext) -> Direction | None:
        config = ctx.config
        # The first gradient is sample 1 of the factors' EMA, the gradient of update t sample t + 1.
        beta_at = getattr(config, "factor_beta_at", None)
        if ctx.first:
            beta = beta_at(1) if beta_at is not None else config.factor_beta
            self.statistics.initialize_from(state.factors, grads, beta, config)
            ctx.refresh_all("eigh")
            return None
        # One set of projections for both parts: the bases do not change between them.
        projections = GradientProjections(state.factors, grads, matmul_dtype_of(config))
        update, step_size = self.scaling.direction(state.factors, state.moments, grads, ctx.step, config,
                                                   projections=projections)
        beta = beta_at(ctx.step + 1) if beta_at is not None else config.factor_beta
        self.statistics.update(state.factors, grads, beta, config, projections=projections)
        ctx.refresh_if_due()
        return Direction(update, step_size)


class EigenvalueCorrected(BasisFirst):
    """Eigenvalue-corrected Shampoo: :class:`BasisFirst`, or with ``reference=True`` the order
    of distributed_shampoo's eigenvalue-corrected preconditioner ("Purifying Shampoo"): every
    call updates the factors, recomputes the basis when due (first at update
    ``precondition_frequency``; identity before), then updates the corrected eigenvalues in
    that basis and forms the direction."""

    def refresh_start(self, config: Any) -> int:
        return int(config.precondition_frequency) if config.reference else 0

    def step(self, state: KroneckerState, grads: Tensor, ctx: StepContext) -> Direction | None:
        if not ctx.config.reference:
            return super().step(state, grads, ctx)
        self.statistics.update(state.factors, grads, ctx.config.factor_beta, ctx.config)
        ctx.refresh_if_due()
        update, step_size = self.scaling.direction(state.factors, state.moments, grads, ctx.step, ctx.config)
        return Direction(update, step_size)


class StatisticsFirst(KroneckerAlgorithm):
    """Shampoo's order: statistics, then roots when due, then the direction from this step's G."""

    config_type = ShampooConfig

    def refresh_start(self, config: Any) -> int:
        return int(config.start_preconditioning_step)

    def refresh_due(self, step: int, config: Any) -> bool:
        start, every = self.refresh_start(config), config.precondition_frequency
        if config.reference:  # distributed_shampoo: at the start, then at the multiples of the frequency
            return step == start or step % every == 0
        return (step - start) % every == 0

    def step(self, state: KroneckerState, grads: Tensor, ctx: StepContext) -> Direction | None:
        self.statistics.update(state.factors, grads, ctx.config.factor_beta_at(ctx.step), ctx.config)
        ctx.refresh_if_due()
        update, step_size = self.scaling.direction(state.factors, state.moments, grads, ctx.step, ctx.config)
        return Direction(update, step_size)
