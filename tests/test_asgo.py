"""ASGO (one-sided Shampoo) against its float64 dense reference, and its one-sided plan."""

from __future__ import annotations

import pytest
import torch

import lightning_precond as lp
from tests import references as ref
from tests.test_algorithms import assert_trajectory, run


def least_squares(rows: int, cols: int, seed: int = 0):
    """0.5 ||X W - Y||^2 / N with W rows x cols."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * max(rows, cols), rows, generator=gen, dtype=torch.float64)
    y = torch.randn(4 * max(rows, cols), cols, generator=gen, dtype=torch.float64)
    w0 = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.1

    def grad_fn(w: torch.Tensor) -> torch.Tensor:
        return x.T @ (x @ w - y) / x.shape[0]

    return w0, grad_fn


@pytest.mark.parametrize(("rows", "cols", "side", "betas", "start", "eps"), [
    (8, 8, "smaller", (0.9, 0.99), 1, 1e-8),
    (8, 8, "smaller", (0.9, 0.99), 2, 0.3),     # eps large enough to tell (V^1/2 + eps)^-1 from (V + eps)^-1/2
    (6, 10, "smaller", (0.9, 0.95), 1, 1e-8),   # left: the rows are the smaller side
    (10, 6, "smaller", (0.9, 0.95), 1, 1e-8),   # right
    (6, 10, "right", (0.8, 0.99), 3, 1e-8),     # forced side, momentum SGD until step 3
    # accumulated V (AdaGrad form), no momentum, on the larger side: V's first root has a
    # null space (rank 5 of 7), where eps alone sets the scale (a large eps keeps it tame)
    (7, 5, "left", (0.0, 1.0), 1, 1e-2),
])
def test_asgo_matches_dense_reference(rows, cols, side, betas, start, eps):
    """eigenvalues="refresh": the whole root (basis and eigenvalues) from the last refresh."""
    w0, grad_fn = least_squares(rows, cols, seed=rows + cols)
    steps, freq = 30, 4
    theirs = ref.asgo(w0, grad_fn, steps, lr=2e-2, b1=betas[0], b2=betas[1], eps=eps, wd=0.01, freq=freq,
                      start=start, side=side)
    ours = run(lambda p: lp.ASGO(p, lr=2e-2, betas=betas, eps=eps, weight_decay=0.01, precondition_frequency=freq,
                                 start_preconditioning_step=start, side=side, eigenvalues="refresh"),
               w0, grad_fn, steps)
    assert_trajectory(ours, theirs, 1e-6)


@pytest.mark.parametrize(("rows", "cols", "side", "betas", "start", "eps"), [
    (8, 8, "smaller", (0.9, 0.99), 1, 1e-8),
    (8, 8, "smaller", (0.9, 0.99), 2, 0.3),
    (6, 10, "smaller", (0.9, 0.95), 1, 1e-8),
    (10, 6, "smaller", (0.9, 0.95), 1, 1e-8),
    (6, 10, "right", (0.8, 0.99), 3, 1e-8),
    (6, 10, "left", (0.0, 1.0), 1, 1e-2),  # accumulated V; (the reference cases' 7 x 5 "left" has a
    # null space at the first root, where the basis, hence diag(Q^T V Q), is eigh's arbitrary choice)
])
def test_asgo_current_eigenvalues_match_dense_reference(rows, cols, side, betas, start, eps):
    """The default eigenvalues="current": the last root's basis, this step's diag(Q^T V Q)."""
    w0, grad_fn = least_squares(rows, cols, seed=rows + cols)
    steps, freq = 30, 4
    theirs = ref.asgo(w0, grad_fn, steps, lr=2e-2, b1=betas[0], b2=betas[1], eps=eps, wd=0.01, freq=freq,
                      start=start, side=side, eigenvalues="current")
    ours = run(lambda p: lp.ASGO(p, lr=2e-2, betas=betas, eps=eps, weight_decay=0.01, precondition_frequency=freq,
                                 start_preconditioning_step=start, side=side), w0, grad_fn, steps)
    assert_trajectory(ours, theirs, 1e-6)


@pytest.mark.parametrize("eigenvalues", ["current", "refresh"])
def test_with_a_root_every_step_both_modes_are_the_papers_update(eigenvalues):
    """precondition_frequency=1: (V_hat_t^{1/2} + eps I)^{-1} M_hat_t at every step, either mode."""
    w0, grad_fn = least_squares(6, 10, seed=3)
    theirs = ref.asgo(w0, grad_fn, 20, lr=2e-2, b1=0.9, b2=0.99, eps=1e-8, wd=0.0, freq=1)
    ours = run(lambda p: lp.ASGO(p, lr=2e-2, precondition_frequency=1, eigenvalues=eigenvalues),
               w0, grad_fn, 20)
    assert_trajectory(ours, theirs, 1e-6)


def _step_norms(eigenvalues: str | None, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    m, n = 16, 64
    param = torch.nn.Parameter(torch.zeros(m, n))
    kwargs = {} if eigenvalues is None else {"eigenvalues": eigenvalues}
    opt = lp.ASGO([param], lr=1.0, precondition_frequency=10, **kwargs)
    norms = []
    for t in range(6):
        before = param.detach().clone()
        if t == 0:  # rank 2, as a minibatch gradient below the layer's width: V_1 has a null space
            g = torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
        else:
            g = torch.randn(m, n, generator=gen)
        param.grad = g / g.norm()
        opt.step()
        norms.append(torch.linalg.matrix_norm(param.detach() - before, ord=2).item())
    return norms


@pytest.mark.parametrize("seed", [0, 1])
def test_a_stale_rank_deficient_root_does_not_blow_up_the_next_steps(seed):
    """The first root is V_1 = G_1 G_1^T, of rank 2 here (a batch below the width in training).
    Steps 2-6 reuse its basis (precondition_frequency=10); with its stale eigenvalues
    ("refresh") the new gradients' components in its null space were multiplied by
    1 / sqrt(16 eps(float32) lambda_max) ~ 1e3: steps of spectral norm 110-190 after a first
    of 1 (in MLP training: 18-2100x, which forced the lr 10x down). The default
    ("current") divides by this step's diag(Q^T V Q): steps stay ~1, as the paper's."""
    default = _step_norms(None, seed)
    assert default[0] == pytest.approx(1.0, rel=1e-3)
    assert max(default) < 1.5
    stale = _step_norms("refresh", seed)
    assert stale[0] == pytest.approx(1.0, rel=1e-3)
    assert min(stale[1:]) > 50.0


def test_eigenvalues_is_validated():
    with pytest.raises(ValueError, match=r"eigenvalues must be one of \('current', 'refresh'\)"):
        lp.ASGO([torch.nn.Parameter(torch.randn(3, 4))], eigenvalues="stale")


def _sides(opt: lp.PreconditionedOptimizer) -> dict[tuple[int, int], tuple[str, ...]]:
    return {b.blocks[0].shape: b.sides for b in opt._buckets}


@pytest.mark.parametrize(("side", "expected"), [
    ("smaller", {(10, 30): ("left",), (30, 10): ("right",), (12, 12): ("left",)}),
    ("left", {(10, 30): ("left",), (30, 10): ("left",), (12, 12): ("left",)}),
    ("right", {(10, 30): ("right",), (30, 10): ("right",), (12, 12): ("right",)}),
])
def test_side_picks_the_one_factor_of_every_matrix(side, expected):
    params = [torch.nn.Parameter(torch.randn(*s)) for s in ((10, 30), (30, 10), (12, 12))]
    opt = lp.ASGO(params, side=side)
    opt.refresh_eigenbasis()  # plans the blocks
    assert _sides(opt) == expected


def test_the_unpreconditioned_side_is_not_cut_into_blocks():
    """As any identity side (blocks.py): a 300 x 20 matrix with max_preconditioner_dim=16 is
    cut along its 20 preconditioned columns only."""
    opt = lp.ASGO([torch.nn.Parameter(torch.randn(300, 20))], max_preconditioner_dim=16)
    opt.refresh_eigenbasis()
    assert sorted(b.shape for bucket in opt._buckets for b in bucket.blocks) == [(300, 4), (300, 16)]


@pytest.mark.parametrize("side", ["both", "smallest", None, 1])
def test_side_is_validated(side):
    with pytest.raises(ValueError, match=r"side must be one of \('smaller', 'left', 'right'\)"):
        lp.ASGO([torch.nn.Parameter(torch.randn(3, 4))], side=side)


def test_asgo_state_is_one_factor_and_below_shampoo():
    """Per 64 x 256 block: Shampoo keeps both factors and bases (2 (64^2 + 256^2)) plus its
    moments; ASGO the smaller side's factor and basis (2 * 64^2) plus the momentum."""
    sizes = {}
    for name, factory in (("ASGO", lp.ASGO), ("Shampoo", lp.Shampoo)):
        param = torch.nn.Parameter(torch.randn(64, 256))
        opt = factory([param])
        param.grad = torch.randn(64, 256)
        opt.step()
        sizes[name] = opt.state_bytes()
    factor_and_basis = 2 * 64 * 64 * 4
    assert sizes["ASGO"] == factor_and_basis + 64 * 4 + 64 * 256 * 4 + 2 * 4
    assert sizes["ASGO"] < sizes["Shampoo"] / 5


