"""muP transfer: the per-optimizer rules, the param groups, the model-side multipliers."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI, OptimizerCallable

import lightning_precond as lp
from lightning_precond import transfer
from lightning_precond.registry import ALGORITHMS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from models import CharGPT  # noqa: E402  (examples/models.py, the benchmarks' char-GPT)


def gpt(width: int, seed: int = 0, **kwargs) -> CharGPT:
    torch.manual_seed(seed)
    return CharGPT(65, block_size=16, n_layer=2, n_head=4, n_embd=width, **kwargs)


# ---------------------------------------------------------------------------- the rules
# (name, the optimizer at lr 1 without decay, the rule's options)
RULES = {
    "AdamW": (lambda ps: torch.optim.AdamW(ps, lr=1.0, weight_decay=0.0), {}),
    "SOAP": (lambda ps: lp.SOAP(ps, lr=1.0, weight_decay=0.0, precondition_frequency=5), {}),
    "EigenvalueCorrectedShampoo": (lambda ps: lp.EigenvalueCorrectedShampoo(ps, lr=1.0, precondition_frequency=5), {}),
    "Shampoo": (lambda ps: lp.Shampoo(ps, lr=1.0, epsilon=1e-6, precondition_frequency=5), {}),
    "Shampoo-ungrafted": (lambda ps: lp.Shampoo(ps, lr=1.0, epsilon=1e-6, grafting=None, precondition_frequency=5),
                          {"grafting": None}),
    "KLShampoo": (lambda ps: lp.KLShampoo(ps, lr=1.0, weight_decay=0.0, precondition_frequency=5), {}),
    "Muon": (lambda ps: lp.Muon(ps, lr=1.0, weight_decay=0.0), {}),
    "Muon-shape": (lambda ps: lp.Muon(ps, lr=1.0, weight_decay=0.0, update_scale="shape"), {"update_scale": "shape"}),
    "ASGO": (lambda ps: lp.ASGO(ps, lr=1.0, precondition_frequency=5), {}),
}


def last_step_norm(factory, rows: int, cols: int, steps: int, seed: int = 0) -> float:
    """Spectral norm of the last step on a stream of a strong rank-one signal (slowly
    varying in scale) over full-rank noise: the gradients muP's alignment assumption is about."""
    gen = torch.Generator().manual_seed(seed)
    u, v = torch.randn(rows, 1, generator=gen), torch.randn(cols, 1, generator=gen)
    param = torch.nn.Parameter(torch.zeros(rows, cols))
    opt = factory([param])
    for t in range(steps):
        before = param.detach().clone()
        noise = 0.3 * torch.randn(rows, cols, generator=gen) / math.sqrt(cols)
        param.grad = (u @ v.T) * (1 + 0.1 * math.sin(t)) + noise
        opt.step()
    return torch.linalg.matrix_norm(param.detach() - before, ord=2).item()


@pytest.mark.parametrize("aspect", [1, 4])
@pytest.mark.parametrize("variant", list(RULES))
def test_each_rule_makes_the_step_spectral_norm_width_independent(variant, aspect):
    """With the rule's lr, ``lr ||U||_op / sqrt(d_out / d_in)`` is the same at widths 32 and
    128 (within 25%); without it, it moves by the factor the rule corrects (for the rules
    that are not width-independent already)."""
    factory, options = RULES[variant]
    name = variant.split("-")[0]
    widths = (32, 128)
    measured, scaled = [], []
    for w in widths:
        d_out, d_in = aspect * w, w
        norm = last_step_norm(factory, d_out, d_in, steps=100)
        measured.append(norm / math.sqrt(d_out / d_in))
        scaled.append(transfer.lr_rule(name, d_out, d_in, **options) * norm / math.sqrt(d_out / d_in))
    # Newton-Schulz leaves Muon's singular values anywhere in about [0.7, 1.2]: its spectral
    # norm is 1 only within that band
    tolerance = 1.7 if name == "Muon" else 1.25
    assert max(scaled) / min(scaled) < tolerance, (variant, scaled)
    rule_change = (transfer.lr_rule(name, aspect * widths[0], widths[0], **options)
                   / transfer.lr_rule(name, aspect * widths[1], widths[1], **options))
    if rule_change > 1.5:  # the rule corrects something: unscaled, the norm drifts by about that
        assert measured[1] / measured[0] > 0.6 * rule_change, (variant, measured)


