"""The ``weight_decay_mode`` engine option: independent weight decay ``W <- (1 - wd) W``."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_precond.registry import ALGORITHMS as REGISTRY

ALGORITHMS = list(REGISTRY)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _gradients(steps: int, model: torch.nn.Module, seed: int = 1) -> list[list[torch.Tensor]]:
    """A fixed gradient stream (not a function of the weights), so that two runs whose only
    difference is the weight decay see the same gradients and build the same directions."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(steps)]


def _run(model: torch.nn.Module, opt: torch.optim.Optimizer, grads) -> list[list[torch.Tensor]]:
    out = []
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_independent_decay_follows_the_explicit_formula(algorithm):
    """With the same gradients, the run without decay gives the directions ``D_t`` (W's change
    per step); independent decay must then give ``W_t = (1 - wd) W_{t-1} + D_t`` (AdamW order,
    blocks and vectors) or ``(1 - wd) (W_{t-1} + D_t)`` (algorithms that decay after the update),
    whatever the lr."""
    entry, wd, steps = REGISTRY[algorithm], 0.05, 12
    plain, decayed = _model(), _model()
    grads = _gradients(steps, plain)
    free = entry.build(plain.parameters(), weight_decay=0.0)
    ours = entry.build(decayed.parameters(), weight_decay=wd, weight_decay_mode="independent")
    after = ours.algorithm.decay_after_update
    plain_run, ours_run = _run(plain, free, grads), _run(decayed, ours, grads)
    previous_plain = previous_ours = [p.detach().clone() for p in _model().parameters()]
    for t in range(steps):
        for index, (w_free, w_ours) in enumerate(zip(plain_run[t], ours_run[t])):
            delta = w_free - previous_plain[index]
            if torch.equal(w_free, previous_plain[index]):
                expected = previous_ours[index]  # no step (SOAP's first call builds the basis): no decay
            elif after and w_free.dim() >= 2:
                expected = (1 - wd) * (previous_ours[index] + delta)
            else:
                expected = (1 - wd) * previous_ours[index] + delta
            torch.testing.assert_close(w_ours, expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{algorithm} step {t + 1} param {index}: {m}")
        previous_plain, previous_ours = plain_run[t], ours_run[t]
    # the decay is really lr-free: far below what lr * wd would give
    assert not torch.allclose(ours_run[-1][0], plain_run[-1][0], atol=1e-3)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_independent_decay_equals_decoupled_decay_divided_by_lr(algorithm):
    entry, lr, wd = REGISTRY[algorithm], 4e-3, 0.02
    a, b = _model(), _model()
    grads = _gradients(8, a)
    run_a = _run(a, entry.build(a.parameters(), lr=lr, weight_decay=wd, weight_decay_mode="independent"), grads)
    run_b = _run(b, entry.build(b.parameters(), lr=lr, weight_decay=wd / lr), grads)
    for wa, wb in zip(run_a[-1], run_b[-1]):
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)


def test_decoupled_is_the_default_and_lr_scaled():
    entry = REGISTRY["SOAP"]
    a, b = _model(), _model()
    grads = _gradients(6, a)
    run_a = _run(a, entry.build(a.parameters(), weight_decay=0.1), grads)
    run_b = _run(b, entry.build(b.parameters(), weight_decay=0.1, weight_decay_mode="decoupled"), grads)
    assert all(torch.equal(x, y) for x, y in zip(run_a[-1], run_b[-1]))


@pytest.mark.parametrize("value", ["coupled", None, 1])
def test_weight_decay_mode_is_validated(value):
    with pytest.raises(ValueError, match="weight_decay_mode must be one of"):
        REGISTRY["SOAP"].build(_model().parameters(), weight_decay_mode=value)


def test_independent_weight_decay_above_one_is_refused_also_in_a_group():
    model = _model()
    with pytest.raises(ValueError, match=r"weight_decay must be in \[0, 1\] with weight_decay_mode"):
        REGISTRY["Shampoo"].build(model.parameters(), weight_decay=1.5, weight_decay_mode="independent")
    opt = REGISTRY["Shampoo"].build([model[0].weight], weight_decay=0.1, weight_decay_mode="independent")
    with pytest.raises(ValueError, match="weight_decay must be in"):
        opt.add_param_group({"params": [model[2].weight], "weight_decay": 2.0})
    # an lr-scaled decay of 2.0 is fine in the decoupled mode
    REGISTRY["Shampoo"].build(model.parameters(), weight_decay=2.0)


@pytest.mark.parametrize("algorithm", ["SOAP", "Muon"])
def test_checkpoint_of_an_independent_decay_run_resumes_identically(algorithm):
    entry = REGISTRY[algorithm]
    options = {"weight_decay": 0.03, "weight_decay_mode": "independent"}
    a, b = _model(), _model()
    grads = _gradients(10, a)
    opt_a = entry.build(a.parameters(), **options)
    _run(a, opt_a, grads[:5])
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b.load_state_dict(saved["model"])
    opt_b = entry.build(b.parameters(), **options)
    opt_b.load_state_dict(saved["opt"])
    final_a, final_b = _run(a, opt_a, grads[5:])[-1], _run(b, opt_b, grads[5:])[-1]
    assert all(torch.equal(x, y) for x, y in zip(final_a, final_b))
