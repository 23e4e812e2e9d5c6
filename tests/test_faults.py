"""Faults a long run meets, x every registered optimizer: each ends in a clear error raised
before anything changes, or in a counted skip that leaves the optimizer exactly as if the
faulty gradient had been ``None`` (issue 13). Expected outcomes come from that contract, not
from recorded runs.

Run the table: ``.venv/bin/python -m pytest -q tests/test_faults.py``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from lightning_precond.registry import ALGORITHMS as REGISTRY

NAMES = list(REGISTRY)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def build(name: str, net: torch.nn.Module, **options):
    return REGISTRY[name].build(net.named_parameters(), **options)


def gradients(net: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    net.zero_grad()
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    ((net(x) - y) ** 2).mean().backward()


def snapshot(net: torch.nn.Module, opt) -> dict[str, torch.Tensor]:
    """Every tensor of the parameters and of the optimizer's state dict, by path."""
    out = {f"param.{n}": p.detach().clone() for n, p in net.named_parameters()}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        elif isinstance(value, torch.Tensor):
            out[prefix] = value.detach().clone()

    walk("state", copy.deepcopy(opt.state_dict()["state"]))
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def warmed_up(name: str, **options):
    """A model and optimizer after 6 healthy steps (bases refreshed at least once)."""
    net = model()
    opt = build(name, net, **options)
    for step in range(6):
        gradients(net, step)
        opt.step()
    return net, opt


# (fault name, which parameter, how its gradient is spoiled)
GRADIENT_FAULTS = {
    "nan in a bias": ("0.bias", lambda g: g.index_fill_(0, torch.tensor([1]), float("nan"))),
    "inf in a bias": ("2.bias", lambda g: g.fill_(float("inf"))),
    "nan in a matrix": ("0.weight", lambda g: g.index_fill_(0, torch.tensor([2]), float("nan"))),
    "huge finite matrix gradient (1e19)": ("2.weight", lambda g: g.mul_(0).add_(1e19)),
    "huge finite matrix entry (3e19)": ("0.weight", lambda g: g.index_fill_(1, torch.tensor([0]), 3e19)),
}


@pytest.mark.parametrize("fault", list(GRADIENT_FAULTS))
@pytest.mark.parametrize("name", NAMES)
def test_a_refused_gradient_is_skipped_exactly_as_if_it_were_none(name, fault):
    target, spoil = GRADIENT_FAULTS[fault]
    net, opt = warmed_up(name)
    twin, twin_opt = warmed_up(name)
    gradients(net, 99)
    gradients(twin, 99)
    spoil(dict(net.named_parameters())[target].grad)
    dict(twin.named_parameters())[target].grad = None
    with pytest.warns(RuntimeWarning, match=f"{target}.*refused"):
        opt.step()
    twin_opt.step()
    # identical but for the skip counter, which is the point of a counted skip
    ours, theirs = snapshot(net, opt), snapshot(twin, twin_opt)
    assert_same({k: v for k, v in ours.items() if not k.endswith("skipped_steps")},
                {k: v for k, v in theirs.items() if not k.endswith("skipped_steps")})
    # counted, and visible
    assert opt.skipped_steps(net.named_parameters()) == {target: 1}
    if not target.endswith("bias") and REGISTRY[name].has_basis:
        stats = [s for s in opt.preconditioner_stats(net.named_parameters()) if s.param_name == target]
        assert stats and {s.skipped_steps for s in stats} == {1}
    # and the run goes on, finite
    for step in range(100, 104):
        gradients(net, step)
        opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("fault", list(GRADIENT_FAULTS))
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_grad_raise_refuses_before_anything_changes(name, fault):
    target, spoil = GRADIENT_FAULTS[fault]
    net, opt = warmed_up(name, nonfinite_grad="raise")
    gradients(net, 99)
    spoil(dict(net.named_parameters())[target].grad)
    before = snapshot(net, opt)
    with pytest.raises(FloatingPointError, match="nonfinite_grad='raise'"):
        opt.step()
    assert_same(snapshot(net, opt), before)


