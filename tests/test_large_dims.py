"""Large dimensions: identity sides (``max_factor_dim``) next to blocking
(``max_preconditioner_dim``), per-group plan options, and large-vocabulary embeddings."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lightning_precond as lp
from lightning_precond.blocks import PlanLimits, plan_blocks
from lightning_precond.options import EngineOptions
from lightning_precond.registry import ALGORITHMS, names
from tests import references as ref
from tests.test_algorithms import run

WITH_SIDES = names(has_basis=True)  # every algorithm with Kronecker factors


def rectangular(rows: int, cols: int, seed: int = 0):
    """0.5 ||X W - Y||^2 / N with W rows x cols: the factor of the shorter side has full rank."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * rows, rows, generator=gen, dtype=torch.float64)
    y = torch.randn(3 * rows, cols, generator=gen, dtype=torch.float64)
    w0 = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.1
    return w0, lambda w: x.T @ (x @ w - y) / x.shape[0]


def assert_trajectory(ours, theirs, rtol: float) -> None:
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        rel = (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()
        assert rel <= rtol, f"step {t + 1}: relative difference {rel:.3e}"


# ---------------------------------------------------------------------------- the plan
def test_a_dim_above_max_factor_dim_is_an_identity_side_and_is_not_cut():
    limits = PlanLimits(max_dim=1024, max_factor_dim=16384)  # any limit: the rule, not the default
    plan = plan_blocks([(50000, 64), (64, 50000), (50000, 4096), (8192, 3072), (20000, 20000)], [0] * 5, limits)
    by_param = [plan.blocks_of(i) for i in range(5)]
    assert [(b.shape, b.identity) for b in by_param[0]] == [((50000, 64), ("left",))]
    assert [(b.shape, b.identity) for b in by_param[1]] == [((64, 50000), ("right",))]
    # The factored side is still blocked; the identity side spans every block.
    assert [(b.row_start, b.col_start, b.shape, b.identity) for b in by_param[2]] == [
        (0, c, (50000, 1024), ("left",)) for c in range(0, 4096, 1024)]
    assert len(by_param[3]) == 8 * 3 and all(b.identity == () for b in by_param[3])
    assert [(b.shape, b.identity) for b in by_param[4]] == [((20000, 20000), ("left", "right"))]
    assert [b.factored(("left", "right")) for b in by_param[0]] == [("right",)]


def test_the_default_keeps_hidden_matrices_whole_and_gives_vocabularies_an_identity_side():
    """Hidden and MLP matrices of 768-8192 wide models (up to Llama-3-70B's 8192 x 28672)
    keep both factors (blocked as before); vocabularies from BERT's 30522 up get an identity
    side on the vocabulary dim."""
    defaults = EngineOptions()
    limits = PlanLimits(defaults.block_limit, defaults.max_factor_dim)
    hidden = [(768, 768), (768, 3072), (3072, 768), (4096, 11008), (4096, 16384), (8192, 8192), (8192, 28672),
              (28672, 8192)]
    vocab = [(30522, 768), (32000, 4096), (50257, 768), (128256, 8192), (50000, 64)]
    plan = plan_blocks(hidden + vocab, [0] * len(hidden + vocab), limits)
    for i, shape in enumerate(hidden):
        assert all(b.identity == () for b in plan.blocks_of(i)), shape
    for i, shape in enumerate(vocab, start=len(hidden)):
        assert {b.identity for b in plan.blocks_of(i)} == {("left",)}, shape
    assert ALGORITHMS["Muon"].optimizer([torch.nn.Parameter(torch.zeros(3, 2))]).options.max_factor_dim is None


# ---------------------------------------------------------------------------- one-sided math
ONE_SIDED = {
    "SOAP": (lambda p, **kw: lp.SOAP(p, lr=3e-2, betas=(0.95, 0.95), shampoo_beta=0.9, precondition_frequency=4,
                                     reference=True, **kw),
             lambda w0, g, ident: ref.soap(w0, g, 24, lr=3e-2, b1=0.95, b2=0.95, bs=0.9, eps=1e-8, wd=0.01,
                                           freq=4, identity=ident), True),
    "KLShampoo": (lambda p, **kw: lp.KLShampoo(p, lr=1e-2, betas=(0.9, 0.95), shampoo_beta=None, precondition_frequency=4,
                                               reference=True,
                                               **kw),
                  lambda w0, g, ident: ref.kl_shampoo(w0, g, 24, lr=1e-2, b1=0.9, beta=0.95, eps=1e-8, wd=0.01,
                                                      freq=4, identity=ident), True),
    "KLSOAP": (lambda p, **kw: lp.KLSOAP(p, lr=1e-2, betas=(0.95, 0.95), shampoo_beta=0.9, precondition_frequency=4,
                                         reference=True, **kw),
               lambda w0, g, ident: ref.kl_shampoo(w0, g, 24, lr=1e-2, b1=0.0, beta=0.9, eps=1e-8, wd=0.01,
                                                   freq=4, adam=(0.95, 0.95), identity=ident), True),
    "EigenvalueCorrectedShampoo": (
        lambda p, **kw: lp.EigenvalueCorrectedShampoo(p, lr=1e-2, betas=(0.9, 0.99), shampoo_beta=0.95,
                                                      weight_decay=0.01, precondition_frequency=4, **kw),
        lambda w0, g, ident: ref.eigenvalue_corrected_shampoo(w0, g, 24, lr=1e-2, b1=0.9, b2=0.99, bs=0.95,
                                                              eps=1e-12, wd=0.01, freq=4, identity=ident), True),
    "Shampoo": (lambda p, **kw: lp.Shampoo(p, lr=1e-2, betas=(0.0, 0.99), epsilon=1e-6, grafting=None,
                                           precondition_frequency=4, start_preconditioning_step=3, **kw),
                lambda w0, g, ident: ref.shampoo(w0, g, 24, lr=1e-2, b2=0.99, eps=1e-6, exponent=0.25, freq=4,
                                                 start=3, identity=ident), False),
    # ASGO keeps one side by construction: the identity side here is also its unpreconditioned one;
    # the reference takes the root's eigenvalues between roots (tests/test_asgo.py checks "current")
    "ASGO": (lambda p, **kw: lp.ASGO(p, lr=2e-2, betas=(0.9, 0.95), precondition_frequency=4,
                                     eigenvalues="refresh", **kw),
             lambda w0, g, ident: ref.asgo(w0, g, 24, lr=2e-2, b1=0.9, b2=0.95, eps=1e-8, wd=0.0, freq=4,
                                           side="right" if ident == ("left",) else "left"), False),
}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(ONE_SIDED))
def test_one_identity_side_matches_the_dense_reference_with_that_side_the_identity(name, side):
    """A 12 x 6 matrix (6 x 12 for the right side) with max_factor_dim=8: the long side is
    the identity, the short one keeps its factor (full rank), against the float64 reference
    with that side's basis fixed at I."""
    assert set(ONE_SIDED) == set(WITH_SIDES)
    build, reference, skips_first = ONE_SIDED[name]
    w0, grad_fn = rectangular(12, 6) if side == "left" else rectangular(6, 12)
    theirs = reference(w0, grad_fn, (side,))
    ours = run(lambda p: build(p, max_factor_dim=8), w0, grad_fn, 24 + skips_first)
    if skips_first:
        assert torch.equal(ours[0], w0)
    assert_trajectory(ours[skips_first:], theirs, 1e-6)


