"""The torch.optim contract: param-group keys, the torch.optim flags, maximize, parameters
that are not materialized yet, and torch.compile of step()."""

from __future__ import annotations

import pytest
import torch

import lightning_precond as lp
from lightning_precond.registry import ALGORITHMS, names

NAMES = names()


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


# ---------------------------------------------------------------------------- group keys
@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_group_key_is_refused_naming_it_and_the_accepted_ones(name):
    net = model()
    with pytest.raises(ValueError, match=r"'weight_decai' is not an option of .*accepts 'params', .*'lr'"):
        ALGORITHMS[name].build([{"params": net.parameters(), "weight_decai": 0.1}])
    opt = ALGORITHMS[name].build(net[0].parameters())
    with pytest.raises(ValueError, match=r"'precondtion' is not an option"):
        opt.add_param_group({"params": net[2].parameters(), "precondtion": False})
    assert len(opt.param_groups) == 1


def test_the_keys_of_schedulers_frameworks_and_checkpoints_are_accepted():
    net = model()
    opt = lp.SOAP([{"params": net[0].parameters(), "name": "first", "initial_lr": 1e-3, "max_lr": 1e-2,
                    "lp_algorithm": "SOAP", "lp_format": 1, "max_factor_dim": 8}])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)  # adds keys to groups
    opt.add_param_group({"params": net[2].parameters(), "initial_lr": 1e-3, "base_momentum": 0.85,
                         "max_momentum": 0.95, "min_lr": 1e-6, "max_lr": 1e-2})
    net(torch.randn(4, 5)).square().mean().backward()
    opt.step()
    scheduler.step()  # reads the keys it wrote
    # a key that every existing group holds (written there by a framework) is accepted too
    for group in opt.param_groups:
        group["written_by_a_framework"] = 1
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "written_by_a_framework": 1})
    with pytest.raises(ValueError, match="'written_by_a_framewrok' is not an option"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "written_by_a_framewrok": 1})


@pytest.mark.parametrize("name", NAMES)
def test_own_state_dict_groups_load_and_schedulers_keys_survive(name):
    net = model()
    opt = ALGORITHMS[name].build(net.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    net(torch.randn(4, 5)).square().mean().backward()
    opt.step()
    scheduler.step()
    saved = opt.state_dict()
    assert "initial_lr" in saved["param_groups"][0]
    again = ALGORITHMS[name].build(model().parameters())
    again.load_state_dict(saved)
    torch.optim.lr_scheduler.StepLR(again, step_size=2, last_epoch=0)


def test_a_group_with_precondition_false_is_adamw_with_its_own_hyperparameters():
    """lr, betas, eps and weight_decay of the group, not the optimizer's defaults."""
    net, twin = model(), model()
    own = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.2}
    opt = lp.SOAP([{"params": net[0].parameters(), "precondition": False, **own},
                   {"params": net[2].parameters()}], lr=1e-2, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01)
    reference = torch.optim.AdamW(twin[0].parameters(), **own)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(8, 5, generator=gen)
        for m, o in ((net, opt), (twin, reference)):
            o.zero_grad()
            m(x).square().mean().backward()
        for a, b in zip(net[0].parameters(), twin[0].parameters()):
            b.grad = a.grad.clone()
        opt.step()
        reference.step()
        for a, b in zip(net[0].parameters(), twin[0].parameters()):
            assert torch.equal(a, b)
    assert set(opt.state[net[0].weight]) == {"step", "exp_avg", "exp_avg_sq"}


# ---------------------------------------------------------------------------- flags
@pytest.mark.parametrize("name", NAMES)
def test_torch_flags_at_their_defaults_are_accepted(name):
    ALGORITHMS[name].build(model().parameters(), foreach=None, fused=None, capturable=False, differentiable=False,
                           maximize=False)
    ALGORITHMS[name].build(model().parameters(), foreach=False, fused=False)


@pytest.mark.parametrize("flag, value", [("foreach", True), ("fused", True), ("capturable", True),
                                         ("differentiable", True), ("maximize", "yes")])
