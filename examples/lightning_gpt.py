"""Lightning pieces for the character-level GPT demo: a corpus, a DataModule, a LightningModule.

* :class:`CharCorpus` -- the Shakespeare text tokenised once (vocabulary, train tokens and
  the held-out last 5%), shared by every run of the demo so the text is read and encoded once.
* :class:`ShakespeareDataModule` -- seeded random training windows (the same batches in the
  same order for every run with the same ``seed``) and a fixed list of held-out eval batches.
* :class:`CharGPTModule` -- :class:`CharGPT` plus the optimizer chosen by name (``adamw``, or
  one of the registry's algorithms by its short name: ``soap``, ``shampoo``, ``klshampoo``,
  ``klsoap``, ``ecshampoo``, ...), a linear warm-up and a cosine decay; logs ``train_loss``
  and ``eval_loss``.

Importable as ``examples.lightning_gpt`` (repo root on ``sys.path``, as in the tests) and as
``lightning_gpt`` (``python examples/demo.py`` puts ``examples/`` on the path).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

try:  # imported as examples.lightning_gpt
    from .data import (
        char_vocab,
        encode,
        eval_batches,
        load_shakespeare,
        random_batches,
        train_eval_split,
    )
    from .models import CharGPT
except ImportError:  # imported as a top-level module with examples/ on sys.path
    from data import (
        char_vocab,
        encode,
        eval_batches,
        load_shakespeare,
        random_batches,
        train_eval_split,
    )
    from models import CharGPT

from lightning_precond.registry import ALGORITHMS

__all__ = ["OPTIMIZERS", "REGISTRY_NAMES", "CharCorpus", "CharGPTModule", "ShakespeareDataModule",
           "build_optimizer", "short_name"]

# Short names that are not simply the registry name in lower case.
_SHORT_NAMES = {"EigenvalueCorrectedShampoo": "ecshampoo"}


def short_name(registry_name: str) -> str:
    """The name :class:`CharGPTModule` knows a registered algorithm by (``"SOAP"`` -> ``"soap"``)."""
    return _SHORT_NAMES.get(registry_name, registry_name.lower())


#: Short name -> registry name (lightning_precond/registry.py), for every registered algorithm.
REGISTRY_NAMES: dict[str, str] = {short_name(name): name for name in ALGORITHMS}
#: Optimizer names accepted by :class:`CharGPTModule`: ``adamw`` (``torch.optim.AdamW``) and
#: every registered algorithm.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    **{short: ALGORITHMS[name].optimizer for short, name in REGISTRY_NAMES.items()},
}


def build_optimizer(
    name: str, params: Any, lr: float, weight_decay: float, extra: Mapping[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (a key of :data:`OPTIMIZERS`) over ``params``.

    ``extra`` goes to the constructor as keyword arguments (e.g. ``betas``,
    ``precondition_frequency``); everything else keeps the optimizer's own defaults.

    Raises:
        ValueError: for an unknown ``name``.
    """
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}") from None
    return cls(params, lr=lr, weight_decay=weight_decay, **dict(extra or {}))


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class CharCorpus:
    """A text tokenised at the character level and split into train / held-out tokens."""

    stoi: dict[str, int]
    itos: list[str]
    train: torch.Tensor  # 1-D int64 token ids, the first 95% of the text
    eval: torch.Tensor  # 1-D int64 token ids, the last 5% (never trained on)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @classmethod
    def from_text(cls, text: str, eval_fraction: float = 0.05) -> CharCorpus:
        stoi, itos = char_vocab(text)
        train, held_out = train_eval_split(encode(text, stoi), eval_fraction)
        return cls(stoi, itos, train, held_out)

    @classmethod
    def shakespeare(cls, cache_dir: str | Path | None = None) -> CharCorpus:
        """The complete works of Shakespeare (raises ``DataError`` if they cannot be fetched)."""
        return cls.from_text(load_shakespeare(cache_dir))


class _RandomWindows(IterableDataset):
    """``num_batches`` batches of random windows, drawn afresh from ``seed`` on every iteration.

    Re-seeding in ``__iter__`` is what makes every run see the same batches in the same
    order. It yields whole batches, so its loader uses ``batch_size=None``; ``__len__`` lets
    the progress bar show a total.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, block_size: int, num_batches: int, seed: int) -> None:
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.num_batches, self.seed = num_batches, seed

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        return random_batches(self.tokens, self.batch_size, self.block_size, generator, self.num_batches)


class _FixedBatches(Dataset):
    """A list of pre-built ``(x, y)`` batches (the held-out eval set)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[index]