def test_soap_with_both_sides_identity_is_adam():
    """No factor on either side: SOAP is Adam on the gradients after its first (basis-only)
    call; with eps = 0 the two bias-correction placements agree and weight decay is 0, so
    float64 trajectories match torch.optim.AdamW to rounding."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    ours_param, theirs_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours = lp.SOAP([{"params": [ours_param], "max_factor_dim": 6}], lr=1e-2, betas=(0.9, 0.99), eps=0.0,
                   weight_decay=0.0)
    theirs = torch.optim.AdamW([theirs_param], lr=1e-2, betas=(0.9, 0.99), eps=0.0, weight_decay=0.0)
    ours_param.grad = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    ours.step()
    assert torch.equal(ours_param.detach(), start)
    for _ in range(20):
        grad = torch.randn(9, 7, generator=gen, dtype=torch.float64)
        ours_param.grad, theirs_param.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        torch.testing.assert_close(ours_param.detach(), theirs_param.detach(), rtol=1e-12, atol=1e-14)
    assert ours.preconditioner_stats() == []
    assert set(ours._buckets[0].tensors()) == {"exp_avg", "exp_avg_sq"}


# ---------------------------------------------------------------------------- large vocabularies
class TiedLM(torch.nn.Module):
    """Embedding tied to the output head, one hidden matrix and a norm: an LLM's parameter kinds."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.hidden(self.embed(tokens[:-1]))))
        return torch.nn.functional.cross_entropy(self.head(h), tokens[1:])


