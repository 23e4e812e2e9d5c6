"""Batched eigenbasis computations for stacks of symmetric factors ``[k, d, d]``.

Three ways to (re)compute a basis, all batched over same-shaped blocks:

* ``eigh``  -- exact, via ``torch.linalg.eigh``.
* ``power`` -- SOAP's single warm-started power-iteration step ``Q <- qr(A Q).Q``, optionally
  shifted: ``Q <- qr((A + c max|diag(Q^T A Q)| I) Q).Q``, ``c = max(1e-8, min(4 d eps, 1/8))``
  (:func:`power_shift`).
* ``qr``    -- the warm-started QR algorithm: ``B = Q^T A Q``; repeat ``B = R_k Q_k`` with
  ``(Q_k, R_k) = qr(B)`` and ``Q <- Q Q_k`` until ``staleness(B) <= tolerance``.

Eigenvalues are always returned in descending order of the basis columns.

All three share one failure contract. The stack is computed batched; a matrix whose basis
or eigenvalue estimates come out non-finite, or every matrix when the batched LAPACK call
raises, is redone in float64, matrix by matrix. A matrix that fails there too (always the
case for a non-finite factor) is reported ``ok[i] = False`` and keeps the previous basis,
with finite eigenvalue estimates (its Rayleigh quotients in that basis where finite, else 0)
and the identity permutation. Nothing raises and no NaN is returned. The healthy path costs
one batched ``isfinite`` check (one host sync) per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BasisResult",
    "REFRESH_METHODS",
    "eigh_descending",
    "power_shift",
    "power_step",
    "qr_algorithm",
    "rayleigh_diagonal",
    "staleness",
    "staleness_from_product",
    "eigenvalue_staleness",
]

REFRESH_METHODS = ("eigh", "qr", "power")

# What a failing LAPACK call raises (LinAlgError is a RuntimeError; both named for clarity).
_LAPACK_ERRORS = (torch.linalg.LinAlgError, RuntimeError)


@dataclass
class BasisResult:
    """New bases for a stack of factors.

    ``ok[i]`` is False where the computation failed; such entries hold the old basis.
    ``permutation`` (``[k, d]`` or None) maps new column j to old column ``permutation[j]``
    for state indexed by eigen-direction (SOAP's second moment, KL's eigenvalues).
    """

    basis: Tensor
    eigenvalues: Tensor
    ok: list[bool]
    permutation: Tensor | None = None
    iterations: int = 0


def rayleigh_diagonal(factor: Tensor, basis: Tensor) -> Tensor:
    """``diag(Q^T A Q)`` for a stack, without forming the full product."""
    return (basis * (factor @ basis)).sum(dim=-2)


def staleness(projected: Tensor) -> Tensor:
    """``||B - diag(B)||_F / ||B||_F`` per matrix of a stack ``B = Q^T A Q``.

    A non-finite ``B`` (a corrupted factor) is infinitely stale: it is due for a refresh,
    whose failure is then counted, instead of passing for fresh.
    """
    return torch.nan_to_num(_staleness(projected), nan=float("inf"), posinf=float("inf"))


def _staleness(projected: Tensor) -> Tensor:
    """:func:`staleness`, NaN for a non-finite ``B`` (the QR algorithm's convergence test:
    ``NaN > tolerance`` is False, so such a matrix never iterates)."""
    total = torch.linalg.matrix_norm(projected)
    # The off-diagonal norm is formed directly: ||B||^2 - ||diag B||^2 cancels catastrophically.
    off = torch.linalg.matrix_norm(projected - torch.diag_embed(torch.diagonal(projected, dim1=-2, dim2=-1)))
    # total >= 0, so this is "total > 0 ? off / total : 0" for a finite B; NaN propagates.
    return torch.where(total == 0, 0.0, off / total.clamp_min(torch.finfo(total.dtype).tiny))


# Below this tolerance :func:`staleness_from_product` is too close to its rounding floor to
# decide; the check then forms ``Q^T A Q`` (see there).
PRODUCT_CHECK_MIN_TOLERANCE = 1e-2


def staleness_from_product(product: Tensor, basis: Tensor) -> Tensor:
    """:func:`staleness` of ``Q^T A Q`` from ``P = A Q`` alone: one ``d^3`` product, not two.

    Column ``i`` of ``Q^T A Q`` is ``Q^T P e_i``, whose norm is ``||P e_i||`` for an orthogonal
    ``Q``, so ``||offdiag||^2 = sum_i ||P e_i||^2 - (q_i . P e_i)^2``. The sums run in float64;
    what is left is ``P``'s own rounding and ``Q``'s distance from orthogonality, a floor near
    ``5e-4`` for float32 1024-wide factors (measured against the formed product: the two agree
    to 1e-4 from staleness 2e-3 up). Hence :data:`PRODUCT_CHECK_MIN_TOLERANCE`. ``P`` is
    also the power step's input, which is why the adaptive refresh checks this way.
    """
    wide = product.to(torch.float64)
    diagonal = (basis.to(torch.float64) * wide).sum(dim=-2)
    total = wide.square().sum(dim=(-2, -1))
    off = (total - diagonal.square().sum(dim=-1)).clamp_min(0.0)
    ratio = torch.where(total == 0, 0.0, (off / total.clamp_min(torch.finfo(total.dtype).tiny)).sqrt())
    return torch.nan_to_num(ratio, nan=float("inf"), posinf=float("inf")).to(product.dtype)


def eigenvalue_staleness(in_use: Tensor, current: Tensor) -> Tensor:
    """Relative change ``||lambda_used - diag(B)|| / ||diag(B)||`` per factor (inf where
    either is not finite)."""
    scale = torch.linalg.vector_norm(current, dim=-1)
    change = torch.linalg.vector_norm(in_use - current, dim=-1)
    ratio = torch.where(scale == 0, 0.0, change / scale.clamp_min(torch.finfo(scale.dtype).tiny))
    return torch.nan_to_num(ratio, nan=float("inf"), posinf=float("inf"))


def _non_finite_rows(basis: Tensor, values: Tensor) -> list[int]:
    """Indices of the matrices of a stack whose basis or eigenvalue estimates are not finite."""
    finite = torch.isfinite(values).all(-1) & torch.isfinite(basis).flatten(1).all(-1)
    return [i for i, good in enumerate(finite.tolist()) if not good]


def _finite_or_zero(values: Tensor) -> Tensor:
    return torch.where(torch.isfinite(values), values, torch.zeros_like(values))


def _separate_zero_rows(normalized: Tensor) -> Tensor:
    """Give each exactly-zero row (and column) of a stack of normalized symmetric matrices a
    distinct negative diagonal placeholder in [-1, 0), in place; returns the placeholders
    ``[k, d]`` (0 on the other rows).

    A factor's row is exactly zero when that row of the block never had a gradient (an
    embedding's unused tokens, dead units). LAPACK's eigh does not converge on such matrices
    (measured: float32 fails on every 1024 x 1024 factor with ~10 nonzero rows, float64 on
    some). ``e_i`` is an eigenvector (eigenvalue 0) of a zero row ``i``; with distinct
    placeholders below the spectrum the problem is well separated, those vectors sort last,
    and :func:`_remove_placeholders` turns their eigenvalues back into Rayleigh quotients of
    the factor. Matrices without zero rows are unchanged bit for bit.
    """
    d = normalized.shape[-1]
    zero = (normalized == 0).all(dim=-1)  # [k, d]
    ladder = -(1.0 + torch.arange(d, dtype=normalized.dtype, device=normalized.device)) / d
    placeholders = torch.where(zero, ladder, torch.zeros((), dtype=normalized.dtype, device=normalized.device))
    diagonal = normalized.diagonal(dim1=-2, dim2=-1)
    diagonal.copy_(torch.where(zero, placeholders, diagonal))
    return placeholders


def _remove_placeholders(values: Tensor, vectors: Tensor, placeholders: Tensor) -> Tensor:
    """Eigenvalues of the factor from those of the matrix with placeholders: ``v^T A v =
    lambda' - sum_i p_i v_i^2`` per eigenvector column ``v`` (exact where ``p`` is 0)."""
    return values - (vectors.square() * placeholders.unsqueeze(-1).to(vectors.dtype)).sum(dim=-2).to(values.dtype)


