"""Eigenbasis refresh: staleness, the warm-started QR algorithm, and adaptive refresh."""

from __future__ import annotations

import pytest
import torch

from lightning_precond.algorithms.eigenbasis import (eigh_descending, power_step, qr_algorithm, staleness,
                                                     staleness_from_product)
from lightning_precond.registry import ALGORITHMS, names

# The optimizer-level tests run with every algorithm that has eigenbases (each at its defaults
# but for the settings given).
WITH_BASIS = names(has_basis=True)


def known_spectrum(n: int, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = V diag(lam) V^T with lam = 1, 1/2, 1/4, ... (well separated) and random V."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype)).Q
    lam = 2.0 ** -torch.arange(n, dtype=dtype)
    return v @ torch.diag(lam) @ v.T, v, lam


def test_staleness_is_zero_for_the_exact_basis_and_one_half_for_a_known_case():
    a, v, _ = known_spectrum(6)
    assert staleness((v.T @ a @ v)[None]).item() <= 1e-12
    b = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    assert staleness(b).item() == pytest.approx(2**0.5 / 2)


def _drifted(d: int, noise: float, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-deficient factor with a spread spectrum and the exact basis of a drifted copy."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(3, d, d // 2, generator=gen) * torch.logspace(0, -4, d // 2)
    a = g @ g.mT
    _, basis = torch.linalg.eigh(a)
    n = torch.randn(3, d, d, generator=gen)
    drifted = a + noise * (n @ n.mT) * a.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] / d
    return drifted.to(dtype), basis.to(dtype)


@pytest.mark.parametrize("d", [64, 512])
@pytest.mark.parametrize("noise", [0.01, 0.05, 0.2, 1.0])
def test_staleness_from_the_product_alone_matches_the_formed_projection(d, noise):
    # float32, as the optimizers run: the one-product check agrees with Q^T A Q's to 2e-4
    # absolute wherever it decides (staleness above its floor, near 5e-4 at d = 1024).
    a, basis = _drifted(d, noise)
    product = a @ basis
    exact = staleness(basis.mT @ product)
    assert exact.min() > 2e-3
    torch.testing.assert_close(staleness_from_product(product, basis), exact, atol=2e-4, rtol=2e-2)
    # and exactly for an orthogonal basis in float64
    a64, basis64 = a.double(), torch.linalg.qr(basis.double()).Q
    torch.testing.assert_close(staleness_from_product(a64 @ basis64, basis64), staleness(basis64.mT @ a64 @ basis64),
                               atol=1e-10, rtol=1e-8)


def test_staleness_from_the_product_of_a_corrupted_factor_is_infinite_and_of_zero_is_zero():
    a, basis = _drifted(16, 0.1)
    a[1, 0, 0] = float("nan")
    a[2] = 0.0
    value = staleness_from_product(a @ basis, basis)
    assert value[0] > 0 and torch.isinf(value[1]) and value[2] == 0


@pytest.mark.parametrize("method", ["power", "qr"])
def test_a_refresh_started_from_the_checks_product_equals_one_that_forms_it(method):
    a, basis = _drifted(32, 0.2, dtype=torch.float64)
    run = {"power": lambda p: power_step(a, basis, sort=True, shift=True, product=p),
           "qr": lambda p: qr_algorithm(a, basis, 1e-6, 20, sort=True, product=p)}[method]
    given, formed = run(a @ basis), run(None)
    torch.testing.assert_close(given.basis, formed.basis, atol=1e-9, rtol=0)
    torch.testing.assert_close(given.eigenvalues, formed.eigenvalues, atol=1e-12, rtol=1e-9)
    assert torch.equal(given.permutation, formed.permutation)


def test_warm_started_qr_reaches_tolerance_and_eigh_eigenvalues():
    a, v, lam = known_spectrum(8)
    gen = torch.Generator().manual_seed(1)
    # A warm start: the true basis rotated a little.
    skew = torch.randn(8, 8, generator=gen, dtype=torch.float64) * 0.05
    start = v @ torch.linalg.matrix_exp(skew - skew.T)
    assert staleness((start.T @ a @ start)[None]).item() > 1e-3
    result = qr_algorithm(a[None], start[None], tolerance=1e-8, max_iterations=200, sort=True)
    basis = result.basis[0]
    assert staleness((basis.T @ a @ basis)[None]).item() <= 1e-8
    exact = eigh_descending(a[None], start[None])
    torch.testing.assert_close(result.eigenvalues[0], exact.eigenvalues[0], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(result.eigenvalues[0], lam, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(basis.T @ basis, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert result.iterations >= 1


def test_power_step_sorts_and_improves_the_basis():
    a, v, _ = known_spectrum(6, seed=2)
    start = v[:, torch.tensor([3, 1, 0, 2, 5, 4])] + 0.01
    start = torch.linalg.qr(start).Q
    result = power_step(a[None], start[None], sort=True)
    assert result.permutation is not None
    assert result.permutation[0].tolist() == [2, 1, 3, 0, 5, 4]
    before = staleness((start.T @ a @ start)[None]).item()
    after = staleness((result.basis[0].T @ a @ result.basis[0])[None]).item()
    assert after < before


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(512, 16, generator=gen)
    y = torch.sin(x[:, :8] * 2) + 0.1 * torch.randn(512, 8, generator=gen)
    return model, x, y


def fit(model, opt, x, y, steps: int) -> float:
    for i in range(steps):
        batch = slice((i * 64) % 512, (i * 64) % 512 + 64)
        opt.zero_grad()
        loss = ((model(x[batch]) - y[batch]) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((model(x) - y) ** 2).mean().item()


@pytest.mark.parametrize("name", WITH_BASIS)
def test_staleness_is_zero_after_eigh_and_grows_as_statistics_drift(name):
    model, x, y = model_and_data()
    opt = ALGORITHMS[name].optimizer(model.parameters(), precondition_frequency=10**6,
                                     preconditioner_dtype=torch.float64)
    fit(model, opt, x, y, 2)
    opt.refresh_eigenbasis(method="eigh")
    fresh = opt.preconditioner_stats()
    assert max(s.staleness for s in fresh) <= 1e-6
    assert all(s.steps_since_refresh == 0 for s in fresh)
    fit(model, opt, x, y, 30)
    drifted = opt.preconditioner_stats()
    assert min(s.staleness for s in drifted) > 1e-3
    assert all(s.steps_since_refresh == 30 for s in drifted)


@pytest.mark.parametrize("name", WITH_BASIS)
def test_refresh_eigenbasis_selects_stale_factors_and_named_blocks(name):
    model, x, y = model_and_data()
    opt = ALGORITHMS[name].optimizer(model.parameters(), precondition_frequency=10**6, max_qr_iterations=50,
                                     preconditioner_dtype=torch.float64)
    fit(model, opt, x, y, 20)
    # block 0.0's first factor (its left one; a one-sided algorithm, ASGO, has one per block)
    target = next((s.block_id, s.side) for s in opt.preconditioner_stats() if s.block_id == "0.0")
    refreshed = opt.refresh_eigenbasis(select=[target], method="eigh")
    assert [(r.block_id, r.side) for r in refreshed] == [target]
    stats = {(s.block_id, s.side): s for s in opt.preconditioner_stats()}
    assert stats[target].staleness <= 1e-6
    # the others are untouched: the same block's other side, or (one-sided) another block's
    other = ("0.0", "right") if ("0.0", "right") in stats and target != ("0.0", "right") else next(
        key for key in stats if key != target)
    assert stats[other].staleness > 1e-3
    stale = opt.refresh_eigenbasis(select="stale", tolerance=0.01)
    assert target not in {(r.block_id, r.side) for r in stale}
    assert all(s.staleness <= 0.01 for s in opt.preconditioner_stats())


# The loss the adaptive refresh may cost, as a ratio to the periodic run's final loss: 1%,
# except ASGO, measured at 1.3% here (0.4302 vs 0.4247, with 10 refreshes instead of 80:
# its eigh refresh makes a checked factor exact, so few come due). The bound states that
# known cost, so the test still fails if it grows. (EC-Shampoo's 4%, measured when the
# adaptive refresh ran the QR algorithm instead of each recipe's own method, is now -1.6%.)
ADAPTIVE_LOSS_BOUND = {"ASGO": 1.02}


@pytest.mark.parametrize("name", WITH_BASIS)
def test_adaptive_refresh_uses_fewer_refreshes_at_the_same_loss(name):
    cls = ALGORITHMS[name].optimizer
    model_fixed, x, y = model_and_data()
    fixed = cls(model_fixed.parameters(), lr=3e-3, precondition_frequency=5)
    loss_fixed = fit(model_fixed, fixed, x, y, 200)

    model_adaptive, _, _ = model_and_data()
    adaptive = cls(model_adaptive.parameters(), lr=3e-3, precondition_frequency=5,
                   refresh="adaptive", refresh_tolerance=0.1, refresh_check_interval=5)
    loss_adaptive = fit(model_adaptive, adaptive, x, y, 200)

    count = lambda opt: sum(s.refresh_count for s in opt.preconditioner_stats())  # noqa: E731
    assert count(adaptive) < count(fixed)
    # A bound on what skipping refreshes may cost: the adaptive run must not end more than 1%
    # worse (SOAP ends about 1% better here).
    assert loss_adaptive <= ADAPTIVE_LOSS_BOUND.get(name, 1.01) * loss_fixed


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(method="lanczos"), "method"),
        (dict(tolerance=0.0), "tolerance"),
        (dict(tolerance=2.0), "tolerance"),
        (dict(select="some"), "select"),
        (dict(select=["9.9"]), "unknown block"),
        (dict(select=[("0.0", "middle")]), "side"),
    ],
)
@pytest.mark.parametrize("algorithm", WITH_BASIS)
def test_refresh_eigenbasis_rejects_bad_input(algorithm, kwargs, name):
    model, x, y = model_and_data()
    opt = ALGORITHMS[algorithm].optimizer(model.parameters())
    fit(model, opt, x, y, 2)
    with pytest.raises(ValueError, match=name):
        opt.refresh_eigenbasis(**kwargs)


@pytest.mark.parametrize("name", WITH_BASIS)
def test_an_attached_owner_stops_the_optimizers_own_refresh(name):
    model, x, y = model_and_data()
    opt = ALGORITHMS[name].optimizer(model.parameters(), precondition_frequency=2)
    owner = object()
    opt.attach_refresh_owner(owner)
    fit(model, opt, x, y, 9)
    # only the initial eigh (Shampoo: its roots before the first preconditioned step)
    assert all(s.refresh_count == 1 for s in opt.preconditioner_stats())
    with pytest.raises(RuntimeError, match="already owned"):
        opt.attach_refresh_owner(object())
    opt.detach_refresh_owner(owner)
    fit(model, opt, x, y, 2)
    assert all(s.refresh_count == 2 for s in opt.preconditioner_stats())


def test_eigh_of_a_nearly_zero_rank_deficient_factor_is_finite():
    """Dead-ReLU layers give factors around 1e-9 with half their rows zero (the deep
    autoencoder's decoder): the basis must come out finite and orthogonal."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(250, 30, generator=gen) * 6e-5
    g[::2] = 0.0
    factor = (0.05 * g @ g.T)[None]
    result = eigh_descending(factor, torch.eye(250)[None])
    assert result.ok == [True]
    assert torch.isfinite(result.basis).all() and torch.isfinite(result.eigenvalues).all()
    eye = torch.eye(250)
    assert torch.allclose(result.basis[0].T @ result.basis[0], eye, atol=1e-4)


def test_non_finite_eigh_output_is_redone_or_counted(monkeypatch):
    real = torch.linalg.eigh

    def nan_in_float32(a, *args, **kwargs):
        values, vectors = real(a, *args, **kwargs)
        return (values, vectors * float("nan")) if a.dtype == torch.float32 else (values, vectors)

    monkeypatch.setattr(torch.linalg, "eigh", nan_in_float32)
    a, v, lam = known_spectrum(5, dtype=torch.float32)
    result = eigh_descending(a[None], torch.eye(5)[None])  # float64 redo succeeds
    assert result.ok == [True] and torch.isfinite(result.basis).all()
    torch.testing.assert_close(result.eigenvalues[0], lam, rtol=1e-4, atol=1e-6)

    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *args, **kwargs: tuple(t * float("nan") for t in real(a)))
    previous = torch.eye(5)[None]
    result = eigh_descending(a[None], previous)
    assert result.ok == [False] and torch.equal(result.basis, previous)


def test_eigh_of_factors_with_exactly_zero_rows_converges_in_float32(monkeypatch):
    """Rows of a block that never had a gradient (an embedding's unused tokens) are exactly
    zero in its factor; LAPACK's float32 eigh does not converge on such matrices (measured:
    8 of 10 of these 256 x 256 factors with 10 nonzero rows raise). The zero rows are separated
    first, so the batched float32 call succeeds (no float64 redo), and the result is exact."""
    real, wide_calls = torch.linalg.eigh, []

    def counting(a, *args, **kwargs):
        if a.dtype == torch.float64:
            wide_calls.append(a.shape)
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    factors = []
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        g = torch.zeros(256, 64)
        g[torch.randperm(256, generator=gen)[:10]] = torch.randn(10, 64, generator=gen) * 1e-3
        factors.append(0.05 * g @ g.T)
    factor = torch.stack(factors)
    result = eigh_descending(factor, torch.eye(256).expand(4, 256, 256).clone())
    assert result.ok == [True] * 4 and wide_calls == []
    q, lam = result.basis, result.eigenvalues
    scale = factor.abs().amax()
    torch.testing.assert_close(q @ torch.diag_embed(lam) @ q.mT, factor, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(q.mT @ q, torch.eye(256).expand(4, 256, 256), rtol=0, atol=1e-5)
    # descending, up to float32 LAPACK's eigenvalue accuracy (~ d eps ||A|| = 1.5e-5 ||A|| at d = 256):
    # the 246 null directions come back as +-1e-12 noise in either order (2e-7 ||A|| apart on
    # an AVX-512 machine, where a 1e-6 tolerance was 4% too tight)
    assert (lam[:, :-1] >= lam[:, 1:] - 1e-5 * scale).all()
    assert lam[:, 10:].abs().max() <= 1e-5 * scale  # the zero rows' directions: eigenvalue 0, last


def test_shifted_power_step_keeps_the_null_space_columns():
    """A converged basis of a rank-deficient float32 factor (its null-space columns any
    orthonormal set, as eigh leaves them): the shifted step keeps every column, the
    null-space ones included, where the plain qr(A Q) completes them from rounding noise
    (measured here: overlaps 0.10 to 0.73 with the old null-space columns, all 1.0 shifted)."""
    gen = torch.Generator().manual_seed(3)
    d, rank = 12, 4
    g = torch.randn(d, rank, generator=gen)
    a = g @ g.T  # rank 4
    vectors = torch.linalg.eigh(a.double()).eigenvectors.flip(-1)
    spin = torch.linalg.qr(torch.randn(d - rank, d - rank, generator=gen, dtype=torch.float64)).Q
    start = torch.cat([vectors[:, :rank], vectors[:, rank:] @ spin], dim=1).float()
    shifted = power_step(a[None], start[None], sort=True, shift=True)
    kept = (start[:, shifted.permutation[0]] * shifted.basis[0]).sum(0).abs()
    assert kept.min() > 0.99, kept