@pytest.mark.parametrize("name", WITH_SIDES)
def test_large_vocabulary_embedding_has_bounded_state_and_no_warnings(name):
    """``Embedding(50000, 64)`` with a few hundred rows per step getting a gradient: the
    vocabulary side is the identity (state <= 3x the weights for SOAP; 34x when it was blocked
    into 1024-row blocks with their own factors), training raises no warning and no refresh
    fails, and the rows that never had a gradient stay where they were."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(50000, 64)
    start = embed.weight.detach().clone()
    opt = ALGORITHMS[name].build(embed.parameters(), weight_decay=0.0)  # decay would move every row
    gen = torch.Generator().manual_seed(1)
    seen = torch.zeros(50000, dtype=torch.bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(7):  # the short-run settings refresh at step 5
            tokens = torch.randint(0, 50000, (256,), generator=gen)
            seen[tokens] = True
            opt.zero_grad()
            (embed(tokens) - 1.0).square().mean().backward()
            opt.step()
    assert [str(w.message) for w in caught] == []
    weight_bytes = embed.weight.numel() * embed.weight.element_size()
    assert opt.state_bytes() <= 3 * weight_bytes
    stats = opt.preconditioner_stats()
    assert [(s.side, s.dim) for s in stats] == [("right", 64)]
    assert all(s.failure_count == 0 and s.refresh_count >= 1 for s in stats)
    assert torch.isfinite(embed.weight).all()
    assert torch.equal(embed.weight.detach()[~seen], start[~seen])
    assert not torch.equal(embed.weight.detach()[seen], start[seen])


@pytest.mark.parametrize("name", WITH_SIDES)
def test_tied_embedding_and_head_train_without_warnings(name):
    torch.manual_seed(0)
    model = TiedLM(50000, 32)
    opt = ALGORITHMS[name].build(model.parameters())
    gen = torch.Generator().manual_seed(2)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            tokens = torch.randint(0, 300, (65,), generator=gen)  # a small working vocabulary
            opt.zero_grad()
            loss = model.loss(tokens)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert [str(w.message) for w in caught] == []
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]
    embed_param = next(i for i, p in enumerate(opt.param_groups[0]["params"]) if p is model.embed.weight)
    assert {b.identity for b in opt._plan.blocks_of(embed_param)} == {("left",)}
    assert {s.param_name for s in opt.preconditioner_stats()} == {
        f"param group 0 parameter {embed_param}", "param group 0 parameter 1"}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert opt.state_bytes() <= 3.1 * weight_bytes  # the embedding's 2x dominates


@pytest.mark.parametrize("name", WITH_SIDES)
def test_rows_without_gradients_in_factored_blocks_raise_no_warnings(name):
    """With identity sides off, an embedding's blocks have factors whose rows are mostly
    zero (tokens never seen): eigendecompositions must still succeed, without a warning."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(1024, 16)
    # ASGO would precondition the 16 columns only: make it keep the mostly-zero row factor
    one_side = {"side": "left"} if name == "ASGO" else {}
    opt = ALGORITHMS[name].build(embed.parameters(), max_factor_dim=None, max_preconditioner_dim=256, **one_side)
    gen = torch.Generator().manual_seed(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            tokens = torch.randint(0, 1024, (24,), generator=gen)
            opt.zero_grad()
            (embed(tokens) - 1.0).square().mean().backward()
            opt.step()
    assert [str(w.message) for w in caught] == []
    stats = opt.preconditioner_stats()
    assert {s.dim for s in stats if s.side == "left"} == {256}
    assert all(s.failure_count == 0 for s in stats)
    assert torch.isfinite(embed.weight).all()


# ---------------------------------------------------------------------------- per group
def test_plan_options_per_group_override_the_optimizer_wide_ones():
    big = torch.nn.Parameter(torch.randn(40, 6))
    blocked = torch.nn.Parameter(torch.randn(20, 20))
    whole = torch.nn.Parameter(torch.randn(20, 20))
    opt = lp.SOAP([{"params": [big], "max_factor_dim": 32},
                   {"params": [blocked]},
                   {"params": [whole], "max_preconditioner_dim": None}], max_preconditioner_dim=8)
    for p in (big, blocked, whole):
        p.grad = torch.randn_like(p)
    opt.step()
    shapes = [[(b.shape, b.identity) for b in opt._plan.blocks_of(i)] for i in range(3)]
    assert shapes[0] == [((40, 6), ("left",))]
    assert [s for s, _ in shapes[1]] == [(8, 8), (8, 8), (8, 4)] * 2 + [(4, 8), (4, 8), (4, 4)]
    assert shapes[2] == [((20, 20), ())]
    tags = [g["lp_block_plan"] for g in opt.state_dict()["param_groups"]]
    assert tags == ["max_preconditioner_dim=8, max_factor_dim=32, precondition_1d=False",
                    "max_preconditioner_dim=8, max_factor_dim=30000, precondition_1d=False",
                    "max_preconditioner_dim=None, max_factor_dim=30000, precondition_1d=False"]


@pytest.mark.parametrize("key, value", [("max_factor_dim", 0), ("max_factor_dim", 2.5),
                                        ("max_preconditioner_dim", -1), ("max_preconditioner_dim", "big")])
def test_invalid_plan_options_are_refused_naming_them(key, value):
    param = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=key):
        lp.SOAP([param], **{key: value})
    with pytest.raises(ValueError, match=key):
        lp.SOAP([{"params": [param], key: value}])
    opt = lp.SOAP([param])
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], key: value})


