"""matmul_dtype: the per-step products of the factored algorithms in bfloat16 or scaled float16,
state in float32."""

from __future__ import annotations

import inspect

import pytest
import torch

import lightning_precond as lp
from lightning_precond.algorithms import precision
from lightning_precond.algorithms.precision import TF32, check_matmul_dtype, power_of_two_scale, product
from lightning_precond.registry import ALGORITHMS
from tests.test_algorithms import least_squares, run

FACTORED = [name for name, entry in ALGORITHMS.items() if name != "Muon"]


def test_accepted_values_and_refusals():
    assert check_matmul_dtype(None) is None
    assert check_matmul_dtype("bfloat16") is torch.bfloat16 and check_matmul_dtype(torch.bfloat16) is torch.bfloat16
    assert check_matmul_dtype("float32") is torch.float32
    assert check_matmul_dtype("float16") is torch.float16 and check_matmul_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="matmul_dtype must be None.*'float16'"):
        check_matmul_dtype("fp16")
    with pytest.raises(ValueError, match="matmul_dtype must be None"):
        check_matmul_dtype(torch.int8)
    p = torch.nn.Parameter(torch.zeros(3, 3))
    for name in FACTORED:
        with pytest.raises(ValueError, match="matmul_dtype"):
            ALGORITHMS[name].optimizer([p], matmul_dtype="half")
    with pytest.raises(ValueError, match="matmul_dtype"):  # Muon's products are Newton-Schulz: ns_dtype
        lp.Muon([{"params": [p], "matmul_dtype": "bfloat16"}])


def test_every_factored_preset_takes_it():
    for name in FACTORED:
        assert "matmul_dtype" in inspect.signature(ALGORITHMS[name].optimizer).parameters, name


def test_product_rounds_operands_and_result_through_bfloat16():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(5, 5, generator=gen) for _ in range(3))
    expected = ((a.bfloat16() @ b.bfloat16()) @ c.bfloat16()).float()
    assert torch.equal(product(a, b, c, dtype=torch.bfloat16), expected)
    assert torch.equal(product(a, b, c), a @ b @ c)  # None: the state dtype, the same kernels


def test_power_of_two_scale_bounds_each_matrix_of_a_stack():
    x = torch.stack([torch.full((4, 4), 1e3), torch.full((4, 4), 1e-6), torch.zeros(4, 4),
                     torch.full((4, 4), float("inf"))])
    scale = power_of_two_scale(x)
    assert scale.shape == (4, 1, 1) and scale.dtype == torch.float32
    norms = torch.linalg.vector_norm(x[:2] * scale[:2], dim=(-2, -1))
    assert torch.all(norms <= 128) and torch.all(norms > 64)  # the largest power of two under the bound
    assert torch.equal(torch.log2(scale[:2]).round(), torch.log2(scale[:2]))
    assert scale[2].item() == 1.0 and scale[3].item() == 1.0  # zero and non-finite: left alone


def test_float16_products_scale_past_its_range_and_keep_its_precision():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 64, 48, generator=gen) * torch.tensor([1e3, 1.0, 1e-5]).view(3, 1, 1)
    q = torch.linalg.qr(torch.randn(3, 48, 48, generator=gen)).Q
    for operands in ((g, g.mT), (g.mT, g), (g, q, q.mT)):
        exact = operands[0].double()
        for operand in operands[1:]:
            exact = exact @ operand.double()
        half = product(*operands, dtype=torch.float16)
        assert half.dtype == torch.float32 and torch.isfinite(half).all()
        # per matrix: (1e3)^2 * 64 overflows an unscaled float16 G G^T; 1e-5 squared underflows it
        error = torch.linalg.vector_norm(half.double() - exact, dim=(-2, -1)) / torch.linalg.vector_norm(exact, dim=(-2, -1))
        assert error.max() < 2e-3, error
    unscaled = (g[0].half() @ g[0].mT.half()).float()
    assert not torch.isfinite(unscaled).all()  # what the scaling is for
    bfloat = product(g, g.mT, dtype=torch.bfloat16).double()
    exact = g.double() @ g.double().mT
    assert (product(g, g.mT, dtype=torch.float16).double() - exact).norm() < (bfloat - exact).norm() / 3


def test_float16_products_keep_zeros_and_non_finite_values():
    z = torch.zeros(2, 5, 5)
    assert torch.equal(product(z, z.mT, dtype=torch.float16), z)
    bad = torch.randn(2, 5, 5)
    bad[1, 0, 0] = float("nan")
    out = product(bad, bad.mT, dtype=torch.float16)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).any()


def test_tf32_is_scoped_to_each_product_and_restores_the_callers_setting(monkeypatch):
    assert check_matmul_dtype("tf32") == TF32
    backend = torch.backends.cuda.matmul
    seen = []
    real_matmul = torch.Tensor.__matmul__

    def spying_matmul(a, b):
        seen.append(backend.fp32_precision)
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spying_matmul)
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(5, 5, generator=gen) for _ in range(3))
    for callers in ("ieee", "none"):
        backend.fp32_precision = callers
        try:
            result = product(a, b, c, dtype=TF32)
            assert seen == ["tf32", "tf32"] and backend.fp32_precision == callers
            seen.clear()
            with pytest.raises(RuntimeError, match="inside"), precision.tf32_matmuls():
                raise RuntimeError("inside")  # restored on an error too
            assert backend.fp32_precision == callers
        finally:
            backend.fp32_precision = "none"
    assert torch.equal(result, real_matmul(real_matmul(a, b), c))  # on CPU: exact float32


