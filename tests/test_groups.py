"""``param_groups``: the LLM split (hidden matrices preconditioned, embeddings / heads / norms /
biases on AdamW), its overrides, and runs of every registered optimizer on its groups."""

from __future__ import annotations

import math
import re
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from examples.models import CharGPT
from lightning_precond import PreconditionedOptimizer, param_groups, param_roles
from lightning_precond.groups import ROLES
from lightning_precond.registry import ALGORITHMS

VOCAB, WIDTH = 37, 16


def _gpt(tied: bool) -> CharGPT:
    torch.manual_seed(0)
    return CharGPT(VOCAB, block_size=8, n_layer=2, n_head=2, n_embd=WIDTH, tied_head=tied)


def _tokens(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (batch, 8), generator=g), torch.randint(0, VOCAB, (batch, 8), generator=g)


def _names(group: dict[str, Any]) -> list[str]:
    return [name for name, _ in group["params"]]


def _by_role(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {group["role"]: group for group in groups}


HIDDEN = [f"blocks.{i}.{w}" for i in range(2) for w in ("attn.qkv.weight", "attn.proj.weight", "mlp.0.weight", "mlp.2.weight")]


# ---------------------------------------------------------------------------- the split
def test_untied_gpt_split() -> None:
    model = _gpt(tied=False)
    groups = param_groups(model)
    assert [g["role"] for g in groups] == list(ROLES)
    roles = _by_role(groups)
    assert _names(roles["hidden"]) == HIDDEN
    assert _names(roles["embedding"]) == ["tok_emb.weight", "pos_emb.weight"]
    assert _names(roles["head"]) == ["head.weight"]
    assert all(name.endswith(("bias", "ln1.weight", "ln2.weight", "ln_f.weight")) for name in _names(roles["vector"]))
    # Defaults: only hidden matrices preconditioned; biases and norms without weight decay.
    assert [(g["role"], g["precondition"], g.get("weight_decay")) for g in groups] == [
        ("hidden", True, None), ("embedding", False, None), ("head", False, None), ("vector", False, 0.0),
    ]
    # Every parameter exactly once, as named_parameters() names it.
    assert sorted(n for g in groups for n in _names(g)) == sorted(n for n, _ in model.named_parameters())


def test_tied_head_appears_once_as_the_embedding() -> None:
    model = _gpt(tied=True)
    assert model.head.weight is model.tok_emb.weight
    roles = _by_role(param_groups(model))
    assert "head" not in roles
    assert _names(roles["embedding"]) == ["tok_emb.weight", "pos_emb.weight"]
    tensors = [p for g in roles.values() for _, p in g["params"]]
    assert len(tensors) == len({id(p) for p in tensors}) == len(list(model.parameters()))
    # Patterns see the tied tensor under both names; it keeps its first name.
    assert param_roles(model, overrides={"head.weight": "head"})["tok_emb.weight"] == "head"


def test_conv_net_split_and_type_overrides() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    assert param_roles(model) == {
        "0.weight": "hidden", "0.bias": "vector", "1.weight": "vector", "1.bias": "vector",
        "3.weight": "hidden", "5.weight": "hidden", "5.bias": "vector",  # no embedding: no head guessed
    }
    # By type: the classifier on AdamW; BatchNorm left out (first match wins: the bias of the
    # Linear is caught by the earlier nn.Linear entry).
    roles = param_roles(model, overrides={nn.Linear: "head", nn.BatchNorm2d: None})
    assert roles["5.weight"] == roles["5.bias"] == "head"
    assert roles["1.weight"] is None and roles["1.bias"] is None
    groups = param_groups(model, overrides={nn.Linear: "head", nn.BatchNorm2d: None})
    assert sum(len(g["params"]) for g in groups) == 5
    x = torch.randn(2, 3, 8, 8)
    opt = ALGORITHMS["SOAP"].build(groups)
    model(x).square().mean().backward()
    opt.step()
    # Conv weights are preconditioned (out x in*kh*kw); the classifier is not.
    assert {s.param_name for s in opt.preconditioner_stats()} == {"0.weight", "3.weight"}


def test_pattern_overrides_glob_and_regex_in_order() -> None:
    model = _gpt(tied=False)
    roles = param_roles(
        model,
        overrides={
            "blocks.1.mlp.*.weight": "vector",  # first match wins over the next entry
            re.compile(r"blocks\.\d\.mlp\..*"): "head",
            "head.weight": "hidden",
            "pos_emb.*": None,
        },
    )
    assert roles["blocks.1.mlp.0.weight"] == roles["blocks.1.mlp.2.weight"] == "vector"
    assert roles["blocks.0.mlp.0.weight"] == roles["blocks.0.mlp.0.bias"] == "head"
    assert roles["head.weight"] == "hidden" and roles["pos_emb.weight"] is None
    assert roles["blocks.0.attn.qkv.weight"] == "hidden" and roles["tok_emb.weight"] == "embedding"
    groups = param_groups(model, overrides={"pos_emb.*": None})
    assert "pos_emb.weight" not in [n for g in groups for n in _names(g)]


def test_role_options_merge_over_the_defaults() -> None:
    groups = _by_role(
        param_groups(
            _gpt(tied=True), embedding={"lr": 1e-3, "weight_decay": 0.0}, vector={"lr": 2e-3}, hidden={"lr": 5e-3}
        )
    )
    assert groups["embedding"] | {"params": None} == {
        "params": None, "role": "embedding", "precondition": False, "lr": 1e-3, "weight_decay": 0.0,
    }
    assert groups["vector"]["weight_decay"] == 0.0 and groups["vector"]["lr"] == 2e-3
    assert groups["hidden"]["precondition"] is True and groups["hidden"]["lr"] == 5e-3
    # Opting the embedding back in.
    assert _by_role(param_groups(_gpt(tied=True), embedding={"precondition": True}))["embedding"]["precondition"]


def test_frozen_parameters_and_bare_tensors() -> None:
    model = _gpt(tied=False)
    model.blocks[0].requires_grad_(False)
    names = [n for g in param_groups(model) for n in _names(g)]
    assert not any(n.startswith("blocks.0.") for n in names)
    everything = param_groups(model, include_frozen=True, named=False)
    assert sum(len(g["params"]) for g in everything) == len(list(model.parameters()))
    assert all(isinstance(p, torch.Tensor) for g in everything for p in g["params"])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: param_groups(m, overrides={"head.weight": "frozen"}), ValueError, "must be one of"),
        (lambda m: param_groups(m, overrides={"heads.weight": "hidden"}), ValueError, r"\['heads.weight'\] match no"),
        (lambda m: param_groups(m, overrides={nn.Conv2d: "hidden"}), ValueError, "match no"),
        (lambda m: param_groups(m, overrides={3: "hidden"}), TypeError, "overrides key 3"),
        (lambda m: param_groups(m, overrides=[("head.weight", "hidden")]), TypeError, "overrides must be a mapping"),
        (lambda m: param_groups(m, vector={"role": "x"}), ValueError, r"vector options may not set \['role'\]"),
        (lambda m: param_groups(m, embedding={"params": []}), ValueError, "embedding options may not set"),
        (lambda m: param_groups(m, head=0.1), TypeError, "head must be a mapping"),
        (lambda m: param_groups(m, overrides={"*": None}), ValueError, "no parameter to optimize"),
        (lambda m: param_groups(m.parameters()), TypeError, "must be an nn.Module"),
    ],
)
def test_bad_arguments_are_refused(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call(_gpt(tied=False))


# ---------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_every_optimizer_trains_on_the_groups(name: str, tied: bool) -> None:
    model = _gpt(tied)
    opt = ALGORITHMS[name].build(param_groups(model))
    x, y = _tokens()
    losses = []
    for _ in range(4):
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert [g["role"] for g in opt.param_groups] == [r for r in ROLES if not (tied and r == "head")]
    stats = opt.preconditioner_stats()
    if ALGORITHMS[name].has_basis:
        # Factors only for the hidden matrices; embeddings and heads hold AdamW state.
        assert {s.param_name for s in stats} == set(HIDDEN)
    for param in (model.tok_emb.weight, model.head.weight, model.ln_f.weight):
        assert "adamw" in opt.state_dict()["state"][_index(opt, param)], name


def _index(opt: torch.optim.Optimizer, param: torch.Tensor) -> int:
    flat = [p for g in opt.param_groups for p in g["params"]]
    return next(i for i, p in enumerate(flat) if p is param)


def test_torch_adamw_takes_the_groups() -> None:
    model = _gpt(tied=True)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    x, y = _tokens()
    model(x, y)[1].backward()
    opt.step()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.01, 0.0]


# ---------------------------------------------------------------------------- Lightning
class GPTModule(pl.LightningModule):
    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.model = _gpt(tied)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.model(x, y)[1]

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        x, y = _tokens(16)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return ALGORITHMS["SOAP"].optimizer(param_groups(self, embedding={"lr": 1e-3}), lr=3e-3)


@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
def test_lightning_configure_optimizers(tmp_path: Any) -> None:
    module = GPTModule()
    before = module.model.tok_emb.weight.detach().clone()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module)
    assert trainer.global_step == 3
    opt = trainer.optimizers[0]
    assert isinstance(opt, PreconditionedOptimizer)
    assert [(g["role"], g["lr"]) for g in opt.param_groups] == [("hidden", 3e-3), ("embedding", 1e-3), ("vector", 3e-3)]
    assert opt.param_groups[1]["param_names"] == ["model.tok_emb.weight", "model.pos_emb.weight"]
    assert not torch.equal(before, module.model.tok_emb.weight)
