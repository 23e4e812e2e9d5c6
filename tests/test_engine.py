"""The engine: blocking, batching, failure paths, validation and checkpoints."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import lightning_precond as lp
from lightning_precond.blocks import matrix_shape, plan_blocks
from lightning_precond.ownership import assign_owners

from lightning_precond.registry import ALGORITHMS as REGISTRY

ALGORITHMS = list(REGISTRY)


def build(name: str, params, **basis_options) -> lp.PreconditionedOptimizer:
    """The registered optimizer with its defaults; ``basis_options`` (refresh settings) apply
    only to algorithms with a basis."""
    entry = REGISTRY[name]
    return entry.optimizer(params, **(basis_options if entry.has_basis else {}))


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 4),
    )


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 12, generator=gen)
        y = torch.randn(32, 4, generator=gen)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- blocking
def test_300x200_with_max_dim_128_gives_expected_blocks():
    plan = plan_blocks([(300, 200)], [0], 128)
    shapes = [b.shape for b in plan.blocks]
    assert shapes == [(128, 128), (128, 72), (128, 128), (128, 72), (44, 128), (44, 72)]
    assert [b.id for b in plan.blocks] == [f"0.{i}" for i in range(6)]
    assert [(b.row_start, b.col_start) for b in plan.blocks] == [
        (0, 0), (0, 128), (128, 0), (128, 128), (256, 0), (256, 128)]


def test_higher_order_tensors_merge_adjacent_dims():
    assert matrix_shape((64, 3, 3, 3), 1024) == (64, 27)
    assert matrix_shape((8, 16, 4), 1024) == (8, 64)
    assert matrix_shape((32, 32, 32), 1024) == (32, 1024)
    assert matrix_shape((5,), 1024) is None
    assert matrix_shape((), 1024) is None


def test_batched_blocks_equal_a_loop_over_blocks():
    """One 300x200 parameter blocked at 128 == six separate parameters, one per block."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=gen, dtype=torch.float64)
    grads = [torch.randn(300, 200, generator=gen, dtype=torch.float64) for _ in range(12)]
    whole = torch.nn.Parameter(w.clone())
    opt = lp.SOAP([whole], lr=1e-2, precondition_frequency=3, max_preconditioner_dim=128)
    plan = plan_blocks([(300, 200)], [0], 128)
    pieces = [torch.nn.Parameter(w[b.row_start:b.row_start + b.rows, b.col_start:b.col_start + b.cols].clone())
              for b in plan.blocks]
    separate = [lp.SOAP([p], lr=1e-2, precondition_frequency=3, max_preconditioner_dim=128) for p in pieces]
    for g in grads:
        whole.grad = g.clone()
        opt.step()
        for b, p, o in zip(plan.blocks, pieces, separate):
            p.grad = g[b.row_start:b.row_start + b.rows, b.col_start:b.col_start + b.cols].clone()
            o.step()
    for b, p in zip(plan.blocks, pieces):
        torch.testing.assert_close(
            whole.detach()[b.row_start:b.row_start + b.rows, b.col_start:b.col_start + b.cols],
            p.detach(), rtol=1e-10, atol=1e-12)


def test_conv_weights_are_preconditioned_as_matrices():
    conv = torch.nn.Conv2d(3, 8, 3)
    opt = lp.SOAP(conv.parameters())
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    stats = opt.preconditioner_stats()
    assert {(s.side, s.dim) for s in stats} == {("left", 8), ("right", 27)}


def test_ownership_is_deterministic_and_balanced():
    plan = plan_blocks([(64, 64)] * 6 + [(128, 128)] * 2 + [(32, 16)], [0] * 9, 1024)
    owners = assign_owners(plan.blocks, 2)
    assert owners == assign_owners(plan.blocks, 2)
    assert set(owners) == {0, 1}
    assert assign_owners(plan.blocks, 1) == [0] * len(plan.blocks)
    with pytest.raises(ValueError, match="world_size"):
        assign_owners(plan.blocks, 0)