def test_other_torch_flag_values_are_refused_naming_the_flag(flag, value):
    with pytest.raises(ValueError, match=flag):
        lp.SOAP(model().parameters(), **{flag: value})


def test_an_unknown_keyword_is_a_type_error_naming_the_optimizer():
    with pytest.raises(TypeError, match=r"SOAP got an unexpected keyword argument 'nesterov'"):
        lp.SOAP(model().parameters(), nesterov=True)


@pytest.mark.parametrize("name", NAMES)
def test_maximize_is_minimizing_the_negated_objective(name):
    """maximize=True on the gradients equals the same optimizer on the negated gradients,
    bit for bit, for blocks (some with an identity side) and vectors alike."""
    nets = [model(1), model(1)]
    options = {"max_factor_dim": 6} if name != "Muon" else {}
    ascending = ALGORITHMS[name].build(nets[0].parameters(), maximize=True, **options)
    descending = ALGORITHMS[name].build(nets[1].parameters(), **options)
    gen = torch.Generator().manual_seed(2)
    for _ in range(7):
        x = torch.randn(8, 5, generator=gen)
        for net in nets:
            net.zero_grad()
            net(x).square().mean().backward()
        for p in nets[1].parameters():
            p.grad.neg_()
        ascending.step()
        descending.step()
    for a, b in zip(*(net.parameters() for net in nets)):
        assert torch.equal(a, b)
    moved = [not torch.equal(a, b) for a, b in zip(nets[0].parameters(), model(1).parameters())]
    assert all(moved)


def test_maximize_ascends():
    param = torch.nn.Parameter(torch.zeros(4, 3))
    target = torch.randn(4, 3)
    opt = lp.SOAP([param], lr=1e-2, maximize=True)
    for _ in range(20):
        opt.zero_grad()
        (-(param - target).square().sum()).backward()  # maximum at target
        opt.step()
    assert (param - target).square().sum() < target.square().sum()


# ---------------------------------------------------------------------------- not materialized
def test_lazy_parameters_are_accepted_at_construction_and_refused_clearly_at_the_first_step():
    net = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = lp.SOAP(net.parameters())
    with pytest.raises(ValueError, match=r"parameter 0 is not initialized yet .*LazyLinear.*forward pass"):
        opt.step()
    net(torch.randn(3, 5)).square().sum().backward()  # materializes the same Parameter objects
    opt.step()
    assert opt._plan is not None and len(opt._plan.blocks) == 2


def test_meta_parameters_are_refused_clearly_when_the_blocks_are_planned():
    with torch.device("meta"):
        meta = torch.nn.Linear(5, 4)
    opt = lp.SOAP(meta.named_parameters())
    with pytest.raises(ValueError, match=r"weight is on the meta device .*materialize"):
        opt.step()
    with pytest.raises(ValueError, match="meta device"):
        opt.preconditioner_stats()
    # What Accelerate does: swap the materialized parameters into the groups, then step.
    real = torch.nn.Linear(5, 4)
    opt.param_groups[0]["params"] = list(real.parameters())
    real(torch.randn(3, 5)).square().sum().backward()
    opt.step()
    assert len(opt._plan.blocks) == 1


# ---------------------------------------------------------------------------- torch.compile
def test_compiled_step_of_a_fresh_optimizer_equals_eager():
    """torch.compile(opt.step) works from the first step: the engine's step runs eagerly
    inside it (a graph break), so the result is the eager one bit for bit, and nothing is
    recompiled per step. Kept tiny: compiling is slow on CPU."""
    torch._dynamo.reset()
    nets = [model(3), model(3)]
    eager = lp.SOAP(nets[0].parameters(), precondition_frequency=2)
    compiled_opt = lp.SOAP(nets[1].parameters(), precondition_frequency=2)
    compiled = torch.compile(compiled_opt.step)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
    for _ in range(4):
        for net in nets:
            net.zero_grad()
            net(x).square().mean().backward()
        eager.step()
        compiled()
    for a, b in zip(*(net.parameters() for net in nets)):
        assert torch.equal(a, b)
    assert compiled_opt._steps_taken == 4 and compiled_opt._plan is not None