def test_a_tf32_optimizer_leaves_the_backend_setting_alone_and_matches_float32_on_cpu():
    w0, grad_fn = least_squares()
    tf32 = run(lambda ps: lp.KLSOAP(ps, lr=1e-2, matmul_dtype="tf32"), w0.float(), lambda w: grad_fn(w.double()).float(), 5)
    assert torch.backends.cuda.matmul.fp32_precision == "none"
    exact = run(lambda ps: lp.KLSOAP(ps, lr=1e-2), w0.float(), lambda w: grad_fn(w.double()).float(), 5)
    for a, b in zip(tf32, exact):
        assert torch.equal(a, b)


def _first_step_factor(matmul_dtype):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = lp.SOAP([p], lr=1e-3, matmul_dtype=matmul_dtype)
    p.grad = torch.randn(6, 4)
    grad = p.grad.clone()
    opt.step()
    return opt.state_dict()["state"][0]["block0"], grad


def test_statistics_are_bfloat16_products_kept_in_float32():
    block, g = _first_step_factor("bfloat16")
    beta = 0.95  # SOAP's factor EMA: betas[1]
    gb = g.bfloat16()
    assert block["factor_left"].dtype == torch.float32
    assert torch.equal(block["factor_left"], (1 - beta) * (gb @ gb.mT).float())
    assert torch.equal(block["factor_right"], (1 - beta) * (gb.mT @ gb).float())
    full, _ = _first_step_factor(None)
    # float32 (batched bmm: the last bit may differ from a 2-D mm), and not the bfloat16 values.
    torch.testing.assert_close(full["factor_left"], (1 - beta) * (g @ g.mT), rtol=1e-6, atol=1e-7)
    assert (full["factor_left"] - block["factor_left"]).abs().max() > 1e-4


def test_param_groups_choose_their_own():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4))
    opt = lp.SOAP([{"params": [a], "matmul_dtype": "bfloat16"}, {"params": [b]}], lr=1e-3)
    a.grad, b.grad = torch.randn(6, 4), torch.randn(6, 4)
    ga, gb = a.grad.clone(), b.grad.clone()
    opt.step()
    state = opt.state_dict()["state"]
    low = ga.bfloat16()
    assert torch.equal(next(iter(state[0].values()))["factor_left"], 0.05 * (low @ low.mT).float())
    torch.testing.assert_close(next(iter(state[1].values()))["factor_left"], 0.05 * (gb @ gb.mT), rtol=1e-6, atol=1e-7)
    assert (next(iter(state[1].values()))["factor_left"] - 0.05 * (gb.bfloat16() @ gb.bfloat16().mT).float()).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", FACTORED)
def test_low_precision_reaches_the_float32_loss(name, dtype):
    """Rounding the products to bfloat16 (8-bit mantissa) moves the trajectory (Adam in the
    eigenbasis normalizes near-zero projected components, whose signs are rounding noise:
    up to 20% of the parameter movement for eigenvalue-corrected Shampoo), but after 30 steps
    of a least-squares problem the loss is within 1% of the float32 run's progress (measured:
    0.35% at most)."""
    w0, grad_fn = least_squares()
    w0 = w0.float()
    gen = torch.Generator().manual_seed(0)  # least_squares' data, to evaluate the loss
    x = torch.randn(32, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 8, generator=gen, dtype=torch.float64)

    def loss(w):
        return 0.5 * ((x @ w.double() - y) ** 2).sum().item() / x.shape[0]

    def grads(w):
        return grad_fn(w.double()).float()

    def build(dtype):
        return lambda params: ALGORITHMS[name].build(params, matmul_dtype=dtype)

    full = run(build(None), w0, grads, 30)
    low = run(build(dtype), w0, grads, 30)
    progress = loss(w0) - loss(full[-1])
    assert progress > 0.1
    assert abs(loss(low[-1]) - loss(full[-1])) < 0.01 * progress
    assert not torch.equal(low[-1], full[-1])  # the low-precision path was taken


def test_checkpoint_round_trip_keeps_the_dtype_and_continues_bitwise():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = lp.KLShampoo([p], lr=1e-3, matmul_dtype=torch.bfloat16, precondition_frequency=2)
    grads = [torch.randn(8, 8) for _ in range(6)]
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    saved, weights = opt.state_dict(), p.detach().clone()
    q = torch.nn.Parameter(weights.clone())
    resumed = lp.KLShampoo([q], lr=1e-3, precondition_frequency=2)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["matmul_dtype"] == torch.bfloat16
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_eigenvalue_corrected_low_precision_steps_stay_the_size_of_float32_ones(dtype):
    """Just after a refresh the projected gradient is almost zero in most directions, and the
    momentum and second moment there are independent rounding noise of two products: without
    the rounding floor the second step moved a parameter 12x (bfloat16) / 53x (float16) as far
    as in float32 (up to 45 x lr)."""
    w0, grad_fn = least_squares()
    w0 = w0.float()

    def grads(w):
        return grad_fn(w.double()).float()

    def largest_move(matmul_dtype):
        trajectory = run(lambda ps: lp.EigenvalueCorrectedShampoo(ps, lr=3e-3, precondition_frequency=5,
                                                                   matmul_dtype=matmul_dtype), w0, grads, 6)
        return max((b - a).abs().max().item() for a, b in zip([w0] + trajectory, trajectory))

    assert largest_move(dtype) < 2 * largest_move(None)