def eigh_descending(factor: Tensor, previous: Tensor) -> BasisResult:
    """Exact eigendecomposition of a stack; a failed matrix keeps ``previous``.

    Each matrix is scaled by its largest entry first (factors of nearly-zero gradients
    reach 1e-9 and below, where float32 LAPACK has returned NaN without raising), and its
    exactly-zero rows are separated (:func:`_separate_zero_rows`). A matrix whose result is
    not finite, or whose batch raised, is redone in float64, matrix by matrix; one that
    fails there too is reported in ``ok``.
    """
    dtype, k = factor.dtype, factor.shape[0]
    scale = factor.abs().amax(dim=(-2, -1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    normalized = factor / scale[:, None, None]
    placeholders = _separate_zero_rows(normalized)
    try:
        values, vectors = torch.linalg.eigh(normalized)
        finite = torch.isfinite(values).all(-1) & torch.isfinite(vectors).flatten(1).all(-1)
        redo = [i for i, good in enumerate(finite.tolist()) if not good]
    except _LAPACK_ERRORS:
        values = torch.zeros(normalized.shape[:-1], dtype=dtype, device=factor.device)
        vectors = previous.flip(-1).clone()
        redo = list(range(k))
    ok = [True] * k
    if redo:
        index = torch.tensor(redo, device=factor.device)
        wide_values, wide_vectors, wide_ok = _eigh_float64(normalized[index], previous[index])
        values = values.index_copy(0, index, wide_values.to(dtype))
        vectors = vectors.index_copy(0, index, wide_vectors.to(dtype))
        for i, good in zip(redo, wide_ok):
            ok[i] = good
    values = _remove_placeholders(values, vectors, placeholders)
    values = values * scale[:, None]
    if not all(ok):
        # A failed matrix's Rayleigh quotients are NaN when its factor is (or its scale is).
        values = _finite_or_zero(values)
    return BasisResult(vectors.flip(-1).to(dtype), values.flip(-1).to(dtype), ok)


def _eigh_float64(factor: Tensor, previous: Tensor) -> tuple[Tensor, Tensor, list[bool]]:
    wide = factor.to(torch.float64)
    values = torch.zeros(wide.shape[:-1], dtype=torch.float64, device=wide.device)
    # Failed entries keep the previous basis; flipped here because the caller flips back.
    vectors = previous.to(torch.float64).flip(-1).clone()
    ok = []
    for i in range(wide.shape[0]):
        # A non-finite factor cannot succeed; it is not handed to LAPACK.
        good = bool(torch.isfinite(wide[i]).all())
        if good:
            try:
                matrix_values, matrix_vectors = torch.linalg.eigh(wide[i])
                good = bool(torch.isfinite(matrix_values).all() and torch.isfinite(matrix_vectors).all())
            except _LAPACK_ERRORS:
                good = False
        if good:
            values[i], vectors[i] = matrix_values, matrix_vectors
        else:
            values[i] = rayleigh_diagonal(wide[i], vectors[i])
        ok.append(good)
    return values, vectors, ok


# A refresh computation over a stack ``[k, d, d]`` or one matrix ``[d, d]``:
# (factor, basis, factor @ basis or None) -> (new basis, eigenvalue estimates, permutation or None,
# iterations).
_Compute = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor, Tensor | None, int]]


