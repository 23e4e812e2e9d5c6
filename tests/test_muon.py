"""Muon against the float64 reference ``tests/references.py::muon``.

Muon orthogonalizes the (Nesterov) momentum of every weight matrix with five quintic
Newton-Schulz iterations and steps along the result; vectors take AdamW. The reference
transcribes those equations with plain ``torch`` ops, so agreement is evidence, not an
echo. What is tested, and why:

- the reference itself: its Newton-Schulz output is the scalar quintic applied to the
  singular values (same singular vectors as U V^T, singular values in ~[0.7, 1.2]);
- float64 trajectories (tall and wide, Nesterov on/off, both update scales) to 1e-10;
  float32 (the default ``ns_dtype``) to 1e-4; bfloat16 ``ns_dtype`` to 5e-2;
- the first step is an orthogonalized gradient, even for an ill-conditioned gradient;
- conv weights are orthogonalized as ``out x (in * kh * kw)``; ``max_preconditioner_dim``
  orthogonalizes each block on its own;
- vectors, and groups with ``precondition: False``, follow ``torch.optim.AdamW``;
- invalid arguments raise a ValueError naming the argument.

Trajectory errors are measured relative to the distance the reference has travelled from
the start, ``||W - W_ref|| / ||W_ref - W_0||``, so that a small step cannot pass by hiding
behind a large initial weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import lightning_precond as lp
from tests import references as ref

GradFn = Callable[[Tensor], Tensor]


def least_squares(rows: int, cols: int, seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> tuple[Tensor, GradFn]:
    """0.5 ||X W - Y||^2 / N with W rows x cols: W0 and the gradient at any W."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * rows, rows, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(4 * rows, cols, generator=gen, dtype=torch.float64).to(dtype)
    w0 = (torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.1).to(dtype)

    def grad_fn(w: Tensor) -> Tensor:
        return x.T @ (x @ w - y) / x.shape[0]

    return w0, grad_fn


def run(make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
        w0: Tensor, grad_fn: GradFn, steps: int) -> list[Tensor]:
    """The weight after each step, gradients taken at the current weight."""
    param = torch.nn.Parameter(w0.clone())
    opt = make_optimizer([param])
    out = []
    for _ in range(steps):
        param.grad = grad_fn(param.detach().clone())
        opt.step()
        out.append(param.detach().clone())
    return out


def travel_error(w: Tensor, w_ref: Tensor, w0: Tensor) -> float:
    """||W - W_ref|| / ||W_ref - W0||, in float64."""
    w, w_ref, w0 = w.double(), w_ref.double(), w0.double()
    return (torch.linalg.norm(w - w_ref) / torch.linalg.norm(w_ref - w0)).item()


def assert_trajectory(ours: list[Tensor], theirs: list[Tensor], w0: Tensor, rtol: float) -> None:
    assert len(ours) == len(theirs)
    for t, (w, w_ref) in enumerate(zip(ours, theirs), start=1):
        assert torch.isfinite(w).all(), f"step {t}: non-finite weights"
        error = travel_error(w, w_ref, w0)
        assert error <= rtol, f"step {t}: relative error {error:.3e} > {rtol:.0e}"


def quintic(s: Tensor, steps: int = 5) -> Tensor:
    """The Newton-Schulz polynomial p(s) = a s + b s^3 + c s^5, iterated."""
    a, b, c = ref.NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def cosine(a: Tensor, b: Tensor) -> float:
    return (torch.sum(a * b) / (torch.linalg.norm(a) * torch.linalg.norm(b))).item()


