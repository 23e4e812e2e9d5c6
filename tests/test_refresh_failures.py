"""Refresh failures (issue 13, item 3): power / QR / eigh refreshes of a stack never raise and
never return NaN; a matrix that fails (also in float64) keeps its previous basis and is
reported in ``ok``, which the engine counts, warns about once, and raises on after
``max_consecutive_failures`` consecutive failures."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import lightning_precond as lp
from lightning_precond.algorithms.eigenbasis import (
    eigenvalue_staleness,
    eigh_descending,
    power_step,
    qr_algorithm,
    staleness,
)

D = 8  # 8 x 8 float32 matrices are 256 bytes: every matrix of a stack is equally aligned,
# so batched LAPACK / BLAS results do not depend on a matrix's position in the stack.
BAD = 1


def refresh(method: str, factor: torch.Tensor, basis: torch.Tensor, sort: bool = True):
    if method == "power":
        return power_step(factor, basis, sort)
    if method == "qr":
        return qr_algorithm(factor, basis, tolerance=1e-6, max_iterations=5, sort=sort)
    return eigh_descending(factor, basis)


def stack(k: int = 4, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Healthy factors and unconverged warm-start bases (random orthogonal)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, D, 3 * D, generator=gen, dtype=dtype)
    factor = g @ g.mT / (3 * D)
    basis = torch.linalg.qr(torch.randn(k, D, D, generator=gen, dtype=dtype)).Q
    return factor, basis


def corrupt(factor: torch.Tensor, kind: str) -> torch.Tensor:
    factor = factor.clone()
    if kind == "nan":
        factor[BAD] = float("nan")
    else:
        factor[BAD, 2, 3] = factor[BAD, 3, 2] = float("inf")
    return factor


def assert_failed_row_kept(result, basis: torch.Tensor, row: int) -> None:
    assert result.ok[row] is False
    assert torch.equal(result.basis[row], basis[row])
    assert torch.isfinite(result.eigenvalues[row]).all()
    if result.permutation is not None:
        assert result.permutation[row].tolist() == list(range(D))


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("method", ["power", "qr"])
def test_a_non_finite_factor_fails_alone_and_keeps_its_basis(method, kind, sort):
    factor, basis = stack()
    bad = corrupt(factor, kind)
    result = refresh(method, bad, basis, sort)
    healthy = [i for i in range(factor.shape[0]) if i != BAD]
    alone = refresh(method, factor[healthy], basis[healthy], sort)
    assert alone.ok == [True] * len(healthy)
    assert result.ok == [i != BAD for i in range(factor.shape[0])]
    # Healthy rows: bitwise what the same call gives them without the corrupted neighbour.
    assert torch.equal(result.basis[healthy], alone.basis)
    assert torch.equal(result.eigenvalues[healthy], alone.eigenvalues)
    if sort:
        assert torch.equal(result.permutation[healthy], alone.permutation)
        assert torch.equal(result.permutation.sort(-1).values, torch.arange(D).expand(4, D))
    else:
        assert result.permutation is None
    assert_failed_row_kept(result, basis, BAD)
    assert torch.isfinite(result.basis).all() and torch.isfinite(result.eigenvalues).all()
    assert result.iterations == alone.iterations  # the corrupted matrix never iterates


def test_a_non_finite_projection_is_infinitely_stale():
    """So the adaptive refresh picks a corrupted factor up (and counts its failure) instead
    of taking it for fresh (its staleness used to come out 0)."""
    factor, basis = stack()
    projected = basis.mT @ corrupt(factor, "nan") @ basis
    projected[2, 0, 0] = float("inf")
    stale = staleness(projected)
    assert torch.isinf(stale[[1, 2]]).all() and torch.isfinite(stale[[0, 3]]).all()
    assert staleness(torch.zeros(1, D, D)).item() == 0.0
    values = torch.diagonal(projected, dim1=-2, dim2=-1)
    assert torch.isinf(eigenvalue_staleness(torch.ones(4, D), values)[[1, 2]]).all()


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_eigh_of_a_non_finite_factor_keeps_the_basis_with_finite_eigenvalues(kind):
    factor, basis = stack()
    result = eigh_descending(corrupt(factor, kind), basis)
    assert result.ok == [i != BAD for i in range(4)]
    assert torch.equal(result.basis[BAD], basis[BAD])
    assert torch.isfinite(result.basis).all() and torch.isfinite(result.eigenvalues).all()


def test_failed_rows_report_the_finite_rayleigh_quotients_of_the_kept_basis(monkeypatch):
    """A finite factor whose refresh fails everywhere: the estimates are diag(Q^T A Q)."""
    factor, basis = stack()
    real = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", _as_qr_result(lambda a: tuple(t * float("nan") for t in real(a))))
    result = power_step(factor, basis, sort=True)
    assert result.ok == [False] * 4
    assert torch.equal(result.basis, basis)
    expected = (basis.double() * (factor.double() @ basis.double())).sum(-2).float()
    torch.testing.assert_close(result.eigenvalues, expected)


@pytest.mark.parametrize("error", [torch.linalg.LinAlgError, RuntimeError])
@pytest.mark.parametrize("method", ["power", "qr"])
def test_a_raising_batched_qr_falls_back_matrix_by_matrix(monkeypatch, method, error):
    factor, basis = stack()
    expected = refresh(method, factor, basis)
    real = torch.linalg.qr
    calls = []

    def raise_on_batches(a, *args, **kwargs):
        calls.append(a.dim())
        if a.dim() == 3:
            raise error("simulated LAPACK failure on the batch")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", raise_on_batches)
    result = refresh(method, factor, basis)
    assert 3 in calls and 2 in calls  # the batch raised, then one call per matrix
    assert result.ok == [True] * 4
    assert result.basis.dtype == torch.float32 and result.eigenvalues.dtype == torch.float32
    torch.testing.assert_close(result.basis, expected.basis, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.eigenvalues, expected.eigenvalues, rtol=1e-4, atol=1e-5)
    assert torch.equal(result.permutation, expected.permutation)


@pytest.mark.parametrize("method", ["power", "qr"])
def test_a_qr_that_always_raises_keeps_every_basis(monkeypatch, method):
    factor, basis = stack()

    def always(a, *args, **kwargs):
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(torch.linalg, "qr", always)
    result = refresh(method, factor, basis)
    assert result.ok == [False] * 4
    assert torch.equal(result.basis, basis)
    assert torch.isfinite(result.eigenvalues).all()
    assert result.permutation.tolist() == [list(range(D))] * 4


@pytest.mark.parametrize("method", ["power", "qr"])
def test_a_non_finite_float32_result_is_redone_in_float64(monkeypatch, method):
    factor, basis = stack()
    expected = refresh(method, factor, basis)
    real = torch.linalg.qr
    dtypes = []

    def nan_once(a, *args, **kwargs):
        dtypes.append(a.dtype)
        q, r = real(a, *args, **kwargs)
        return (q * float("nan"), r) if len(dtypes) == 1 else (q, r)

    monkeypatch.setattr(torch.linalg, "qr", _as_qr_result(nan_once))
    result = refresh(method, factor, basis)
    assert dtypes[0] == torch.float32 and torch.float64 in dtypes
    assert result.ok == [True] * 4
    assert torch.isfinite(result.basis).all()
    torch.testing.assert_close(result.basis, expected.basis, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.eigenvalues, expected.eigenvalues, rtol=1e-4, atol=1e-5)


def _as_qr_result(fn):
    """Wrap a ``(Q, R)``-returning function so that ``.Q`` works like torch's result."""
    def wrapped(a, *args, **kwargs):
        return torch.return_types.linalg_qr(fn(a, *args, **kwargs))
    return wrapped


