"""Training tasks for ``benchmarks/convergence.py``: model, batches, loss and a fixed eval set.

Each task is CPU-sized and reads its data offline through ``examples/data.py``:

* ``chargpt`` -- CharGPT (2 layers, n_embd 128, 4 heads, context 64) on the complete
  Shakespeare, next-character cross-entropy; eval on a fixed slice of the held-out last 5%.
* ``mlp`` -- MLP 784-256-256-10 on Fashion-MNIST, cross-entropy; eval on a fixed subset of
  the 10k test images.
* ``autoencoder`` -- the 784-1000-500-250-30 deep autoencoder (mirrored decoder) on
  Fashion-MNIST, per-pixel binary cross-entropy on the logits; eval on the same test subset.
* ``convnet`` -- a LeNet-style conv net (5x5 convolutions, 16 and 32 channels) on
  Fashion-MNIST, cross-entropy; eval on the same test subset.
* ``gpt2`` -- CharGPT in GPT-2's layout at a CPU width: the 50257-row vocabulary with a tied
  head (byte-level tokens spread over the table, ``examples/data.byte_tokens``), width 128,
  2 layers, context 32, batch 8; eval on held-out Shakespeare. It is the shape whose embedding takes
  an identity side (``max_factor_dim``).

Every contender in a run sees the same initial weights (``model_seed``) and the same batches
(drawn once per step from ``data_seed`` and fed to all contenders), so differences come from
the optimizers alone.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(_EXAMPLES) not in sys.path:
    sys.path.insert(0, str(_EXAMPLES))

import data as example_data  # noqa: E402  (examples/data.py)
from models import MLP, CharGPT, ConvNet, DeepAutoencoder  # noqa: E402  (examples/models.py)

__all__ = ["Task", "TASK_NAMES", "build_task"]

TASK_NAMES = ("chargpt", "mlp", "autoencoder", "convnet", "gpt2")


@dataclass
class Task:
    """What the benchmark loop needs to train and evaluate one model."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    batches: Callable[[], Iterator[Any]]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    eval_set: list[Any]
    default_steps: int

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        """Mean loss over the fixed eval set (weighted by batch size)."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for batch in self.eval_set:
            n = batch[0].shape[0]
            total += float(self.loss(model, batch)) * n
            count += n
        model.train(was_training)
        return total / max(count, 1)


def _seeded(factory: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(seed)
        return factory()

    return make


def _language_model(name: str, tokens: torch.Tensor, vocab: int, model: Callable[[], nn.Module], what: str,
                    model_seed: int, data_seed: int, quick: bool, batch_size: int = 16, block: int = 64) -> Task:
    """A next-token task on ``tokens`` (last 5% held out) for a CharGPT-like ``model``."""
    train, held_out = example_data.train_eval_split(tokens, 0.05)
    eval_set = list(example_data.eval_batches(held_out, 32, block, max_batches=2 if quick else 4))

    def batches() -> Iterator[Any]:
        gen = torch.Generator().manual_seed(data_seed)
        return example_data.random_batches(train, batch_size, block, gen)

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return model(x, y)[1]

    return Task(
        name=name,
        description=(f"{what} (vocab {vocab}, context {block}) on Shakespeare, batch {batch_size}; "
                     f"eval: {len(eval_set)} x 32 held-out windows"),
        make_model=_seeded(model, model_seed),
        batches=batches,
        loss=loss,
        eval_set=eval_set,
        default_steps=300,
    )


def _chargpt(model_seed: int, data_seed: int, quick: bool, fashion_root: str | None) -> Task:
    text = example_data.load_shakespeare()
    stoi, itos = example_data.char_vocab(text)
    vocab = len(itos)
    return _language_model(
        "chargpt", example_data.encode(text, stoi), vocab,
        lambda: CharGPT(vocab, block_size=64, n_layer=2, n_head=4, n_embd=128),
        "CharGPT (2 layers, n_embd 128, 4 heads)", model_seed, data_seed, quick)


GPT2_VOCAB = 50257


def _gpt2(model_seed: int, data_seed: int, quick: bool, fashion_root: str | None) -> Task:
    vocab = 2048 if quick else GPT2_VOCAB
    tokens = example_data.byte_tokens(example_data.load_shakespeare(), vocab)
    return _language_model(
        "gpt2", tokens, vocab,
        lambda: CharGPT(vocab, block_size=32, n_layer=2, n_head=4, n_embd=128, tied_head=True),
        "CharGPT in GPT-2's layout (tied head, 2 layers, n_embd 128, 4 heads, byte tokens spread over the table)",
        model_seed, data_seed, quick, batch_size=8, block=32)


@functools.lru_cache(maxsize=2)
def _fashion(root: str | None) -> dict[str, torch.Tensor]:
    # Cached: the MLP and the autoencoder read the same files.
    if root is None:
        return example_data.load_fashion_mnist()
    return example_data.load_fashion_mnist(root)


def _image_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Iterator[Any]:
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]


def _eval_subset(x: torch.Tensor, y: torch.Tensor, n: int, batch_size: int = 500) -> list[Any]:
    # The first n test images: fixed and identical for every contender.
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def _classifier(name: str, model: Callable[[], nn.Module], what: str, model_seed: int, data_seed: int,
                quick: bool, fashion_root: str | None, default_steps: int) -> Task:
    """A Fashion-MNIST classification task (cross-entropy) for ``model``."""
    fm = _fashion(fashion_root)
    batch_size, n_eval = 128, (500 if quick else 2000)

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    return Task(
        name=name,
        description=f"{what} on Fashion-MNIST, batch {batch_size}; eval: first {n_eval} test images",
        make_model=_seeded(model, model_seed),
        batches=lambda: _image_batches(fm["train_x"], fm["train_y"], batch_size, data_seed),
        loss=loss,
        eval_set=_eval_subset(fm["test_x"], fm["test_y"], n_eval),
        default_steps=default_steps,
    )


def _mlp(model_seed: int, data_seed: int, quick: bool, fashion_root: str | None) -> Task:
    return _classifier("mlp", lambda: MLP(784, (256, 256), 10), "MLP 784-256-256-10",
                       model_seed, data_seed, quick, fashion_root, default_steps=300)


def _autoencoder(model_seed: int, data_seed: int, quick: bool, fashion_root: str | None) -> Task:
    fm = _fashion(fashion_root)
    batch_size, n_eval = 128, (500 if quick else 2000)

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, _ = batch
        return F.binary_cross_entropy_with_logits(model.reconstruction_logits(x), x)

    return Task(
        name="autoencoder",
        description=(
            f"Deep autoencoder 784-1000-500-250-30 (mirrored) on Fashion-MNIST, batch {batch_size}, "
            f"per-pixel BCE; eval: first {n_eval} test images"
        ),
        make_model=_seeded(lambda: DeepAutoencoder((784, 1000, 500, 250, 30)), model_seed),
        batches=lambda: _image_batches(fm["train_x"], fm["train_y"], batch_size, data_seed),
        loss=loss,
        eval_set=_eval_subset(fm["test_x"], fm["test_y"], n_eval),
        default_steps=200,
    )


def _convnet(model_seed: int, data_seed: int, quick: bool, fashion_root: str | None) -> Task:
    return _classifier("convnet", lambda: ConvNet((16, 32), 10),
                       "ConvNet (5x5 conv 16, 5x5 conv 32, max-pool, linear)",
                       model_seed, data_seed, quick, fashion_root, default_steps=200)


_BUILDERS = {"chargpt": _chargpt, "mlp": _mlp, "autoencoder": _autoencoder, "convnet": _convnet, "gpt2": _gpt2}


def build_task(
    name: str,
    *,
    model_seed: int = 0,
    data_seed: int = 1,
    quick: bool = False,
    fashion_root: str | None = None,
) -> Task:
    """Build task ``name`` (one of :data:`TASK_NAMES`)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; choose from {TASK_NAMES}")
    return _BUILDERS[name](model_seed, data_seed, quick, fashion_root)
