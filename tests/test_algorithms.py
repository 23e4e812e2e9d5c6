"""Every algorithm against an independent float64 reference (tests/references.py)."""

from __future__ import annotations

import pytest
import torch

import lightning_precond as lp
from tests import references as ref


def least_squares(seed: int = 0, n: int = 8):
    """A full-rank square problem: 0.5 ||X W - Y||^2 with W n x n."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=gen, dtype=torch.float64)
    y = torch.randn(4 * n, n, generator=gen, dtype=torch.float64)
    w0 = torch.randn(n, n, generator=gen, dtype=torch.float64) * 0.1

    def grad_fn(w: torch.Tensor) -> torch.Tensor:
        return x.T @ (x @ w - y) / x.shape[0]

    return w0, grad_fn


def run(opt_factory, w0, grad_fn, calls: int) -> list[torch.Tensor]:
    param = torch.nn.Parameter(w0.clone())
    opt = opt_factory([param])
    out = []
    for _ in range(calls):
        param.grad = grad_fn(param.detach().clone())
        opt.step()
        out.append(param.detach().clone())
    return out


def assert_trajectory(ours: list[torch.Tensor], theirs: list[torch.Tensor], rtol: float) -> None:
    assert len(ours) == len(theirs)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        rel = (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()
        assert rel <= rtol, f"step {t + 1}: relative difference {rel:.3e}"


def test_soap_matches_dense_reference():
    """reference=True: nikhilvyas/SOAP's soap.py; the default mode: the same with the shifted refresh."""
    w0, grad_fn = least_squares()
    steps, freq = 40, 5
    for reference in (True, False):
        theirs = ref.soap(w0, grad_fn, steps, lr=3e-2, b1=0.95, b2=0.95, bs=0.9, eps=1e-8, wd=0.01, freq=freq,
                          shift=not reference)
        ours = run(lambda p: lp.SOAP(p, lr=3e-2, betas=(0.95, 0.95), shampoo_beta=0.9, precondition_frequency=freq,
                                     reference=reference), w0, grad_fn, steps + 1)
        assert torch.equal(ours[0], w0), "SOAP's first call must only build the basis"
        assert_trajectory(ours[1:], theirs, 1e-6)


def test_kl_shampoo_reference_matches_kl_methods():
    """reference=True: yorkerlin/KL-Methods kl_opt.py (constant 0.1 eigenvalues, clamped values
    stored, plain EMAs and QR, decay after the update)."""
    w0, grad_fn = least_squares(1)
    steps, freq = 40, 5
    theirs = ref.kl_shampoo(w0, grad_fn, steps, lr=1e-2, b1=0.9, beta=0.95, eps=1e-8, wd=0.01, freq=freq)
    ours = run(lambda p: lp.KLShampoo(p, lr=1e-2, betas=(0.9, 0.95), shampoo_beta=None, precondition_frequency=freq,
                                      reference=True),
               w0, grad_fn, steps + 1)
    assert torch.equal(ours[0], w0)
    assert_trajectory(ours[1:], theirs, 1e-6)


def test_kl_shampoo_reference_keeps_the_clamped_eigenvalues():
    """Gradients 1e-4 x for 25 steps put the eigenvalues on the clamp (max(10, min(d, 4000)) = 10,
    lambda >= 1e-2); the reference stores the clamped value, so the floor feeds the EMA once the
    gradients grow (storing the raw EMA instead differs by 1.3e-2 here)."""
    w0, grad_fn = least_squares(1)
    steps, freq = 40, 5

    def growing():
        calls = [0]

        def grad(w):
            calls[0] += 1
            return (1e-4 if calls[0] <= 25 else 1.0) * grad_fn(w)
        return grad
    theirs = ref.kl_shampoo(w0, growing(), steps, lr=1e-2, b1=0.9, beta=0.8, eps=1e-8, wd=0.01, freq=freq)
    ours = run(lambda p: lp.KLShampoo(p, lr=1e-2, betas=(0.9, 0.8), shampoo_beta=None, precondition_frequency=freq,
                                      reference=True),
               w0, growing(), steps + 1)
    assert_trajectory(ours[1:], theirs, 1e-6)