GROUP_EDITS = {
    "betas[1] = 1.5": ("betas", (0.9, 1.5), r"betas\[1\]"),
    "lr = inf": ("lr", math.inf, "lr"),
    "lr = '0.01'": ("lr", "0.01", "lr"),
    "weight_decay = -1": ("weight_decay", -1.0, "weight_decay"),
    "eps = -1": ("eps", -1.0, "eps"),
}


@pytest.mark.parametrize("edit", list(GROUP_EDITS))
@pytest.mark.parametrize("name", NAMES)
def test_an_invalid_group_edit_is_refused_at_step_before_anything_changes(name, edit):
    key, value, message = GROUP_EDITS[edit]
    net, opt = warmed_up(name)
    gradients(net, 99)
    before = snapshot(net, opt)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_same(snapshot(net, opt), before)


@pytest.mark.parametrize("name", NAMES)
def test_a_gradient_of_the_wrong_shape_is_refused_before_anything_changes(name):
    net, opt = warmed_up(name)
    gradients(net, 99)
    before = snapshot(net, opt)
    net[0].weight.grad.data = torch.zeros(3, 3)  # what a faulty gradient hook can do
    with pytest.raises(RuntimeError, match="gradient of shape"):
        opt.step()
    assert_same(snapshot(net, opt), before)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].has_basis])
def test_precondition_frequency_zero_written_into_a_group_is_refused(name):
    net, opt = warmed_up(name)
    gradients(net, 99)
    before = snapshot(net, opt)
    opt.param_groups[0]["precondition_frequency"] = 0
    with pytest.raises(ValueError, match="precondition_frequency"):
        opt.step()
    assert_same(snapshot(net, opt), before)


# ---------------------------------------------------------------------------- checkpoints
def _checkpoint(name: str, **options) -> dict:
    net, opt = warmed_up(name, **options)
    return copy.deepcopy(opt.state_dict())