def test_spectral_normalization_rule_and_validation():
    assert transfer.lr_rule("SOAP", 512, 128, spectral_normalization=True) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        transfer.lr_rule("Adam", 4, 4)
    with pytest.raises(ValueError, match="d_in must be a positive int"):
        transfer.lr_rule("SOAP", 4, 0)
    with pytest.raises(ValueError, match=r"optimizer_options\['grafting'\] for Shampoo must be one of"):
        transfer.lr_rule("Shampoo", 4, 4, grafting="sgd")
    with pytest.raises(ValueError, match="does not change SOAP's rule"):
        transfer.lr_rule("SOAP", 4, 4, grafting=None)


# ---------------------------------------------------------------------------- the engine hook
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_spectral_normalization_makes_every_block_step_lr_in_spectral_norm(algorithm):
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(12, 20, generator=gen))
    bias = torch.nn.Parameter(torch.randn(12, generator=gen))
    lr = 0.05
    opt = ALGORITHMS[algorithm].build([{"params": [weight], "spectral_normalization": True}, {"params": [bias]}],
                                      lr=lr, weight_decay=0.0)
    reference_bias = torch.nn.Parameter(bias.detach().clone())
    adamw = torch.optim.AdamW([reference_bias], lr=lr, betas=opt._config(1).vector_adamw()[:2],
                              eps=opt._config(1).vector_adamw()[2], weight_decay=0.0)
    norms = []
    for _ in range(6):
        before = weight.detach().clone()
        weight.grad = torch.randn(12, 20, generator=gen)
        bias.grad = torch.randn(12, generator=gen)
        reference_bias.grad = bias.grad.clone()
        opt.step()
        adamw.step()
        if not torch.equal(weight, before):  # SOAP & co: the first call builds the basis
            norms.append(torch.linalg.matrix_norm(weight.detach() - before, ord=2).item())
    assert norms and all(n == pytest.approx(lr, rel=1e-4) for n in norms), norms
    torch.testing.assert_close(bias, reference_bias)  # vectors are AdamW, not normalized


def test_spectral_normalization_must_be_a_bool():
    with pytest.raises(ValueError, match="spectral_normalization must be a bool"):
        lp.SOAP([{"params": [torch.nn.Parameter(torch.zeros(3, 3))], "spectral_normalization": 1}])


# ---------------------------------------------------------------------------- param groups
def _by_name(groups):
    return {name: group for group in groups for name, _ in group["params"]}