TALL_AND_WIDE = [(12, 7), (7, 12)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is faster, and immune to stalls on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("shape", TALL_AND_WIDE + [(8, 8)])
def test_reference_newton_schulz_maps_singular_values_by_the_quintic(shape):
    """NS(G) = U p^5(S / ||S||) V^T: U V^T's singular vectors, singular values in ~[0.7, 1.2]."""
    gen = torch.Generator().manual_seed(1)
    g = 3.0 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    out = ref.newton_schulz(g)
    expected = u @ torch.diag(quintic(s / (torch.linalg.norm(s) + 1e-7))) @ vh
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    values = torch.linalg.svdvals(out)
    assert 0.65 <= values.min().item() and values.max().item() <= 1.2, values
    assert cosine(out, u @ vh) >= 0.95


# ------------------------------------------------------------------------ trajectories
@pytest.mark.parametrize("update_scale", ["rms", "shape"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", TALL_AND_WIDE)
def test_float64_trajectory_matches_reference(shape, nesterov, update_scale):
    w0, grad_fn = least_squares(*shape)
    kwargs = dict(lr=0.02, nesterov=nesterov, update_scale=update_scale)
    theirs = ref.muon(w0, grad_fn, 30, wd=0.01, **kwargs)
    ours = run(lambda p: lp.Muon(p, ns_dtype=torch.float64, weight_decay=0.01, **kwargs),
               w0, grad_fn, 30)
    assert_trajectory(ours, theirs, w0, 1e-10)


@pytest.mark.parametrize("shape", TALL_AND_WIDE)
def test_float32_default_matches_float64_reference(shape):
    """A float32 weight with the default ns_dtype (float32) stays within 1e-4 for 10 steps."""
    w0, grad_fn = least_squares(*shape)
    w0_32, grad_fn_32 = least_squares(*shape, dtype=torch.float32)
    theirs = ref.muon(w0, grad_fn, 10, lr=0.02, wd=0.01)
    ours = run(lambda p: lp.Muon(p, lr=0.02, weight_decay=0.01), w0_32, grad_fn_32, 10)
    assert all(w.dtype == torch.float32 for w in ours)
    assert_trajectory(ours, theirs, w0, 1e-4)


@pytest.mark.parametrize("shape", TALL_AND_WIDE)
def test_bfloat16_newton_schulz_stays_close_to_float64_reference(shape):
    w0, grad_fn = least_squares(*shape)
    w0_32, grad_fn_32 = least_squares(*shape, dtype=torch.float32)
    theirs = ref.muon(w0, grad_fn, 5, lr=0.02, wd=0.01)
    ours = run(lambda p: lp.Muon(p, lr=0.02, weight_decay=0.01, ns_dtype=torch.bfloat16),
               w0_32, grad_fn_32, 5)
    assert all(w.dtype == torch.float32 for w in ours)
    assert_trajectory(ours, theirs, w0, 5e-2)


# ------------------------------------------------------------------------- first step
def test_first_step_is_the_orthogonalized_gradient():
    """From zero state, an ill-conditioned G = U S V^T (cond 100) gives a step along -U V^T."""
    rows, cols, lr = 16, 10, 0.1
    gen = torch.Generator().manual_seed(2)
    u = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64)).Q
    s = torch.logspace(0, -2, cols, dtype=torch.float64)
    g = (u @ torch.diag(s) @ v.T).float()
    polar = (u @ v.T).float()
    assert cosine(-g, -polar) < 0.8  # the raw gradient is far from its polar factor

    param = torch.nn.Parameter(torch.randn(rows, cols, generator=gen))
    before = param.detach().clone()
    opt = lp.Muon([param], lr=lr, weight_decay=0.0)
    param.grad = g
    opt.step()
    step = param.detach() - before

    assert cosine(step, -polar) >= 0.95
    values = torch.linalg.svdvals(step)
    assert values.max() / values.min() <= 2.5, values
    # update_scale="rms": 0.2 sqrt(max(m, n)) makes the step's RMS about 0.2 lr, like AdamW's
    rms = torch.linalg.norm(step).item() / math.sqrt(rows * cols)
    assert 0.1 * lr <= rms <= 0.3 * lr, rms


# ------------------------------------------------------------------- shapes and blocks
def test_conv_weight_is_orthogonalized_as_out_by_in_times_kernel():
    """An (8, 3, 3, 3) conv weight follows the reference run on its 8 x 27 view."""
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64)
    targets = torch.randn(4, 8, 4, 4, generator=gen, dtype=torch.float64)
    w0 = torch.randn(8, 3, 3, 3, generator=gen, dtype=torch.float64) * 0.1

    def conv_grad(weight: Tensor) -> Tensor:
        weight = weight.detach().requires_grad_(True)
        loss = 0.5 * ((torch.nn.functional.conv2d(images, weight) - targets) ** 2).mean()
        return torch.autograd.grad(loss, weight)[0]

    theirs = ref.muon(w0.reshape(8, 27), lambda w: conv_grad(w.reshape(8, 3, 3, 3)).reshape(8, 27),
                      10, lr=0.02, wd=0.01)
    ours = run(lambda p: lp.Muon(p, lr=0.02, weight_decay=0.01, ns_dtype=torch.float64),
               w0, conv_grad, 10)
    assert ours[0].shape == (8, 3, 3, 3)
    assert_trajectory([w.reshape(8, 27) for w in ours], theirs, w0.reshape(8, 27), 1e-10)