def test_kl_shampoo_default_mode_matches_dense_reference():
    """The default mode: debiased EMAs, eigenvalues from the first gradient's RMS, shifted refresh,
    shampoo_beta 0.9 (not betas[1])."""
    w0, grad_fn = least_squares(1)
    steps, freq = 40, 5
    theirs = ref.kl_shampoo(w0, grad_fn, steps, lr=1e-2, b1=0.9, beta=0.9, eps=1e-8, wd=0.01, freq=freq,
                            reference=False, debias=True, init="gradient", shift=True, decay_after=False)
    ours = run(lambda p: lp.KLShampoo(p, lr=1e-2, betas=(0.9, 0.95), precondition_frequency=freq),
               w0, grad_fn, steps + 1)
    assert_trajectory(ours[1:], theirs, 1e-6)


def test_kl_soap_reference_matches_kl_methods():
    """reference=True with the reference's defaults (betas (0.9, 0.98), shampoo_beta = b2): no
    bias correction, no sort at refresh (V stays), decay after the update."""
    w0, grad_fn = least_squares(2)
    steps, freq = 40, 5
    theirs = ref.kl_shampoo(w0, grad_fn, steps, lr=1e-2, b1=0.0, beta=0.98, eps=1e-8, wd=0.01,
                            freq=freq, adam=(0.9, 0.98))
    ours = run(lambda p: lp.KLSOAP(p, lr=1e-2, precondition_frequency=freq, reference=True),
               w0, grad_fn, steps + 1)
    assert_trajectory(ours[1:], theirs, 1e-6)


def test_kl_soap_default_mode_matches_dense_reference():
    w0, grad_fn = least_squares(2)
    steps, freq = 40, 5
    theirs = ref.kl_shampoo(w0, grad_fn, steps, lr=1e-2, b1=0.0, beta=0.98, eps=1e-8, wd=0.01, freq=freq,
                            adam=(0.9, 0.98), reference=False, debias=True, init="gradient", shift=True,
                            sort=True, bias_correction=True)
    ours = run(lambda p: lp.KLSOAP(p, lr=1e-2, precondition_frequency=freq), w0, grad_fn, steps + 1)
    assert_trajectory(ours[1:], theirs, 1e-6)


def test_eigenvalue_corrected_shampoo_matches_dense_reference():
    w0, grad_fn = least_squares(3)
    steps, freq = 40, 5
    theirs = ref.eigenvalue_corrected_shampoo(w0, grad_fn, steps, lr=1e-2, b1=0.9, b2=0.99, bs=0.95,
                                              eps=1e-12, wd=0.01, freq=freq)
    ours = run(lambda p: lp.EigenvalueCorrectedShampoo(
        p, lr=1e-2, betas=(0.9, 0.99), shampoo_beta=0.95, weight_decay=0.01, precondition_frequency=freq),
        w0, grad_fn, steps + 1)
    assert_trajectory(ours[1:], theirs, 1e-6)


def test_eigenvalue_corrected_shampoo_reference_matches_distributed_shampoo():
    """reference=True: distributed_shampoo's eigenvalue-corrected preconditioner (Purifying
    Shampoo): an update from the first step (identity basis until the first eigh at step
    ``precondition_frequency``), corrected eigenvalues in the new basis, epsilon after the root."""
    w0, grad_fn = least_squares(3)
    steps, freq = 40, 5
    theirs = ref.ec_shampoo_distributed(w0, grad_fn, steps, lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, wd=0.01,
                                        freq=freq)
    ours = run(lambda p: lp.EigenvalueCorrectedShampoo(
        p, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, precondition_frequency=freq, reference=True),
        w0, grad_fn, steps)
    assert_trajectory(ours, theirs, 1e-6)


@pytest.mark.parametrize("b2", [0.99, 1.0])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_shampoo_reference_matches_distributed_shampoo(b2, momentum):
    """reference=True: distributed_shampoo with Adam grafting (factors bias-corrected at the
    roots, roots at the start and at the multiples of the frequency, decay into the direction)."""
    w0, grad_fn = least_squares(4, n=6)
    wd = 0.0 if momentum else 0.01
    theirs = ref.shampoo_distributed(w0, grad_fn, 30, lr=1e-2, b1=0.9, b2=b2, eps=1e-6, wd=wd, freq=4, start=6,
                                     momentum=momentum)
    ours = run(lambda p: lp.Shampoo(
        p, lr=1e-2, betas=(0.9, b2), epsilon=1e-6, weight_decay=wd, momentum=momentum, grafting="adam",
        grafting_beta2=0.999, precondition_frequency=4, start_preconditioning_step=6, reference=True),
        w0, grad_fn, 30)
    assert_trajectory(ours, theirs, 1e-9)