@pytest.mark.parametrize("optimizer", ["SOAP", "Shampoo", "KLShampoo", "Muon", "ASGO", "AdamW"])
def test_param_groups_apply_each_roles_rule(optimizer):
    base, model = gpt(32), gpt(128)
    lr, wd = 1e-2, 1e-3
    groups = transfer.param_groups(model, base_model=base, lr=lr, weight_decay=wd, optimizer=optimizer)
    by_name = _by_name(groups)
    # every trainable parameter exactly once, each with the role lightning_precond.param_groups gives it
    assert sorted(by_name) == sorted(n for n, _ in model.named_parameters())
    assert {n: g["role"] for n, g in by_name.items()} == lp.param_roles(model)
    preconditioned = optimizer != "AdamW"
    decoupled = optimizer == "AdamW"

    def decay(group):
        return group["weight_decay"] * group["lr"] if decoupled else group["weight_decay"]

    for pname, group in by_name.items():
        param = dict(model.named_parameters())[pname]
        if group["role"] == "vector":
            assert group["lr"] == lr and decay(group) == 0.0
            continue
        assert decay(group) == pytest.approx(wd / 4)  # independent decay ~ 1 / width
        if group["role"] == "hidden":
            d_out, d_in = param.shape
            rule = optimizer if preconditioned else "AdamW"
            expected = transfer.lr_rule(rule, d_out, d_in) / transfer.lr_rule(rule, d_out // 4, d_in // 4)
            assert group["lr"] == pytest.approx(lr * expected), pname
        else:  # embedding (fan-in: the vocabulary) and head (the output multiplier scales it): AdamW's lr
            assert group["lr"] == pytest.approx(lr), pname
    if optimizer == "AdamW":
        assert all("precondition" not in g for g in groups)
        opt = torch.optim.AdamW(groups, lr=lr)
        _, loss = model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
        loss.backward()
        opt.step()


def test_the_head_without_output_multiplier_takes_adamws_hidden_rule():
    groups = transfer.param_groups(gpt(128), base_model=gpt(32), lr=1e-2, weight_decay=0.0, output_multiplier=False)
    assert _by_name(groups)["head.weight"]["lr"] == pytest.approx(1e-2 / 4)


def test_base_widths_give_the_same_groups_as_a_base_model():
    model = gpt(128)
    from_model = transfer.param_groups(model, base_model=gpt(32), lr=1e-2, weight_decay=1e-3, optimizer="Muon")
    from_widths = transfer.param_groups(model, base_widths={128: 32, 384: 96, 512: 128}, lr=1e-2,
                                        weight_decay=1e-3, optimizer="Muon")
    strip = [{k: ([n for n, _ in v] if k == "params" else v) for k, v in g.items()} for g in from_model]
    assert strip == [{k: ([n for n, _ in v] if k == "params" else v) for k, v in g.items()} for g in from_widths]


def test_spectral_normalization_groups_carry_the_engine_key_and_the_spectral_rule():
    groups = transfer.param_groups(gpt(128), base_model=gpt(32), lr=1e-2, weight_decay=0.0, optimizer="SOAP",
                                   spectral_normalization=True)
    hidden = [g for g in groups if g["role"] == "hidden"]
    assert hidden and all(g["spectral_normalization"] is True for g in hidden)
    assert all(g["lr"] == pytest.approx(1e-2) for g in hidden)  # sqrt(d_out / d_in) keeps its ratio
    assert all("spectral_normalization" not in g for g in groups if g["role"] != "hidden")
    lp.SOAP(groups, weight_decay_mode="independent")


def test_role_options_and_overrides_reach_the_role_groups():
    groups = transfer.param_groups(gpt(64), base_model=gpt(32), lr=1e-2, weight_decay=0.0,
                                   role_options={"embedding": {"lr": 1e-3}}, overrides={"pos_emb.weight": None})
    by_name = _by_name(groups)
    assert "pos_emb.weight" not in by_name and by_name["tok_emb.weight"]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "exactly one of base_model and base_widths"),
    ({"base_model": gpt(32), "base_widths": {64: 32}}, "exactly one of base_model and base_widths"),
    ({"base_widths": {64: 0}}, "base_widths values must be positive ints"),
    ({"base_widths": {}}, "base_widths must be a non-empty mapping"),
    ({"base_model": torch.nn.Linear(2, 2)}, "base_model has no parameter"),
    ({"base_widths": {64: 32}, "optimizer": "Lion"}, "optimizer must be one of"),
    ({"base_widths": {64: 32}, "optimizer_options": {"update_scale": "rms"}}, "does not change SOAP's rule"),
    ({"base_widths": {64: 32}, "optimizer": "AdamW", "spectral_normalization": True}, "spectral_normalization needs"),
    ({"base_widths": {64: 32}, "weight_decay_mode": "coupled"}, "weight_decay_mode must be one of"),
    ({"base_widths": {64: 32}, "role_options": {"hiden": {}}}, "role_options must map roles"),
    ({"base_widths": {64: 32}, "spectral_normalization": "yes"}, "spectral_normalization must be a bool"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        transfer.param_groups(gpt(64), lr=1e-2, weight_decay=0.0, **kwargs)


@pytest.mark.parametrize(("lr", "weight_decay", "match"), [(-1.0, 0.0, "lr must be"), (1e-2, float("nan"), "weight_decay must be")])
def test_bad_lr_and_weight_decay(lr, weight_decay, match):
    with pytest.raises(ValueError, match=match):
        transfer.param_groups(gpt(64), base_widths={64: 32}, lr=lr, weight_decay=weight_decay)


# ---------------------------------------------------------------------------- model-side multipliers
def test_init_gives_mup_scales_on_the_char_gpt():
    model, base = gpt(256), gpt(64)
    layer_norm = model.blocks[0].ln1.weight.detach().clone()
    transfer.init_(model, base_model=base, std=0.02)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02 * math.sqrt(64 / 256), rel=0.05)
    assert model.blocks[0].mlp[2].weight.std().item() == pytest.approx(0.02 * math.sqrt(256 / 1024), rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.equal(model.blocks[0].ln1.weight, layer_norm)
    transfer.init_(model, base_model=base, zero_head=False)
    assert model.head.weight.std().item() == pytest.approx(0.02 * math.sqrt(64 / 256), rel=0.05)
    with pytest.raises(ValueError, match="std must be"):
        transfer.init_(model, base_model=base, std=0.0)


def test_output_multiplier_scales_the_logits_of_the_char_gpt():
    model = gpt(128)
    tokens = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(0))
    plain, _ = model(tokens)
    factor = transfer.output_multiplier(model, base_model=gpt(32))
    assert factor == pytest.approx(32 / 128)
    handle = transfer.scale_output(model.head, factor)
    torch.testing.assert_close(model(tokens)[0], plain * factor)
    handle.remove()
    torch.testing.assert_close(model(tokens)[0], plain)
    tied = gpt(128, tied_head=True)
    assert transfer.output_multiplier(tied, base_widths={128: 64}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="factor must be"):
        transfer.scale_output(model.head, -1.0)