class ShakespeareDataModule(pl.LightningDataModule):
    """Random training windows and a fixed held-out eval set from a :class:`CharCorpus`.

    Args:
        corpus: the tokenised text; ``None`` loads Shakespeare in :meth:`setup`.
        block_size: characters per window.
        batch_size: training windows per batch.
        train_batches: batches per training epoch (use ``max_steps`` so one epoch is the run).
        eval_batches: number of eval batches, taken in order from the start of the held-out text.
        eval_batch_size: windows per eval batch (default: ``batch_size``).
        seed: seeds the training batches; equal seeds give identical batch sequences.
    """

    def __init__(
        self,
        corpus: CharCorpus | None = None,
        block_size: int = 64,
        batch_size: int = 32,
        train_batches: int = 1000,
        eval_batches: int = 8,
        eval_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size),
                            ("train_batches", train_batches), ("eval_batches", eval_batches)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.corpus = corpus
        self.block_size = block_size
        self.batch_size = batch_size
        self.train_batches = train_batches
        self.eval_batches = eval_batches
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self._eval: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            self.corpus = CharCorpus.shakespeare()
        if self._eval is None:
            self._eval = list(eval_batches(self.corpus.eval, self.eval_batch_size, self.block_size, self.eval_batches))

    def _require_corpus(self) -> CharCorpus:
        if self.corpus is None:
            raise RuntimeError("ShakespeareDataModule.setup() has not run yet")
        return self.corpus

    def train_dataloader(self) -> DataLoader:
        windows = _RandomWindows(self._require_corpus().train, self.batch_size, self.block_size,
                                 self.train_batches, self.seed)
        return DataLoader(windows, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        if self._eval is None:
            raise RuntimeError("ShakespeareDataModule.setup() has not run yet")
        return DataLoader(_FixedBatches(self._eval), batch_size=None)


# --------------------------------------------------------------------------- model
class CharGPTModule(pl.LightningModule):
    """:class:`CharGPT` trained with the optimizer ``optimizer`` (a key of :data:`OPTIMIZERS`).

    The model is built under ``torch.manual_seed(init_seed)`` inside a forked RNG, so every
    module with the same ``init_seed`` starts from the same weights whatever the global RNG
    state. The learning rate warms up linearly for ``warmup_steps`` optimizer steps, then
    follows a cosine from ``lr`` down to ``min_lr_ratio * lr`` at ``total_steps``.

    Logs ``train_loss`` (every ``Trainer.log_every_n_steps``), ``eval_loss`` (mean over
    the validation batches, weighted by batch size) and ``lr`` (of the first param group).
    """

    def __init__(
        self,
        vocab_size: int,
        optimizer: str = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.model = CharGPT(vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(idx)
        return logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        self.log("train_loss", loss, batch_size=x.size(0))
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=x.size(0))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._eval_sum = torch.zeros((), dtype=torch.float64)
        self._eval_count = 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        # Lightning's own reduction feeds the progress bar and trainer.callback_metrics ...
        self.log("eval_loss", loss, batch_size=x.size(0), prog_bar=True, logger=False)
        self._eval_sum += loss.detach().double() * x.size(0)
        self._eval_count += x.size(0)

    def on_validation_epoch_end(self) -> None:
        # ... but the loggers get the value here, stamped with trainer.global_step (optimizer
        # steps completed, as EigenStalenessMonitor uses): Lightning stamps mid-epoch
        # validation metrics with the step count from before the latest optimizer step.
        if self.trainer.sanity_checking or not self._eval_count or not self.trainer.is_global_zero:
            return
        value = float(self._eval_sum / self._eval_count)
        for logger in self.loggers:
            logger.log_metrics({"eval_loss": value}, step=self.trainer.global_step)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for optimizer step ``step`` (0-based)."""
        hp = self.hparams
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        if hp.total_steps is None or hp.total_steps <= hp.warmup_steps:
            return 1.0
        progress = min(1.0, (step - hp.warmup_steps) / (hp.total_steps - hp.warmup_steps))
        return hp.min_lr_ratio + (1.0 - hp.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = build_optimizer(hp.optimizer, self.model.parameters(), hp.lr, hp.weight_decay, hp.optimizer_kwargs)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}