def test_muon_refuses_max_factor_dim():
    """Muon keeps no factors: an identity side means nothing there (embeddings go in a
    'precondition': False group instead)."""
    param = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="max_factor_dim does not apply to Muon"):
        lp.Muon([param], max_factor_dim=2)
    with pytest.raises(ValueError, match="max_factor_dim does not apply to Muon"):
        lp.Muon([{"params": [param], "max_factor_dim": 2}])
    lp.Muon([{"params": [param], "max_factor_dim": None}])


def test_editing_a_plan_option_after_the_first_step_is_refused():
    param = torch.nn.Parameter(torch.randn(12, 6))
    opt = lp.SOAP([param])
    param.grad = torch.randn(12, 6)
    opt.step()
    opt.param_groups[0]["max_factor_dim"] = 8
    before = param.detach().clone()
    with pytest.raises(RuntimeError, match="'max_factor_dim' edited after the first step"):
        opt.step()
    assert torch.equal(param.detach(), before)


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", WITH_SIDES)
def test_one_sided_blocks_round_trip_through_a_checkpoint(name):
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))

    def train(net, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            net(torch.randn(16, 6, generator=gen)).square().mean().backward()
            opt.step()

    net = make()
    opt = ALGORITHMS[name].build(net.parameters(), max_factor_dim=32)
    train(net, opt, 6, 1)
    assert {b.identity for b in opt._plan.blocks} == {("left",), ("right",)}
    saved = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict()})
    train(net, opt, 4, 2)
    twin = make()
    twin.load_state_dict(saved["model"])
    resumed = ALGORITHMS[name].build(twin.parameters(), max_factor_dim=32)
    resumed.load_state_dict(saved["opt"])
    train(twin, resumed, 4, 2)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    elsewhere = ALGORITHMS[name].build(make().parameters(), max_factor_dim=None)
    with pytest.raises(ValueError, match="planned with .*max_factor_dim=32"):
        elsewhere.load_state_dict(saved["opt"])


def test_a_checkpoint_tagged_before_identity_sides_loads_when_the_plan_is_the_same():
    """Checkpoints written before max_factor_dim existed say nothing about it: they load
    where no parameter has an identity side, and are refused (by their block state, naming
    max_factor_dim) where one would."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
    opt = lp.SOAP(net.parameters())
    net(torch.randn(4, 6)).square().mean().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group["lp_block_plan"] = "max_preconditioner_dim=1024, precondition_1d=False"
    lp.SOAP(net.parameters()).load_state_dict(saved)
    with pytest.raises(ValueError, match="max_factor_dim"):
        lp.SOAP(net.parameters(), max_factor_dim=32).load_state_dict(saved)