def test_float32_roots_of_an_ill_conditioned_factor_do_not_blow_up_the_step():
    """A strong rank-one signal over weak full-rank noise: V's condition number passes what a
    float32 eigh resolves, its small eigenvalues come out as rounding noise (often 0), and
    without the accuracy floor 1 / (0 + eps) multiplied M's noise there (a step of ~1e6 lr).
    For a rank-one-dominated gradient the step's spectral norm is lr (the polar factor)."""
    gen = torch.Generator().manual_seed(0)
    width = 256
    u, v = torch.randn(width, 1, generator=gen), torch.randn(width, 1, generator=gen)
    param = torch.nn.Parameter(torch.zeros(width, width))
    opt = lp.ASGO([param], lr=1.0, precondition_frequency=2)
    for t in range(8):
        before = param.detach().clone()
        param.grad = (u @ v.T) * (1 + 0.1 * t) + 0.05 * torch.randn(width, width, generator=gen) / width**0.5
        opt.step()
    step_norm = torch.linalg.matrix_norm(param.detach() - before, ord=2).item()
    assert 0.5 < step_norm < 2.0


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"betas": (0.9, 1.5)}, r"betas\[1\]"), ({"betas": (1.0, 0.9)}, r"betas\[0\]"), ({"eps": -1.0}, "eps"),
    ({"precondition_frequency": 0}, "precondition_frequency"),
    ({"start_preconditioning_step": 0}, "start_preconditioning_step"), ({"lr": -1.0}, "lr"),
])
def test_bad_hyperparameters_raise_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lp.ASGO([torch.nn.Parameter(torch.randn(3, 4))], **kwargs)


def test_reference_mode_is_refused_for_asgo():
    w = torch.nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="reference=True is not available for ASGO"):
        lp.ASGO([{"params": [w], "reference": True}])