def test_reference_modes_refuse_the_default_modes_options():
    param = [torch.nn.Parameter(torch.zeros(3, 3))]
    for build, name in ((lambda: lp.SOAP(param, reference=True, shifted_refresh=True), "shifted_refresh"),
                        (lambda: lp.KLShampoo(param, reference=True, debias=True), "debias"),
                        (lambda: lp.KLSOAP(param, reference=True, init_factor="gradient"), "init_factor"),
                        (lambda: lp.Muon(param, reference=True, update_scale="rms"), "update_scale"),
                        (lambda: lp.Shampoo(param, reference=True, momentum=0.9, weight_decay=0.1), "momentum"),
                        (lambda: lp.KLShampoo(param, init_factor="ones"), "init_factor"),
                        (lambda: lp.KLShampoo(param, max_clamp_value=0), "max_clamp_value"),
                        (lambda: lp.KLShampoo(param, debias=1), "debias"),
                        (lambda: lp.SOAP(param, reference="yes"), "reference")):
        with pytest.raises(ValueError, match=name):
            build()


@pytest.mark.parametrize("exponent", [0.25, 0.5])
@pytest.mark.parametrize("b2", [0.99, 1.0])
def test_shampoo_matches_dense_inverse_roots(exponent, b2):
    w0, grad_fn = least_squares(4, n=6)
    lr = 1e-2 if exponent == 0.25 else 1e-4  # p = 1/2 inverts the full second moment
    kwargs = dict(lr=lr, eps=1e-6, exponent=exponent)
    theirs = ref.shampoo(w0, grad_fn, 30, b2=b2, freq=4, start=3, **kwargs)
    ours = run(lambda p: lp.Shampoo(
        p, lr=lr, betas=(0.0, b2), epsilon=1e-6, exponent=exponent, grafting=None,
        precondition_frequency=4, start_preconditioning_step=3), w0, grad_fn, 30)
    assert_trajectory(ours, theirs, 1e-9)


def test_shampoo_update_is_kronecker_product():
    """One step: vec(P) = ((R+eps)^-p kron (L+eps)^-p) vec(G) (column-major vec)."""
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    param = torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))
    opt = lp.Shampoo([param], lr=1.0, betas=(0.0, 0.5), epsilon=1e-3, grafting=None,
                     precondition_frequency=1, start_preconditioning_step=1)
    param.grad = g.clone()
    opt.step()
    left, right = 0.5 * g @ g.T, 0.5 * g.T @ g
    root_l = ref.matrix_power_sym(left, -0.25, 1e-3)
    root_r = ref.matrix_power_sym(right, -0.25, 1e-3)
    vec = torch.kron(root_r, root_l) @ g.T.reshape(-1)
    expected = -vec.reshape(3, 5).T
    torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(param.detach(), -(root_l @ g @ root_r), rtol=1e-10, atol=1e-12)


def test_shampoo_without_preconditioning_is_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    twin.load_state_dict(model.state_dict())
    ours = lp.Shampoo(model.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1,
                      grafting="adam", grafting_eps=1e-8, start_preconditioning_step=10**9)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    for _ in range(20):
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grafting", ["adagrad", "rmsprop", "sgd"])
def test_shampoo_grafting_sets_the_step_norm(grafting):
    """With grafting, each block's step has the grafted method's norm (here: SGD / AdaGrad / RMSprop)."""
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    param = torch.nn.Parameter(torch.zeros(4, 7, dtype=torch.float64))
    opt = lp.Shampoo([param], lr=1.0, betas=(0.0, 0.9), grafting=grafting, grafting_beta2=0.5,
                     grafting_eps=1e-10, precondition_frequency=1, start_preconditioning_step=1)
    param.grad = g.clone()
    opt.step()
    graft = {"sgd": g, "adagrad": g / (g.abs() + 1e-10), "rmsprop": g / ((0.5 * g * g).sqrt() + 1e-10)}[grafting]
    assert torch.linalg.norm(param.detach()).item() == pytest.approx(torch.linalg.norm(graft).item(), rel=1e-9)
    # the direction is Shampoo's, not the grafted method's
    cos = torch.nn.functional.cosine_similarity(param.detach().flatten(), -graft.flatten(), dim=0)
    assert cos < 0.999