@pytest.mark.parametrize("update_scale", ["shape", "rms"])
def test_max_preconditioner_dim_orthogonalizes_each_block(update_scale):
    """8 x 8 with max_preconditioner_dim=4: four 4 x 4 blocks, each orthogonalized and
    scaled (by its own 4 x 4 shape) on its own."""
    w0, grad_fn = least_squares(8, 8, seed=4)
    kwargs = dict(lr=0.02, update_scale=update_scale)
    theirs = ref.muon(w0, grad_fn, 10, wd=0.01, max_dim=4, **kwargs)
    whole = ref.muon(w0, grad_fn, 10, wd=0.01, **kwargs)
    assert travel_error(whole[-1], theirs[-1], w0) > 1e-2  # blocking must be visible
    ours = run(lambda p: lp.Muon(p, weight_decay=0.01, ns_dtype=torch.float64,
                                 max_preconditioner_dim=4, **kwargs), w0, grad_fn, 10)
    assert_trajectory(ours, theirs, w0, 1e-10)


# ------------------------------------------------------------------------------ AdamW
ADAMW = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)


def test_bias_follows_torch_adamw_bitwise():
    """A Linear's bias (float32) takes AdamW with Muon's lr, betas, eps and weight_decay."""
    torch.manual_seed(5)
    model = torch.nn.Linear(6, 4)
    twin_bias = torch.nn.Parameter(model.bias.detach().clone())
    opt = lp.Muon(model.parameters(), **ADAMW)
    adamw = torch.optim.AdamW([twin_bias], **ADAMW)
    gen = torch.Generator().manual_seed(6)
    for step in range(1, 11):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 4, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        twin_bias.grad = model.bias.grad.clone()
        opt.step()
        adamw.step()
        assert torch.equal(model.bias.detach(), twin_bias.detach()), f"step {step}"


def test_group_with_precondition_false_puts_its_matrices_on_adamw():
    """Two groups: Muon on the first; AdamW, with the second group's own settings, on the second."""
    w0_muon, grad_muon = least_squares(12, 7, seed=7)
    w0_adamw, grad_adamw = least_squares(7, 12, seed=8)
    muon_param = torch.nn.Parameter(w0_muon.clone())
    adamw_param = torch.nn.Parameter(w0_adamw.clone())
    twin = torch.nn.Parameter(w0_adamw.clone())
    groups = [{"params": [muon_param]},
              {"params": [adamw_param], "precondition": False, **ADAMW}]
    opt = lp.Muon(groups, lr=0.02, weight_decay=0.01, ns_dtype=torch.float64)
    adamw = torch.optim.AdamW([twin], **ADAMW)
    theirs = ref.muon(w0_muon, grad_muon, 10, lr=0.02, wd=0.01)
    for step in range(10):
        muon_param.grad = grad_muon(muon_param.detach().clone())
        adamw_param.grad = grad_adamw(adamw_param.detach().clone())
        twin.grad = grad_adamw(twin.detach().clone())
        opt.step()
        adamw.step()
        torch.testing.assert_close(adamw_param.detach(), twin.detach(), rtol=1e-12, atol=1e-14)
        assert travel_error(muon_param.detach(), theirs[step], w0_muon) <= 1e-10


# ------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("argument", "value"), [
    ("momentum", 1.0),
    ("momentum", -0.1),
    ("ns_steps", 0),
    ("update_scale", "bogus"),
    ("ns_dtype", torch.int32),
])
def test_invalid_argument_raises_value_error_naming_it(argument, value):
    param = torch.nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=argument):
        lp.Muon([param], **{argument: value})


def test_refresh_schedulers_refuse_muon_and_the_monitor_accepts_it():
    """Muon keeps no eigenbasis: a refresh schedule for it is a configuration error, said so."""
    from lightning_precond.callbacks import preconditioned_optimizers

    opt = lp.Muon([torch.nn.Parameter(torch.randn(4, 3))])
    with pytest.raises(TypeError, match="eigenbases.*got Muon"):
        preconditioned_optimizers([opt], "RootRecomputeScheduler", with_basis=True)
    found, foreign = preconditioned_optimizers([opt], "EigenStalenessMonitor")
    assert found == [opt] and foreign == []