def _refresh_with_fallback(compute: _Compute, factor: Tensor, previous: Tensor, sort: bool,
                           product: Tensor | None = None) -> BasisResult:
    """``compute`` batched over the stack; failed matrices redone in float64 one by one.
    ``product``: ``factor @ previous`` when the caller has it (the batched pass reuses it)."""
    k = factor.shape[0]
    try:
        basis, values, order, iterations = compute(factor, previous, product)
        redo = _non_finite_rows(basis, values)
    except _LAPACK_ERRORS:
        basis = previous
        values = torch.zeros(previous.shape[:-1], dtype=previous.dtype, device=previous.device)
        order = _identity_order(previous) if sort else None
        iterations = 0
        redo = list(range(k))
    ok = [True] * k
    if not redo:
        return BasisResult(basis, values, ok, order, iterations)
    dtype = basis.dtype
    bases, estimates, orders = [], [], []
    for i in redo:
        wide_factor = factor[i].to(torch.float64)
        wide_previous = previous[i].to(torch.float64)
        # A non-finite factor cannot succeed; it is not handed to LAPACK.
        good = bool(torch.isfinite(wide_factor).all())
        if good:
            try:
                matrix_basis, matrix_values, matrix_order, matrix_iterations = compute(
                    wide_factor, wide_previous, None)
                matrix_basis, matrix_values = matrix_basis.to(dtype), matrix_values.to(dtype)
                good = bool(torch.isfinite(matrix_basis).all() and torch.isfinite(matrix_values).all())
                iterations = max(iterations, matrix_iterations)
            except _LAPACK_ERRORS:
                good = False
        if not good:
            matrix_basis = previous[i]
            matrix_values = _finite_or_zero(rayleigh_diagonal(wide_factor, wide_previous).to(dtype))
            matrix_order = _identity_order(previous[i]) if sort else None
        ok[i] = good
        bases.append(matrix_basis)
        estimates.append(matrix_values)
        orders.append(matrix_order)
    index = torch.tensor(redo, device=factor.device)
    basis = basis.index_copy(0, index, torch.stack(bases))
    values = values.index_copy(0, index, torch.stack(estimates))
    if order is not None:
        order = order.index_copy(0, index, torch.stack(orders))
    return BasisResult(basis, values, ok, order, iterations)