def assert_load_refused(name: str, saved: dict, match: str) -> None:
    """Loading ``saved`` into a trained ``name`` raises ValueError(match) and changes nothing."""
    net, opt = warmed_up(name)
    before = snapshot(net, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    assert_same(snapshot(net, opt), before)


@pytest.mark.parametrize("saved_by, loaded_by", [("SOAP", "KLShampoo"), ("SOAP", "KLSOAP"), ("KLShampoo", "SOAP"),
                                                 ("Shampoo", "SOAP"), ("SOAP", "Muon")])
def test_a_checkpoint_of_another_algorithm_is_refused_naming_both(saved_by, loaded_by):
    assert_load_refused(loaded_by, _checkpoint(saved_by), f"written by {saved_by}.*is {loaded_by}")


def test_an_untagged_v0_checkpoint_of_another_algorithm_is_refused_by_its_state():
    saved = _checkpoint("SOAP")
    for group in saved["param_groups"]:
        for tag in ("lp_algorithm", "lp_format", "lp_block_plan"):
            group.pop(tag)
    assert_load_refused("KLShampoo", saved, "exp_avg_sq.*another algorithm")


@pytest.mark.parametrize("name", NAMES)
def test_a_torch_adamw_checkpoint_is_refused_and_nothing_changes(name):
    twin = model()
    adamw = torch.optim.AdamW(twin.parameters())
    gradients(twin, 0)
    adamw.step()
    assert_load_refused(name, adamw.state_dict(), "lacks.*not written by this optimizer")


def test_another_block_plan_is_refused():
    assert_load_refused("SOAP", _checkpoint("SOAP", max_preconditioner_dim=4), "planned with max_preconditioner_dim=4")


def test_vector_state_of_the_wrong_length_is_refused_at_load():
    saved = _checkpoint("SOAP")
    saved["state"][1]["adamw"]["exp_avg"] = torch.zeros(5)
    assert_load_refused("SOAP", saved, "exp_avg.*shape")


@pytest.mark.parametrize("name", NAMES)
def test_own_checkpoints_still_round_trip(name):
    saved = _checkpoint(name)
    net, opt = warmed_up(name)
    opt.load_state_dict(saved)
    assert all(group["lp_algorithm"] == name for group in opt.state_dict()["param_groups"])
    assert not any(key.startswith("lp_") for group in opt.param_groups for key in group)


# ---------------------------------------------------------------------------- visibility
@pytest.mark.parametrize("name", NAMES)
def test_skips_reach_the_loggers_metrics(name):
    from lightning_precond.callbacks import StalenessReport

    net, opt = warmed_up(name)
    report = StalenessReport(every=1, per_layer=False)
    assert report.collect([opt], net.named_parameters())["precond/skipped_parameters"] == 0.0
    for step in range(3):
        gradients(net, 200 + step)
        net[0].bias.grad[0] = float("nan")
        net[2].weight.grad[0, 0] = float("inf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rate-limited: tested below
            opt.step()
    metrics = report.collect([opt], net.named_parameters())
    assert metrics["precond/skipped_parameters"] == 2.0 and metrics["precond/skipped_steps_max"] == 3.0


def test_the_skip_warning_is_rate_limited():
    net, opt = warmed_up("SOAP")
    with pytest.warns(RuntimeWarning) as caught:
        for step in range(12):
            gradients(net, 300 + step)
            net[0].bias.grad.fill_(float("nan"))
            opt.step()
    counts = [str(w.message) for w in caught if "0.bias" in str(w.message)]
    assert len(counts) == 2 and "(1 time so far" in counts[0] and "(10 times so far" in counts[1]


def test_a_nan_factor_reports_infinite_staleness():
    net, opt = warmed_up("SOAP")
    opt._buckets[0].state.factors.factor_left[0, 0, 0] = float("nan")
    stale = [s.staleness for s in opt.preconditioner_stats()]
    assert any(math.isinf(s) for s in stale)


# ---------------------------------------------------------------------------- add_param_group
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_after_the_first_step_equals_a_group_without_gradients_until_then(name):
    """Progressive unfreezing: adding the head's group after 4 steps is the same as having it
    from the start with no gradient until then; existing blocks keep their state."""
    def run(add_later: bool):
        net = model()
        body, head = list(net[0].parameters()), list(net[2].parameters())
        entry = REGISTRY[name]
        opt = entry.build([{"params": body}] if add_later else [{"params": body}, {"params": head, "lr": 1e-3}])
        for step in range(8):
            if add_later and step == 4:
                opt.add_param_group({"params": head, "lr": 1e-3})
            gradients(net, step)
            if step < 4:
                for p in head:
                    p.grad = None
            opt.step()
        return net, opt

    late, late_opt = run(True)
    early, early_opt = run(False)
    for a, b in zip(late.parameters(), early.parameters()):
        assert torch.equal(a, b)
    assert late_opt.state_bytes() == early_opt.state_bytes()


def test_an_invalid_added_group_is_refused_before_it_is_added():
    net, opt = warmed_up("SOAP")
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 3))], "betas": (0.9, 2.0)})
    assert len(opt.param_groups) == groups
    gradients(net, 50)
    opt.step()  # the optimizer still works


def test_a_lost_factor_stops_the_run_only_after_the_step_is_whole():
    """The error after max_consecutive_failures comes once every bucket stepped and every
    update was applied: a retry or a resume does not double-count half a step."""
    net, opt = warmed_up("SOAP", max_consecutive_failures=1, precondition_frequency=1)
    corrupted = opt._buckets[0]
    corrupted.state.factors.factor_left[0].fill_(float("nan"))
    steps_before = [[r.step for r in b.records] for b in opt._buckets]
    weights_before = [p.detach().clone() for p in net.parameters()]
    gradients(net, 77)
    with pytest.raises(RuntimeError, match="failed 1 times in a row"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert [[r.step for r in b.records] for b in opt._buckets] == [[s + 1 for s in b] for b in steps_before]
    assert all(not torch.equal(a, b) for a, b in zip(net.parameters(), weights_before))


def test_editing_precondition_then_adding_a_group_is_refused_at_the_next_step():
    """The existing blocks must keep their plan: a group switched to precondition=False after
    the first step would silently re-map them, so the re-plan refuses."""
    net, opt = warmed_up("SOAP")
    opt.param_groups[0]["precondition"] = False
    opt.add_param_group({"params": [("extra", torch.nn.Parameter(torch.randn(3, 3)))]})
    gradients(net, 60)
    before = snapshot(net, opt)
    with pytest.raises(RuntimeError, match="'precondition' edited after the first step"):
        opt.step()
    assert_same(snapshot(net, opt), before)
