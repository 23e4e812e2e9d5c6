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
from .algorithms.kronecker import (
    BasisFirst,
    EigenbasisConfig,
    EigenvalueCorrected,
    KLConfig,
    ShampooConfig,
    StatisticsFirst,
)
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

    ``reference=True``: nikhilvyas/SOAP ``soap.py``'s equations: the refresh sorts the columns
    by ``diag(Q^T A Q)`` (``V`` permuted with them, ``M`` re-expressed) and takes
    ``Q <- qr(A Q)``; tested against a float64 transcription, relative error 9e-9 over 40
    steps. Its defaults are ``betas=(0.95, 0.95)``. Outside the blocks the modes agree:
    vectors take AdamW (the reference's unpreconditioned Adam decays after the update, a
    difference of ``lr^2 wd`` per step), and dims above ``max_factor_dim`` get an identity
    side as the reference's ``max_precond_dim`` does.

    The default mode differs by measurement (``docs/measurements/issue16_variants.py``: the
    convergence benchmark's settings at one lr, final eval loss, seeds 0 / 1; deep
    autoencoder 80 steps at lr 3e-3, char-GPT 200 steps at lr 1e-2):

    * ``shifted_refresh`` (None: on unless ``reference=True``): ``Q <- qr((A + c
      max|diag(Q^T A Q)| I) Q)``, ``c = max(1e-8, min(4 d eps, 1/8))``
      (:func:`~lightning_precond.algorithms.eigenbasis.power_shift`). Autoencoder, whose
      factors are rank-deficient (dead ReLUs): 0.394 / 0.428 unshifted -> 0.349 / 0.353
      shifted (betas (0.95, 0.95), HeavyBall's 64 d eps), and 0.357 / 0.365 -> 0.338 / 0.349
      (betas (0.9, 0.95), 4 d eps); char-GPT (full-rank factors): 2.082 / 2.113 -> 2.091 /
      2.123 (4 d eps; HeavyBall's 64 d eps: 2.095 / 2.149, hence the smaller shift).
      Carrying ``V`` over by squared overlaps (HeavyBall's ``heavy``) instead of the
      permutation was worse: char-GPT 2.155 / 2.216, autoencoder 0.380 (seed 0; unshifted).
    * ``betas=(0.9, 0.95)``, not the reference's (0.95, 0.95): unshifted, autoencoder 0.394 /
      0.428 -> 0.357 / 0.365 and char-GPT 2.204 / 2.141 -> 2.082 / 2.113; shifted (64 d eps),
      autoencoder 0.349 / 0.353 -> 0.339 / 0.347 and char-GPT 2.240 / 2.200 -> 2.095 / 2.149.

    Example::

        def configure_optimizers(self):
            return SOAP(self.parameters(), lr=3e-3)
    """

    def __init__(self, params: Params, lr: float = 3e-3, *, betas: tuple[float, float] = (0.9, 0.95),
                 shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, reference: bool = False, shifted_refresh: bool | None = None,
                 matmul_dtype: Literal["bfloat16", "float16", "float32", "tf32"] | torch.dtype | None = None,
                 **options: Unpack[EngineOptionsDict]) -> None:
        config = EigenbasisConfig(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                  weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                                  reference=reference, shifted_refresh=shifted_refresh,
                                  matmul_dtype=matmul_dtype)
        algorithm = BasisFirst(KroneckerStatistics(), AdamInBasisScaling(), refresh_method="power",
                               sort_on_refresh=True, decay_after_update=True)
        super().__init__(params, config, algorithm, **options)


class KLSOAP(PreconditionedOptimizer):
    """KL-SOAP (Lin et al. 2025): SOAP's Adam in the eigenbasis over KL-Shampoo's two-sided
    factors and EMA eigenvalues (their options as :class:`KLShampoo`'s, except
    ``shampoo_beta``: default None, i.e. ``betas[1]``).

    ``reference=True``: yorkerlin/KL-Methods ``optim/kl_opt.py`` with ``using_klsoap=True``:
    ``V`` and ``M`` in the basis with NO bias correction, refresh ``Q <- qr(S Q)`` with no sort
    (``V`` stays, ``M`` re-expressed), KL-Shampoo's reference statistics (see
    :class:`KLShampoo`), decay after the update, betas (0.9, 0.98) (also our default). Tested
    against a float64 transcription: relative error 4e-9 over 40 steps (before issue 16 this
    optimizer, with bias correction and sorting, differed from it by 2.4e-1).

    The default mode keeps SOAP's bias-corrected step size and sorted refresh, with the
    shifted refresh, debiased statistics and gradient-scale initialization of
    :class:`KLShampoo`. Measured (``docs/measurements/issue16_variants.py``, deep
    autoencoder, 80 steps, lr 3e-3, seeds 0 / 1): reference 0.334 / 0.369, default 0.335 / 0.347
    (shifted with 64 d eps); ``shampoo_beta=0.9`` (KL-Shampoo's default) was not better here
    (0.338, seed 0), so KL-SOAP keeps ``betas[1]``.

    Example: ``KLSOAP(model.parameters(), lr=3e-3)``
    """

    def __init__(self, params: Params, lr: float = 3e-3, *, betas: tuple[float, float] = (0.9, 0.98),
                 shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, reference: bool = False, shifted_refresh: bool | None = None,
                 debias: bool | None = None, init_factor: float | Literal["gradient"] | None = None,
                 max_clamp_value: float | None = 4000.0,
                 matmul_dtype: Literal["bfloat16", "float16", "float32", "tf32"] | torch.dtype | None = None,
                 **options: Unpack[EngineOptionsDict]) -> None:
        config = KLConfig(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                          precondition_frequency=precondition_frequency, reference=reference,
                          shifted_refresh=shifted_refresh, debias=debias, init_factor=init_factor,
                          max_clamp_value=max_clamp_value, matmul_dtype=matmul_dtype)
        algorithm = BasisFirst(TwoSidedStatistics(), AdamInBasisScaling(reference_bias_correction=False),
                               refresh_method="power", sort_on_refresh=True, decay_after_update=True,
                               reference_sort=False, config_type=KLConfig)
        super().__init__(params, config, algorithm, **options)


class KLShampoo(PreconditionedOptimizer):
    """KL-Shampoo (Lin et al. 2025): two-sided Kronecker estimation with EMA eigenvalues.

    ``betas = (momentum, the reference's factor EMA)``; the direction is ``Q_a [(Q_a^T M Q_b) /
    (sqrt(lambda_a lambda_b^T) + eps)] Q_b^T`` with ``M`` the gradient EMA (no bias correction)
    and bases refreshed by a QR step every ``precondition_frequency`` steps. No grafting and
    no second moment. The statistics' options: ``shampoo_beta`` (the factor and eigenvalue
    EMA, default 0.9; None: ``betas[1]``, the reference's default) and, where None means the
    default mode's choice or the reference's with ``reference=True``: ``debias`` (None: True; the EMAs use
    ``beta_t = 1 - (1 - beta) / (1 - beta^(t+1))`` after ``t`` updates), ``init_factor``
    (None: ``"gradient"``, the first gradient's RMS on both sides; the reference's constant
    0.1), ``max_clamp_value`` (the clamp ``lambda^{-1/2} <= max(10, min(d, max_clamp_value))``,
    4000 as the reference; None: none) and ``shifted_refresh`` (as :class:`SOAP`'s).

    ``reference=True``: yorkerlin/KL-Methods ``optim/kl_opt.py``'s equations (its defaults:
    ``shampoo_beta=None``, i.e. ``betas[1]`` = 0.98): eigenvalues from the constant 0.1,
    plain EMAs, the clamped values stored (the floor feeds the next step) with its clamp
    order, ``Q <- qr(S Q)``, decay after the update. Tested against a float64 transcription:
    relative error 7e-16 over 40 steps (and on a run through the clamp).

    The default mode differs by measurement (``docs/measurements/issue16_variants.py``, lr
    1e-2 on the char-GPT (200 steps), 3e-3 on the deep autoencoder (80 steps), seeds 0 / 1;
    AdamW reaches 2.47 and 0.403 there): the reference sits on its eigenvalue floor
    ``0.1 * 0.98^t`` (issue 16): char-GPT 2.461 / 2.468, autoencoder 0.655 / 0.654; debiased
    statistics + gradient-scale initialization + shifted refresh (64 d eps) at the
    reference's 0.98: char-GPT 2.108 / 2.123; with ``shampoo_beta`` 0.9: char-GPT 2.057 /
    2.050, autoencoder 0.361 / 0.358; with the 4 d eps shift (the default): char-GPT 2.053 /
    2.036, autoencoder 0.361 / 0.362. The parts were measured together, not one by one (issue
    16 reports the gradient-scale initialization alone at 2.40 on the char-GPT). Weight decay
    precedes the update (AdamW's order; the reference's differs by ``lr^2 wd U``, not
    measured).

    Example: ``KLShampoo(model.parameters(), lr=3e-3)``
    """

    def __init__(self, params: Params, lr: float = 3e-3, *, betas: tuple[float, float] = (0.9, 0.98),
                 shampoo_beta: float | None = 0.9, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, reference: bool = False, shifted_refresh: bool | None = None,
                 debias: bool | None = None, init_factor: float | Literal["gradient"] | None = None,
                 max_clamp_value: float | None = 4000.0,
                 matmul_dtype: Literal["bfloat16", "float16", "float32", "tf32"] | torch.dtype | None = None,
                 **options: Unpack[EngineOptionsDict]) -> None:
        config = KLConfig(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                          precondition_frequency=precondition_frequency, reference=reference,
                          shifted_refresh=shifted_refresh, debias=debias, init_factor=init_factor,
                          max_clamp_value=max_clamp_value, matmul_dtype=matmul_dtype)
        algorithm = BasisFirst(TwoSidedStatistics(), KLEigenvalueScaling(), refresh_method="power",
                               sort_on_refresh=False, reference_decay_after=True, config_type=KLConfig)
        super().__init__(params, config, algorithm, **options)


class EigenvalueCorrectedShampoo(PreconditionedOptimizer):
    """Eigenvalue-corrected Shampoo (George et al. 2018; Eschenhagen et al. 2025).

    Shampoo's eigenbasis with the Kronecker eigenvalues replaced by a bias-corrected EMA of
    ``(Q_L^T G Q_R)^2`` (``betas[1]``); no grafting. Bases are recomputed exactly (``eigh``)
    every ``precondition_frequency`` steps unless ``refresh_method`` / ``refresh`` say otherwise.

    ``reference=True``: the "Purifying Shampoo" equations as Meta's ``distributed_shampoo``
    computes them (its eigenvalue-corrected preconditioner, no grafting): every step updates
    the factors, recomputes the basis when due (the first at update ``precondition_frequency``;
    the identity before, so the first steps are Adam), updates the corrections in that basis,
    then ``U = Q_L [(Q_L^T M_hat Q_R) / (sqrt(D_hat) + eps)] Q_R^T``, decay before the update.
    Tested against a float64 transcription: relative error 7e-15 over 40 steps. The default
    mode instead builds an exact basis from the first gradient (no update on that call),
    forms the direction before the basis changes, and puts ``eps`` inside the root,
    ``sqrt(D_hat + eps)`` (the defaults predate issue 16; the difference between the two
    modes was not measured on the benchmark tasks within its budget).
    ``shifted_refresh`` applies when ``refresh_method="power"``.

    Example: ``EigenvalueCorrectedShampoo(model.parameters(), lr=1e-3)``
    """

    def __init__(self, params: Params, lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 shampoo_beta: float | None = None, eps: float = 1e-12, weight_decay: float = 0.0,
                 precondition_frequency: int = 10, reference: bool = False, shifted_refresh: bool | None = None,
                 matmul_dtype: Literal["bfloat16", "float16", "float32", "tf32"] | torch.dtype | None = None,
                 **options: Unpack[EngineOptionsDict]) -> None:
        config = EigenbasisConfig(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                  weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                                  reference=reference, shifted_refresh=shifted_refresh,
                                  matmul_dtype=matmul_dtype)
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

    ``reference=True``: Meta's ``distributed_shampoo`` with Adam grafting: the factors are
    bias-corrected when the roots are taken, ``(L / (1 - beta2^t) + eps I)^{-p}`` (kept as a
    debiased EMA, so ``betas[1] = 1`` is unchanged), and roots are recomputed at
    ``start_preconditioning_step`` and then at the multiples of ``precondition_frequency``
    (the default mode: every ``precondition_frequency`` steps counted from the start; the same
    when the start is a multiple of it, as by default). Tested against a float64 transcription
    of its equations: relative error 2e-15 over 30 steps (start 6, frequency 4; the default
    mode differs from it there by 1e-2, through the schedule). Not supported: ``momentum`` and
    ``weight_decay`` both > 0 (the reference adds the decay to the direction before its
    momentum). Not measured on the benchmark tasks: with grafting, the bias correction acts
    only through ``epsilon``'s weight.

    Example: ``Shampoo(model.parameters(), lr=1e-3, precondition_frequency=20)``
    """

    def __init__(self, params: Params, lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 epsilon: float = 1e-12, weight_decay: float = 0.0, momentum: float = 0.0,
                 nesterov: bool = False, exponent: float = 0.25, precondition_frequency: int = 10,
                 start_preconditioning_step: int | None = None,
                 grafting: Literal["adam", "adagrad", "rmsprop", "sgd"] | None = "adam",
                 grafting_beta2: float | None = None, grafting_eps: float = 1e-8, reference: bool = False,
                 matmul_dtype: Literal["bfloat16", "float16", "float32", "tf32"] | torch.dtype | None = None,
                 **options: Unpack[EngineOptionsDict]) -> None:
        config = ShampooConfig(
            matmul_dtype=matmul_dtype,
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

    ``update_scale=None`` means ``"rms"``, or ``"shape"`` with ``reference=True``: KellerJordan's
    ``muon.py`` equations (``B <- lerp(B, G, 1 - mu)``, Nesterov ``lerp(G, B, mu)``, the quintic
    on ``X / (||X||_F + 1e-7)``, scale ``sqrt(max(1, m / n))``, decay before the update);
    tested against a float64 transcription, relative error 6e-16 over 40 steps. The reference
    computes Newton–Schulz in bfloat16: pass ``ns_dtype="bfloat16"`` for that too. The
    default mode's ``"rms"`` scale is ``0.2 sqrt(max(m, n)) / sqrt(max(1, m / n))`` times the
    reference's, i.e. a per-shape learning-rate rescaling (not a change of direction) that
    lets one ``lr`` serve matrices and AdamW vectors; it is a convention, not a measured gain.

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


# Every factored preset (not Muon, whose products are its Newton-Schulz iterations: ns_dtype).
MATMUL_DTYPE_HELP = """

    ``matmul_dtype`` (per group; None: the state dtype): the per-step statistics products and
    the projections into and out of the eigenbasis run in ``"bfloat16"`` or ``"float16"``
    (operands scaled by powers of two to fit its range), results cast back to the state dtype
    before any EMA; eigendecompositions, QR and staleness stay in the state dtype; ``"tf32"``:
    float32 operands CUDA may take as TF32. See :mod:`lightning_precond.algorithms.precision`."""

for _preset in (SOAP, KLSOAP, KLShampoo, EigenvalueCorrectedShampoo, Shampoo):
    _preset.__doc__ = (_preset.__doc__ or "") + MATMUL_DTYPE_HELP + options_help()
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

    ``eigenvalues`` sets what scales the last root's basis between refreshes: ``"current"``
    (default) ``diag(Q^T V_t Q)``, this step's ``V`` (one ``d^3`` product per block and step),
    or ``"refresh"`` the eigenvalues of the last root, ``f - 1`` steps stale (the behaviour
    before). At a refresh, and at every step with ``precondition_frequency=1``, both are the
    paper's ``(V_hat_t^{1/2} + eps I)^{-1} M_hat``. A stale root does not dominate the new
    gradient (``V_t >= G_t G_t^T``, the paper's bound): where it is rank-deficient (the first
    root, ``G_1 G_1^T`` of rank <= the batch) or small, ``"refresh"`` multiplies the new
    gradient's component by up to ``1 / sqrt(d eps(float32))``. Measured
    (``docs/measurements/asgo_stale_roots.md``: the quality suite's tasks and schedule,
    ``precondition_frequency=10``, blocks of 256 on the autoencoder, seeds 0 / 1, each mode at
    its best lr of a ~3x ladder): MLP 0.701 -> 0.438 (best lr 1e-2 -> 1e-1), deep autoencoder
    0.662 -> 0.351 (1e-3 -> 3e-2; AdamW 0.371 at 3e-3), char-GPT 2.464 -> 2.418 (1e-2 -> 3e-2).
    With ``"refresh"`` steps 2-10 of the MLP had 18-2100x the spectral norm of step 1, and
    lrs above 1e-2 diverged.

    ``lr=3e-3`` was the best of 3e-4 .. 1e-2 on the benchmarks' char-GPT
    (``benchmarks/asgo_vs_shampoo.py``) with ``"refresh"``; with ``"current"`` the optimum
    was 3e-2 (char-GPT, autoencoder) to 1e-1 (MLP), 10-30x AdamW's, as the step's spectral
    norm is ~1 per unit lr (RMS ~0.01-0.03, Muon's ~0.15): sweep upwards from the default.

    There is no ``reference`` mode (no public implementation to reproduce; ``reference=True``
    is refused): the update is the paper's, with one guard, eigenvalues floored at
    ``d eps lambda_max`` so that float32 roots of an ill-conditioned ``V`` cannot blow a step up.

    Example: ``ASGO(model.parameters(), lr=3e-2)``
    """

    def __init__(self, params: Params, lr: float = 3e-3, *, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, precondition_frequency: int = 10,
                 start_preconditioning_step: int = 1,
                 side: Literal["smaller", "left", "right"] = "smaller",
                 eigenvalues: Literal["current", "refresh"] = "current",
                 matmul_dtype: Literal["bfloat16", "float16", "float32", "tf32"] | torch.dtype | None = None,
                 **options: Unpack[EngineOptionsDict]) -> None:
        if side not in ONE_SIDE_CHOICES:
            raise ValueError(f"side must be one of {ONE_SIDE_CHOICES}, got {side!r}")
        config = ASGOConfig(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            precondition_frequency=precondition_frequency,
                            start_preconditioning_step=start_preconditioning_step,
                            matmul_dtype=matmul_dtype)
        # Checked by OneSided (ValueError naming EIGENVALUE_MODES).
        super().__init__(params, config, OneSided(side, eigenvalues), **options)


ASGO.__doc__ = (ASGO.__doc__ or "") + MATMUL_DTYPE_HELP + options_help()
__all__.append("ASGO")