def test_shampoo_nesterov_momentum():
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    param = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
    opt = lp.Shampoo([param], lr=0.1, betas=(0.0, 0.9), grafting="sgd", momentum=0.5, nesterov=True,
                     start_preconditioning_step=100)
    expected = torch.zeros(3, 3, dtype=torch.float64)
    buf = torch.zeros(3, 3, dtype=torch.float64)
    for g in grads:
        param.grad = g.clone()
        opt.step()
        buf = 0.5 * buf + g
        expected -= 0.1 * (g + 0.5 * buf)
    torch.testing.assert_close(param.detach(), expected)


def test_muon_reference_matches_the_original_equations():
    """reference=True: KellerJordan's muon.py (Nesterov EMA momentum, quintic Newton-Schulz on
    X / (||X||_F + 1e-7), scale sqrt(max(1, m / n)), decay before the update), here in float64."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    w0 = 0.1 * torch.randn(12, 6, generator=gen, dtype=torch.float64)

    def grad_fn(w):
        return x.T @ (x @ w - y) / x.shape[0]
    theirs = ref.muon(w0, grad_fn, 40, lr=0.02, wd=0.01, update_scale="shape")
    ours = run(lambda p: lp.Muon(p, lr=0.02, weight_decay=0.01, ns_dtype="float64", reference=True),
               w0, grad_fn, 40)
    assert_trajectory(ours, theirs, 1e-9)


@pytest.mark.parametrize("name", ["SOAP", "KLShampoo", "KLSOAP", "EigenvalueCorrectedShampoo", "Shampoo", "Muon"])
def test_reference_is_a_per_group_hyperparameter(name):
    """One group in reference mode, one not: each follows the optimizer built for its mode alone."""
    cls = getattr(lp, name)
    kwargs = {"precondition_frequency": 3} if name != "Muon" else {"ns_dtype": "float64"}
    w0, grad_fn = least_squares(5, n=6)
    mixed = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())]
    opt = cls([{"params": [mixed[0]], "reference": True}, {"params": [mixed[1]]}], lr=1e-2, **kwargs)
    alone = run(lambda p: cls(p, lr=1e-2, reference=True, **kwargs), w0, grad_fn, 12)[-1]
    default = run(lambda p: cls(p, lr=1e-2, **kwargs), w0, grad_fn, 12)[-1]
    for _ in range(12):
        for p in mixed:
            p.grad = grad_fn(p.detach().clone())
        opt.step()
    torch.testing.assert_close(mixed[0].detach(), alone, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mixed[1].detach(), default, rtol=1e-12, atol=1e-14)


class _CountMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matrix-matrix products (mm / bmm, not matrix-vector) dispatched inside."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "bmm"):
            a, b = args[0], args[1]
            self.count += int(a.shape[-2] > 1 and b.shape[-1] > 1)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, products", [("KLSOAP", 7), ("SOAP", 6), ("KLShampoo", 9)])
def test_a_step_without_refresh_forms_each_gradient_projection_once(name, products):
    # One block; a step between refreshes. KL-SOAP: Q_a^T G, G Q_b, Q_a^T G Q_b (shared by its
    # scaling and its two-sided statistics), two products out of the basis, two factor
    # updates. SOAP: two statistics, two in, two out. KL-Shampoo projects the momentum
    # (two in, two out), not the gradient; its statistics take the three gradient products and
    # the two factor updates.
    w0, grad_fn = least_squares(n=8)
    param = torch.nn.Parameter(w0.clone())
    opt = getattr(lp, name)([param], precondition_frequency=1000)
    for _ in range(3):
        param.grad = grad_fn(param.detach().clone())
        opt.step()
    param.grad = grad_fn(param.detach().clone())
    with _CountMatmuls() as counter:
        opt.step()
    assert counter.count == products