def test_residual_multiplier_and_a_branch_scaled_by_it():
    assert transfer.residual_multiplier(8, 2) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="base_depth must be a positive int"):
        transfer.residual_multiplier(4, 0)
    model = gpt(32)
    block = model.blocks[0]
    x = torch.randn(1, 4, 32)
    branch = block.mlp(block.ln2(x + block.attn(block.ln1(x))))
    plain = block(x)
    transfer.scale_output(block.mlp, transfer.residual_multiplier(4, 2))
    torch.testing.assert_close(block(x), plain - 0.5 * branch)


# ---------------------------------------------------------------------------- Lightning
class TransferGPT(pl.LightningModule):
    """The LightningCLI pattern (tests/test_cli.py): the optimizer as a callable, called on
    the transfer groups in ``configure_optimizers``."""

    def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW, width: int = 64, base_width: int = 32,
                 rule: str = "SOAP", lr: float = 1e-2, weight_decay: float = 1e-3) -> None:
        super().__init__()
        self.net = gpt(width)
        self.base = {width: base_width, 3 * width: 3 * base_width, 4 * width: 4 * base_width}
        transfer.init_(self.net, base_widths=self.base)
        transfer.scale_output(self.net.head, transfer.output_multiplier(self.net, base_widths=self.base))
        self.optimizer, self.rule, self.lr, self.weight_decay = optimizer, rule, lr, weight_decay

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x[:, :-1], x[:, 1:])[1]

    def train_dataloader(self):
        data = torch.randint(0, 65, (8, 9), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)

    def configure_optimizers(self):
        groups = transfer.param_groups(self.net, base_widths=self.base, lr=self.lr, weight_decay=self.weight_decay,
                                       optimizer=self.rule)
        return self.optimizer(groups)


def test_lightning_cli_trains_with_transfer_groups(tmp_path):
    args = [
        "fit", "--model.optimizer=lightning_precond.SOAP", "--model.optimizer.weight_decay_mode=independent",
        "--model.rule=SOAP", "--model.width=64", "--model.base_width=32",
        "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = LightningCLI(TransferGPT, args=args)
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, lp.SOAP) and optimizer.options.weight_decay_mode == "independent"
    expected = transfer.param_groups(cli.model.net, base_widths=cli.model.base, lr=1e-2, weight_decay=1e-3)
    assert [(g["role"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (g["role"], g["lr"], g["weight_decay"]) for g in expected]
    assert cli.trainer.global_step == 3


def test_the_optimizer_may_be_given_as_its_class():
    model, base = gpt(64), gpt(32)
    by_class = transfer.param_groups(model, base_model=base, lr=1e-2, weight_decay=0.0, optimizer=lp.Muon)
    by_name = transfer.param_groups(model, base_model=base, lr=1e-2, weight_decay=0.0, optimizer="Muon")
    assert [g["lr"] for g in by_class] == [g["lr"] for g in by_name]
    adamw = transfer.param_groups(model, base_model=base, lr=1e-2, weight_decay=0.0, optimizer=torch.optim.AdamW)
    assert all("precondition" not in g for g in adamw)