# -- end to end ---------------------------------------------------------------------------

def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(32, 6, generator=gen), torch.randn(32, 4, generator=gen)


def train_step(model, opt, x, y) -> None:
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # SOAP's own refresh: power, periodic; max_consecutive_failures defaults to 3
        dict(refresh_method="qr", max_consecutive_failures=2),
        dict(refresh_method="eigh"),
        # Adaptive: a non-finite factor is infinitely stale, so it is refreshed (with QR) and fails.
        dict(refresh="adaptive", refresh_check_interval=1),
    ],
)
def test_a_corrupted_factor_is_counted_warned_once_and_then_raises(options):
    model, x, y = model_and_batch()
    opt = lp.SOAP(model.parameters(), lr=1e-2, precondition_frequency=1, **options)
    limit = options.get("max_consecutive_failures", 3)
    train_step(model, opt, x, y)  # builds the factors and the first (eigh) basis
    bucket = opt._buckets[0]
    block = bucket.blocks[0]
    bucket.state.factors.factor_left[0] = float("nan")
    name = next(s.param_name for s in opt.preconditioner_stats() if s.block_id == block.id)

    def failures() -> dict[tuple[str, str], int]:
        return {(s.block_id, s.side): s.failure_count for s in opt.preconditioner_stats()}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for attempt in range(1, limit):
            train_step(model, opt, x, y)
            counts = failures()
            assert counts.pop((block.id, "left")) == attempt
            assert set(counts.values()) == {0}
            assert all(torch.isfinite(p).all() for p in model.parameters())
            for b in opt._buckets:
                for field, tensor in b.tensors().items():
                    if b is bucket and field == "factor_left":
                        tensor = tensor[1:]
                    assert torch.isfinite(tensor).all(), field
        with pytest.raises(RuntimeError, match=re.escape(f"{name} block {block.id} (left factor)")):
            train_step(model, opt, x, y)
    refresh_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning)
                        and "failed" in str(w.message)]
    assert len(refresh_warnings) == (1 if limit > 1 else 0)
    assert f"{name} block {block.id}" in str(refresh_warnings[0].message)