def test_ownership_respects_candidate_ranks():
    """FSDP1 restricts each block to the ranks holding a piece of its parameter."""
    plan = plan_blocks([(64, 64)] * 6 + [(128, 128)] * 2, [0] * 8, 1024)
    candidates = [{0}, {0, 1}, {1, 2}, {2}, {0, 1, 2}, {0, 1, 2}, {1}, {0, 2}]
    owners = assign_owners(plan.blocks, 3, candidates)
    assert all(owner in allowed for owner, allowed in zip(owners, candidates))
    free = assign_owners(plan.blocks, 3, [set(range(3))] * 8)
    assert free == assign_owners(plan.blocks, 3)  # no restriction: the same map as without
    with pytest.raises(ValueError, match=r"candidates\[1\]"):
        assign_owners(plan.blocks, 3, [{0}, set(), *candidates[2:]])


# ---------------------------------------------------------------- every algorithm
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_trains_a_small_model(algorithm):
    model = small_model()
    losses = train(model, REGISTRY[algorithm].optimizer(model.parameters(), lr=3e-3), 60)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_params_without_grad_are_skipped(algorithm):
    model = small_model()
    opt = build(algorithm, model.parameters())
    frozen = model[2].weight
    before = frozen.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 12)).sum().backward()
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen.detach(), before)


def test_sparse_and_complex_gradients_raise_clearly():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = lp.SOAP(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="complex"):
        lp.SOAP([torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))])


