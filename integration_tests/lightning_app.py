"""A tiny LightningModule whose data depend only on (global step, data-parallel part), so
runs at different world sizes see the same global batches: at world size 2 each rank
takes one half; at world size 1 the two halves are accumulated (``accumulate_grad_batches=2``),
which reproduces DDP's averaged gradient bit for bit."""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from integration_tests.test_ddp import BATCH, batch, make_model
from lightning_precond.registry import ALGORITHMS


class TinyRegression(L.LightningModule):
    def __init__(self, algorithm: str = "SOAP", shard: bool = False, exact: bool = False) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.shard = shard
        # exact: a loss bilinear in integer data, so that every gradient is a dyadic rational
        # that any world size's reduction gives bit for bit (runs at different world sizes
        # are then bitwise comparable; see integration_tests/test_checkpoint_sharding_zero.py).
        self.exact = exact
        self.net = make_model()

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, item: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # The global batch in `parts` slices: one per rank, or two accumulated in one process.
        world = self.trainer.world_size
        parts = world if world > 1 else 2
        part = self.global_rank if world > 1 else batch_idx % 2
        size = BATCH // parts
        rows = slice(part * size, (part + 1) * size)
        if self.exact:
            gen = torch.Generator().manual_seed(1000 + self.global_step)
            loss = torch.zeros(())
            for layer in (m for m in self.net if isinstance(m, torch.nn.Linear)):
                x = torch.randint(-2, 3, (BATCH, layer.in_features), generator=gen).float()[rows]
                y = torch.randint(-2, 3, (BATCH, layer.out_features), generator=gen).float()[rows]
                loss = loss + (y * layer(x)).sum() / size
            self.log("train_loss", loss)
            return loss
        x, y = batch(self.global_step)
        x, y = x[rows], y[rows]
        loss = ((self.net(x) - y) ** 2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return ALGORITHMS[self.algorithm].build(self.parameters())

    def train_dataloader(self) -> DataLoader:
        # The content is unused (see training_step); only its length matters.
        return DataLoader(torch.arange(4096), batch_size=1)

    def flat_params(self) -> torch.Tensor:
        full = []
        for p in self.net.parameters():
            p = p.full_tensor() if type(p).__name__ == "DTensor" else p
            full.append(p.detach().reshape(-1))
        return torch.cat(full)


def save_result(trainer: L.Trainer, out, params: torch.Tensor) -> None:
    """Rank 0 writes ``out/params.pt`` and ``out/world.txt`` (a script running several
    algorithms writes each one's as soon as it is done)."""
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(params, out / "params.pt")
        (out / "world.txt").write_text(str(trainer.world_size))


def exit_cleanly() -> None:
    """Every rank tears the process group down in order and leaves without the interpreter's
    shutdown.

    torch 2.13's gloo sometimes aborts at interpreter exit ("terminate called without an
    active exception", exit -6), after all work is done and written. Seen here about once in
    a dozen 2-rank FSDPStrategy runs, with torch's AdamW as well as ours, even after an
    explicit destroy_process_group; hence ``os._exit`` once everything is flushed.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def finish(trainer: L.Trainer, out, params: torch.Tensor) -> None:
    """:func:`save_result`, then :func:`exit_cleanly`."""
    save_result(trainer, out, params)
    exit_cleanly()
