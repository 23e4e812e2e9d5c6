"""The presets' options reach users who never read the source: ``help()`` and LightningCLI
list every engine option with its choices and a one-line help, and the CLI builds and trains
with any registered optimizer."""

from __future__ import annotations

import contextlib
import io
import pydoc
import typing

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI, OptimizerCallable

import lightning_precond as lp
from lightning_precond.options import EngineOptionsDict
from lightning_precond.registry import ALGORITHMS

OPTIONS = list(typing.get_type_hints(EngineOptionsDict))


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).square().mean()

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(16, 6, generator=torch.Generator().manual_seed(0)))
        return torch.utils.data.DataLoader(data, batch_size=4)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_help_lists_every_engine_option_with_choices(name):
    text = pydoc.render_doc(ALGORITHMS[name].optimizer, renderer=pydoc.plaintext)
    for option in OPTIONS:
        assert f"{option} (" in text, option
    assert "Literal['skip', 'raise']" in text and "Literal['periodic', 'adaptive']" in text


def test_lightning_cli_help_shows_the_options_with_their_help():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        LightningCLI(TinyModule, run=False, args=["--optimizer.help", "lightning_precond.SOAP"])
    text = out.getvalue()
    for option in [*OPTIONS, "lr", "betas", "precondition_frequency"]:
        assert f"--optimizer.{option}" in text, option
    assert "{skip,raise}" in text and "{periodic,adaptive}" in text
    assert "Staleness above which the adaptive refresh recomputes" in " ".join(text.split())


@pytest.mark.parametrize("name", ["SOAP", "Muon"])
def test_lightning_cli_builds_and_trains_with_engine_options(tmp_path, name):
    args = [
        "fit", f"--optimizer=lightning_precond.{name}", "--optimizer.lr=0.01",
        "--optimizer.nonfinite_grad=raise", "--optimizer.max_preconditioner_dim=4",
        "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = LightningCLI(TinyModule, args=args)
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, getattr(lp, name))
    assert optimizer.options.nonfinite_grad == "raise" and optimizer.options.max_preconditioner_dim == 4
    assert cli.trainer.global_step == 3


def test_a_bad_choice_is_refused_by_the_cli():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        LightningCLI(TinyModule, run=False, args=["--optimizer=lightning_precond.SOAP",
                                                   "--optimizer.refresh=sometimes"])
    assert "refresh" in err.getvalue()


class GroupedModule(TinyModule):
    """The LightningCLI pattern for param groups: the CLI's own ``--optimizer`` builds the
    optimizer from ``self.parameters()``, so the module takes the optimizer as a callable
    (``--model.optimizer=...``) and calls it on :func:`lightning_precond.param_groups`."""

    def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW, vector_lr: float | None = None) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.vector_lr = vector_lr

    def configure_optimizers(self):
        vector = None if self.vector_lr is None else {"lr": self.vector_lr}
        return self.optimizer(lp.param_groups(self, vector=vector))


@pytest.mark.parametrize("name", ["SOAP", "Muon"])
def test_lightning_cli_with_param_groups(tmp_path, name):
    args = [
        "fit", f"--model.optimizer=lightning_precond.{name}", "--model.optimizer.lr=0.01",
        "--model.optimizer.max_preconditioner_dim=4", "--model.vector_lr=0.001",
        "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = LightningCLI(GroupedModule, args=args)
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, getattr(lp, name)) and optimizer.options.max_preconditioner_dim == 4
    assert [(g["role"], g["lr"], g["precondition"]) for g in optimizer.param_groups] == [
        ("hidden", 0.01, True), ("vector", 0.001, False),
    ]
    assert cli.trainer.global_step == 3