def _identity_order(basis: Tensor) -> Tensor:
    """The identity permutation, shaped like a (stack of) permutation(s) of ``basis``'s columns."""
    d = basis.shape[-1]
    return torch.arange(d, device=basis.device).expand(*basis.shape[:-2], d).clone()


# The shift's size in units of d * eps (HeavyBall 3.2 uses 64; see power_shift).
SHIFT_UNITS = 4


def power_shift(dim: int, dtype: torch.dtype) -> float:
    """The relative shift ``c = max(1e-8, min(4 d eps, 0.125))`` of the shifted power step
    (``eps`` of the factor's dtype): ``Q <- qr((A + c max|diag(Q^T A Q)| I) Q).Q``.

    ``qr(A Q)`` of a rank-deficient ``A`` completes the null space from rounding noise, so the
    refreshed columns there are arbitrary (issue 16 measured, on the deep autoencoder in
    float32, a median overlap of 0.25 between a refreshed column and the old column whose
    second moment it inherits; 0.99 shifted). The shift keeps those columns where they were
    and slows the rotation of the others by at most ``1 + c``.

    HeavyBall 3.2's ``get_orthogonal_matrix_QR`` takes ``64 d eps``; measured with SOAP
    (``docs/measurements/issue16_variants.py``, seeds 0 / 1, betas (0.9, 0.95)): unshifted
    char-GPT 2.082 / 2.113, 64: 2.095 / 2.149, 4: 2.091 / 2.123; deep autoencoder 64: 0.339 /
    0.347, 4: 0.338 / 0.349 -- the same gain on the rank-deficient factors, a third of the
    cost on the full-rank ones.
    """
    return max(1e-8, min(SHIFT_UNITS * dim * torch.finfo(dtype).eps, 0.125))


