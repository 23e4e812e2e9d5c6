"""Small models used by the demo and the benchmarks.

Kept deliberately plain (only ``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm``
parameters) so every weight is a 1-D or 2-D tensor that a matrix
preconditioner handles directly, and so runs are cheap on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalSelfAttention", "Block", "CharGPT", "MLP", "DeepAutoencoder", "ConvNet"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask (via fused SDPA)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # [B, T, C] -> [B, H, T, C/H]
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """Minimal causal transformer for character-level language modelling.

    Token + learned position embeddings, ``n_layer`` pre-LN blocks, final
    LayerNorm and a linear head: untied by default (so the embedding and the head
    are separate matrices for the preconditioner), the token embedding's weight
    with ``tied_head=True`` (GPT-2's layout).
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        tied_head: bool = False,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        if tied_head:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2 style: N(0, 0.02) weights, zero biases; LayerNorm keeps its defaults.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx``: ``[B, T]`` token ids. Returns logits ``[B, T, V]`` and the mean
        cross-entropy against ``targets`` (``None`` if no targets)."""
        _, t = idx.shape
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx`` (``[B, T]``) autoregressively."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.block_size:])
            probs = F.softmax(logits[:, -1, :] / max(temperature, 1e-8), dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


class MLP(nn.Module):
    """Fully connected ReLU classifier; inputs with more than 2 dims are flattened."""

    def __init__(
        self, in_dim: int = 784, hidden: Sequence[int] = (256, 256), out_dim: int = 10
    ) -> None:
        super().__init__()
        dims = [in_dim, *hidden]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns class logits ``[B, out_dim]``."""
        return self.net(x.flatten(1))


class DeepAutoencoder(nn.Module):
    """The classic 784-1000-500-250-30 deep autoencoder (Hinton & Salakhutdinov, 2006),
    a standard second-order-optimizer benchmark, with a mirrored decoder.

    Hidden layers use ``activation`` (ReLU by default); the 30-d code layer is
    linear; the output passes through a sigmoid so reconstructions lie in [0, 1].
    """

    def __init__(
        self,
        dims: Sequence[int] = (784, 1000, 500, 250, 30),
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"dims needs at least an input and a code size, got {dims}")
        self.encoder = self._stack(list(dims), activation)
        self.decoder = self._stack(list(reversed(dims)), activation)
        self.out_act = nn.Sigmoid()

    @staticmethod
    def _stack(dims: list[int], activation: type[nn.Module]) -> nn.Sequential:
        # Linear layers with `activation` between them but not after the last one.
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(activation())
        return nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Code vector ``[B, dims[-1]]``."""
        return self.encoder(x.flatten(1))

    def reconstruction_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid output; pair with ``F.binary_cross_entropy_with_logits`` for a stable loss."""
        return self.decoder(self.encode(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[B, dims[0]]`` in ``[0, 1]``."""
        return self.out_act(self.reconstruction_logits(x))


class ConvNet(nn.Module):
    """A small LeNet-style classifier for 28x28 images: two 5x5 convolutions (``channels``)
    with ReLU and 2x2 max-pooling, then a linear layer. Its conv kernels are the
    ``[out, in * 25]`` matrices a preconditioner sees."""

    def __init__(self, channels: Sequence[int] = (16, 32), num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c2 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, 784]`` or ``[B, 1, 28, 28]``; returns class logits ``[B, num_classes]``."""
        return self.classifier(self.features(x.reshape(-1, 1, 28, 28)).flatten(1))