def test_float64_preconditioner_dtype_for_float32_params():
    model = small_model()
    opt = lp.SOAP(model.parameters(), preconditioner_dtype=torch.float64)
    train(model, opt, 3)
    assert all(t.dtype == torch.float64 for b in opt._buckets for t in b.tensors().values())


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "algorithm, kwargs, name",
    [
        (lp.SOAP, dict(lr=-1.0), "lr"),
        (lp.SOAP, dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (lp.SOAP, dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (lp.SOAP, dict(shampoo_beta=1.5), "shampoo_beta"),
        (lp.SOAP, dict(eps=-1.0), "eps"),
        (lp.SOAP, dict(weight_decay=-0.1), "weight_decay"),
        (lp.SOAP, dict(precondition_frequency=0), "precondition_frequency"),
        (lp.SOAP, dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
        (lp.SOAP, dict(preconditioner_dtype=torch.float16), "preconditioner_dtype"),
        (lp.SOAP, dict(refresh="sometimes"), "refresh"),
        (lp.SOAP, dict(refresh_method="lanczos"), "refresh_method"),
        (lp.SOAP, dict(refresh_tolerance=0.0), "refresh_tolerance"),
        (lp.SOAP, dict(refresh_tolerance=1.5), "refresh_tolerance"),
        (lp.SOAP, dict(max_qr_iterations=0), "max_qr_iterations"),
        (lp.SOAP, dict(refresh_check_interval=0), "refresh_check_interval"),
        (lp.SOAP, dict(nonfinite_grad="ignore"), "nonfinite_grad"),
        (lp.SOAP, dict(max_consecutive_failures=0), "max_consecutive_failures"),
        (lp.Shampoo, dict(grafting="lion"), "grafting"),
        (lp.Shampoo, dict(exponent=0.0), "exponent"),
        (lp.Shampoo, dict(betas=(0.9, 1.5)), r"betas\[1\]"),
        (lp.Shampoo, dict(momentum=1.0), "momentum"),
        (lp.Shampoo, dict(nesterov=True), "nesterov"),
        (lp.Shampoo, dict(start_preconditioning_step=0), "start_preconditioning_step"),
        (lp.Shampoo, dict(grafting_beta2=1.0), "grafting_beta2"),
        (lp.KLShampoo, dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(algorithm, kwargs, name):
    with pytest.raises(ValueError, match=name):
        algorithm(small_model().parameters(), **kwargs)


def test_bad_param_group_values_are_rejected_too():
    model = small_model()
    with pytest.raises(ValueError, match="lr"):
        lp.SOAP([{"params": model[0].parameters(), "lr": -1}, {"params": model[2].parameters()}])


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match="max_precond"):
        lp.SOAP(small_model().parameters(), max_precond=3)


# ---------------------------------------------------------------- failures
def test_forced_eigh_failure_keeps_the_old_basis_and_counts(monkeypatch):
    model = small_model()
    opt = lp.EigenvalueCorrectedShampoo(model.parameters(), precondition_frequency=2)
    train(model, opt, 3)  # call 1 builds the bases; t = 1, 2; refreshed at t = 2
    bucket = opt._buckets[0]
    before = {k: v.clone() for k, v in bucket.tensors().items() if k.startswith("basis")}

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="keeping the previous basis"):
        train(model, opt, 2)  # t = 3, 4: the refresh at t = 4 fails
    for key, value in before.items():
        assert torch.equal(bucket.tensors()[key], value), key
    stats = opt.preconditioner_stats(names=model.named_parameters())
    assert all(s.failure_count == 1 for s in stats)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_repeated_eigh_failures_raise_naming_parameter_and_block(monkeypatch):
    model = small_model()
    opt = lp.EigenvalueCorrectedShampoo(model.named_parameters(), precondition_frequency=1,
                                        max_consecutive_failures=2)
    train(model, opt, 2)

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"failed 2 times in a row for 0\.weight block 0\.0"):
            train(model, opt, 3)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_nan_gradient_with_skip_leaves_factors_untouched(algorithm):
    model = small_model()
    opt = build(algorithm, model.parameters(), precondition_frequency=2)
    train(model, opt, 3)
    before = [{k: v.clone() for k, v in b.tensors().items()} for b in opt._buckets]
    weights = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(torch.randn(4, 12)).sum().backward()
    for p in model.parameters():
        if p.dim() == 2:
            p.grad[0, 0] = float("nan")
    opt.step()
    for b, saved in zip(opt._buckets, before):
        for k, v in saved.items():
            assert torch.equal(b.tensors()[k], v), k
    for p, w in zip(model.parameters(), weights):
        if p.dim() == 2:
            assert torch.equal(p.detach(), w)
    assert all(r.skipped_steps == 1 for b in opt._buckets for r in b.records)


def test_nan_gradient_with_raise_names_the_parameter():
    model = small_model()
    opt = lp.SOAP(model.named_parameters(), nonfinite_grad="raise")
    model(torch.randn(4, 12)).sum().backward()
    model[2].weight.grad[1, 1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"2\.weight"):
        opt.step()


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_state_dict_round_trip_is_bitwise(algorithm):
    reference_model = small_model()
    reference = build(algorithm, reference_model.parameters(), precondition_frequency=3)
    train(reference_model, reference, 10, seed=1)

    buffer = io.BytesIO()
    torch.save({"model": reference_model.state_dict(), "opt": reference.state_dict()}, buffer)
    losses_reference = train(reference_model, reference, 20, seed=2)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = small_model(seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = build(algorithm, resumed_model.parameters(), precondition_frequency=3)
    resumed.load_state_dict(saved["opt"])
    losses_resumed = train(resumed_model, resumed, 20, seed=2)
    assert losses_resumed == losses_reference
    for a, b in zip(resumed_model.parameters(), reference_model.parameters()):
        assert torch.equal(a, b)


def test_state_dict_keys_are_standard_and_rank_free():
    model = small_model()
    opt = lp.SOAP(model.parameters())
    train(model, opt, 2)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"]) == {0, 1, 2, 3, 4, 5}
    assert "factor_left" in sd["state"][0]["block0"]
    assert set(sd["state"][1]) == {"adamw"}  # a bias: AdamW state
    assert set(sd["state"][1]["adamw"]) == {"step", "exp_avg", "exp_avg_sq"}


def test_checkpoint_from_another_model_fails_clearly_and_loads_nothing():
    model = small_model()
    opt = lp.SOAP(model.named_parameters())
    train(model, opt, 2)
    other = torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
        torch.nn.Linear(8, 4))
    other_opt = lp.SOAP(other.named_parameters())
    train(other, other_opt, 2)
    before = {k: v.clone() for b in opt._buckets for k, v in b.tensors().items()}
    with pytest.raises(ValueError, match=r"2\.weight"):
        opt.load_state_dict(other_opt.state_dict())
    after = {k: v.clone() for b in opt._buckets for k, v in b.tensors().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_before_first_step_resets_state():
    model = small_model()
    fresh = lp.SOAP(model.parameters()).state_dict()
    opt = lp.SOAP(model.parameters())
    train(model, opt, 3)
    opt.load_state_dict(fresh)
    assert all(not r.initialized for b in opt._buckets for r in b.records)


def test_state_bytes_counts_kl_shampoo_below_soap():
    model = small_model()
    soap, kl = lp.SOAP(model.parameters()), lp.KLShampoo(model.parameters())
    train(model, soap, 1)
    train(model, kl, 1)
    assert 0 < kl.state_bytes() < soap.state_bytes()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_gradient_lr0_step_leaves_no_trace(algorithm):
    """Lightning's / DCP's _init_optim_state steps once with zero gradients and lr 0."""

    def bias_free() -> torch.nn.Module:  # vectors follow torch's AdamW, whose step count advances
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 16, bias=False), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 4, bias=False))

    model, reference_model = bias_free(), bias_free()
    opt, reference = build(algorithm, model.parameters()), build(algorithm, reference_model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    assert all(not r.initialized and r.step == 0 for b in opt._buckets for r in b.records)
    train(model, opt, 5)
    train(reference_model, reference, 5)
    for a, b in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(a, b)


def test_shampoo_under_an_owner_still_gets_roots_when_preconditioning_starts():
    model = small_model()
    opt = lp.Shampoo(model.parameters(), precondition_frequency=100, start_preconditioning_step=3)
    opt.attach_refresh_owner(object())
    train(model, opt, 2)
    assert all(s.refresh_count == 0 for s in opt.preconditioner_stats())
    train(model, opt, 5)
    assert all(s.refresh_count == 1 for s in opt.preconditioner_stats())


def _swap_parameters(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """What a wrapper does when it shards a model after the optimizer was built (Accelerate
    with FSDP2): new Parameter objects, in the module and in the optimizer's param groups."""
    mapping = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            new = torch.nn.Parameter(p.detach().clone())
            setattr(module, name, new)
            mapping[p] = new
    for group in opt.param_groups:
        group["params"] = [mapping[p] for p in group["params"]]


def test_loading_a_fresh_state_does_not_bind_to_parameters_swapped_later():
    """Accelerate's prepare() reloads the fresh optimizer's own state_dict before FSDP2 swaps
    the parameters: the optimizer must then train the new ones."""
    model, reference = small_model(), small_model()
    opt, ref_opt = lp.SOAP(model.parameters(), lr=1e-2), lp.SOAP(reference.parameters(), lr=1e-2)
    opt.load_state_dict(opt.state_dict())
    _swap_parameters(model, opt)
    train(model, opt, 6)
    train(reference, ref_opt, 6)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_parameters_swapped_after_planning_are_refused():
    model = small_model()
    opt = lp.SOAP(model.parameters(), lr=1e-2)
    train(model, opt, 1)
    _swap_parameters(model, opt)
    with pytest.raises(RuntimeError, match="replaced after this optimizer planned"):
        train(model, opt, 1)


# ---------------------------------------------------------------- the design is open
def test_every_registered_optimizer_is_exported_and_in_the_registry():
    exported = {name for name in lp.__all__ if isinstance(getattr(lp, name), type)
                and issubclass(getattr(lp, name), lp.PreconditionedOptimizer)
                and getattr(lp, name) is not lp.PreconditionedOptimizer}
    assert exported == set(REGISTRY)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_stats_and_refresh_work_for_every_algorithm(algorithm):
    """An algorithm without a basis (Muon) has no factor records and nothing to refresh;
    neither call may fail (they used to raise KeyError for anything but two factors)."""
    model = small_model()
    opt = build(algorithm, model.parameters())
    train(model, opt, 3)
    stats = opt.preconditioner_stats()
    refreshed = opt.refresh_eigenbasis()
    if REGISTRY[algorithm].has_basis:
        assert stats and refreshed
    else:
        assert stats == [] and refreshed == []


def test_shampoo_summed_factors_with_adam_grafting_move_the_weights():
    """betas[1] = 1 (AdaGrad-style sums) once made the graft divide by 1 - 1**t = 0."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = lp.Shampoo(model.parameters(), lr=1e-2, betas=(0.9, 1.0))
    before = model[0].weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        opt.zero_grad()
        model(torch.randn(16, 8, generator=gen)).square().mean().backward()
        opt.step()
    moved = (model[0].weight - before).abs().max().item()
    assert torch.isfinite(model[0].weight).all() and moved > 1e-4
    # The graft and the vectors share one resolution of the grafting beta2 (0.999 here).
    assert opt._config(0).graft_beta2 == 0.999 == opt._config(0).vector_adamw()[1]


def test_a_group_with_precondition_false_is_torch_adamw():
    torch.manual_seed(0)
    model = small_model()
    twin = small_model()
    groups = [{"params": model[0].parameters(), "precondition": False, "lr": 2e-3, "weight_decay": 0.1},
              {"params": [*model[2].parameters(), *model[4].parameters()]}]
    opt = lp.SOAP(groups, betas=(0.9, 0.99), eps=1e-7)
    reference = torch.optim.AdamW(twin[0].parameters(), lr=2e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(8, 12, generator=gen)
        for net, optimizer in ((model, opt), (twin, reference)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
        # Same gradient for the AdamW group: only model[0] is compared.
        for a, b in zip(model[0].parameters(), twin[0].parameters()):
            b.grad = a.grad.clone()
        opt.step()
        reference.step()
    for a, b in zip(model[0].parameters(), twin[0].parameters()):
        assert torch.equal(a, b)
    assert all(block.param_index >= 2 for block in opt._plan.blocks)
    assert set(opt.state[model[0].weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_precondition_must_be_a_bool():
    with pytest.raises(ValueError, match="precondition"):
        lp.SOAP([{"params": small_model().parameters(), "precondition": "no"}])


def test_edited_group_values_are_validated_at_step_before_anything_changes():
    model = small_model()
    opt = lp.SOAP(model.parameters())
    train(model, opt, 2)
    weights = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        train(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_vectors_are_torch_adamw_bitwise(algorithm):
    """Vectors run torch's own AdamW kernel with the hyperparameters the algorithm's config
    names for them: float32 trajectories are identical to ``torch.optim.AdamW``'s."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(7, generator=gen)
    ours_param, theirs_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours = REGISTRY[algorithm].optimizer([ours_param], lr=2e-2, weight_decay=0.1)
    beta1, beta2, eps = ours._config(0).vector_adamw()
    theirs = torch.optim.AdamW([theirs_param], lr=2e-2, betas=(beta1, beta2), eps=eps, weight_decay=0.1)
    for _ in range(15):
        grad = torch.randn(7, generator=gen)
        for param, opt in ((ours_param, ours), (theirs_param, theirs)):
            param.grad = grad.clone()
            opt.step()
        assert torch.equal(ours_param, theirs_param)
    assert torch.equal(ours.state[ours_param]["exp_avg_sq"], theirs.state[theirs_param]["exp_avg_sq"])