def _power(factor: Tensor, basis: Tensor, sort: bool, shift: bool = False,
           product: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, int]:
    if product is None:
        product = factor @ basis
    values = (basis * product).sum(dim=-2)
    if shift:
        magnitude = values.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
        lift = power_shift(factor.shape[-1], factor.dtype) * magnitude  # [k, 1]
        product = product + lift.unsqueeze(-1) * basis
    order = None
    if sort:
        order = torch.argsort(values, dim=-1, descending=True)
        product = product.gather(-1, order.unsqueeze(-2).expand_as(product))
        values = values.gather(-1, order)
    return torch.linalg.qr(product).Q, values, order, 1


def power_step(factor: Tensor, basis: Tensor, sort: bool, shift: bool = False,
               product: Tensor | None = None) -> BasisResult:
    """SOAP's refresh: optionally sort columns by ``diag(Q^T A Q)``, then ``Q <- qr(A Q).Q``
    (``shift``: ``Q <- qr((A + c max|diag(Q^T A Q)| I) Q).Q``, see :func:`power_shift`).

    One ``d^3`` product (``A Q``) serves the Rayleigh quotients, the sort (a column
    permutation commutes with it) and the QR input. The eigenvalue estimates returned are
    those Rayleigh quotients, i.e. measured in the basis being replaced. Failures follow the
    module's contract (float64 redo, else ``ok[i] = False`` and the previous basis).
    """
    result = _refresh_with_fallback(lambda a, q, p: _power(a, q, sort, shift, p), factor, basis, sort, product)
    result.iterations = 1
    return result


def _qr_iterations(
    factor: Tensor, basis: Tensor, tolerance: float, max_iterations: int, sort: bool,
    product: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    if product is None:
        product = factor @ basis
    order = None
    if sort:
        # A column permutation commutes with the product: A (Q P) = (A Q) P.
        order = torch.argsort((basis * product).sum(dim=-2), dim=-1, descending=True)
        index = order.unsqueeze(-2).expand_as(basis)
        basis, product = basis.gather(-1, index), product.gather(-1, index)
    projected = basis.mT @ product
    # Converged matrices stop iterating, so each factor's result does not depend on which
    # other factors share its batch (the same on every rank, at every world size). A
    # non-finite matrix has NaN staleness: it never iterates and is caught by the caller.
    active = _staleness(projected) > tolerance
    iterations = 0
    for _ in range(max_iterations):
        if not bool(active.any()):
            break
        q, r = torch.linalg.qr(projected)
        signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        q = q * signs.unsqueeze(-2)
        r = r * signs.unsqueeze(-1)
        keep = active[..., None, None]  # [k, 1, 1], or [1, 1] for a single matrix
        projected = torch.where(keep, r @ q, projected)
        basis = torch.where(keep, basis @ q, basis)
        active = active & (_staleness(projected) > tolerance)
        iterations += 1
    values = torch.diagonal(projected, dim1=-2, dim2=-1).clone()
    return basis, values, order, iterations


def qr_algorithm(
    factor: Tensor, basis: Tensor, tolerance: float, max_iterations: int, sort: bool,
    product: Tensor | None = None,
) -> BasisResult:
    """Warm-started (unshifted) QR algorithm, iterated on each matrix of the stack until its
    ``staleness <= tolerance`` or ``max_iterations`` is reached.

    The convergence test is one host sync per iteration; refreshes are amortized work.
    ``R_k``'s diagonal is made positive so columns keep their sign from step to step.
    Failures follow the module's contract (float64 redo, else ``ok[i] = False`` and the
    previous basis).
    """
    return _refresh_with_fallback(
        lambda a, q, p: _qr_iterations(a, q, tolerance, max_iterations, sort, p), factor, basis, sort, product
    )
