"""Muon: momentum orthogonalized by a Newton–Schulz iteration (Jordan et al. 2024).

Per matrix ``W`` (``m x n``) with gradient ``G`` and buffer ``B``::

    B <- mu B + (1 - mu) G
    X  = (1 - mu) G + mu B            (Nesterov; else X = B)
    O  = NewtonSchulz5(X)             (~ U V^T of X = U S V^T)
    W <- W (1 - lr wd) - lr s O,      s = 0.2 sqrt(max(m, n))  ("rms")  or  sqrt(max(1, m / n))  ("shape")

The "rms" scale gives the update the RMS of a typical AdamW update (about 0.2), so one
learning rate serves the matrices and the AdamW vectors. Newton–Schulz needs the whole
matrix, which is why each matrix is one block, computed by its owner rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .base import Direction, GroupConfig, StepContext, check_beta, check_betas, check_nonnegative, check_positive_int

__all__ = ["MuonConfig", "MuonState", "Orthogonalized", "newton_schulz", "UPDATE_SCALES", "NS_DTYPES"]

UPDATE_SCALES = ("rms", "shape")
NS_DTYPES = ("float32", "float64", "bfloat16", "float16")
# The quintic's coefficients (Jordan's muon.py): steep near 0, singular values end in ~[0.7, 1.2].
_QUINTIC = (3.4445, -4.7750, 2.0315)


def newton_schulz(x: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    """Approximate ``U V^T`` of each matrix of the stack ``x`` ``[k, m, n]``, computed in ``dtype``."""
    a, b, c = _QUINTIC
    out_dtype = x.dtype
    y = x.to(dtype)
    tall = y.shape[-2] > y.shape[-1]
    if tall:
        y = y.mT
    y = y / (y.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = y @ y.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A A
        y = torch.baddbmm(y, poly, y, beta=a)  # a X + (b A + c A A) X
    if tall:
        y = y.mT
    return y.to(out_dtype)


@dataclass(frozen=True, kw_only=True)
class MuonConfig(GroupConfig):
    momentum: float
    nesterov: bool
    ns_steps: int
    # A dtype name (param groups hold plain values: torch.distributed.checkpoint refuses a
    # torch.dtype in them); a torch.dtype is accepted and stored by name.
    ns_dtype: str
    # None: "rms", or "shape" (the original's) when reference=True.
    update_scale: Literal["rms", "shape"] | None
    betas: tuple[float, float]  # the vectors' AdamW
    eps: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check_beta(self.momentum, "momentum")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be a bool, got {self.nesterov!r}")
        check_positive_int(self.ns_steps, "ns_steps")
        if isinstance(self.ns_dtype, torch.dtype):
            object.__setattr__(self, "ns_dtype", str(self.ns_dtype).removeprefix("torch."))
        if self.ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {NS_DTYPES} (or the torch dtype), got {self.ns_dtype!r}")
        if self.update_scale is not None and self.update_scale not in UPDATE_SCALES:
            raise ValueError(f"update_scale must be one of {UPDATE_SCALES} or None, got {self.update_scale!r}")
        if self.reference and self.update_scale == "rms":
            raise ValueError("update_scale='rms' is not the reference's scale: reference=True (KellerJordan's "
                             "muon.py) scales by sqrt(max(1, m / n)); pass update_scale=None or 'shape'")
        check_betas(self.betas)
        check_nonnegative(self.eps, "eps")

    def vector_adamw(self) -> tuple[float, float, float]:
        return float(self.betas[0]), float(self.betas[1]), float(self.eps)

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.ns_dtype)

    @property
    def resolved_update_scale(self) -> str:
        if self.update_scale is not None:
            return self.update_scale
        return "shape" if self.reference else "rms"

    def scale(self, m: int, n: int) -> float:
        if self.resolved_update_scale == "rms":
            return 0.2 * math.sqrt(max(m, n))
        return math.sqrt(max(1.0, m / n))


@dataclass
class MuonState:
    momentum_buffer: Tensor  # [k, m, n]


class Orthogonalized:
    """The Muon algorithm over a bucket: no factors, no basis (``sides == ()``)."""

    config_type: ClassVar[type[GroupConfig]] = MuonConfig
    sides: tuple[str, ...] = ()
    decay_after_update = False
    refresh_method = "eigh"  # unused: there is no basis to refresh
    gradient_headroom = 1.0  # the buffer is an average of gradients; Newton–Schulz normalizes

    def state_shapes(self, m: int, n: int, config: Any, sides: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
        return {"momentum_buffer": (m, n)}

    def state_from(self, tensors: Mapping[str, Tensor]) -> MuonState:
        return MuonState(**tensors)

    def create_state(self, k: int, m: int, n: int, config: Any, dtype: torch.dtype,
                     device: torch.device, sides: tuple[str, ...] = ()) -> MuonState:
        return MuonState(torch.zeros((k, m, n), dtype=dtype, device=device))

    def step(self, state: MuonState, grads: Tensor, ctx: StepContext) -> Direction:
        config: MuonConfig = ctx.config
        mu = config.momentum
        buffer = state.momentum_buffer.lerp_(grads, 1.0 - mu)
        x = grads.lerp(buffer, mu) if config.nesterov else buffer
        m, n = grads.shape[-2], grads.shape[-1]
        return Direction(newton_schulz(x, config.ns_steps, config.compute_dtype), config.lr * config.scale(m, n))

    def refresh_start(self, config: Any) -> int:
        return 0

    def decays_after_update(self, config: Any) -> bool:
        return False

    def refresh_due(self, step: int, config: Any) -> bool:
        return False

    def refresh(self, state: Any, side: str, method: str, tolerance: float, max_iterations: int,
                config: Any = None, product: Tensor | None = None) -> list[bool]:
        raise TypeError("Muon keeps no eigenbasis to refresh")

    def projected(self, state: Any, side: str) -> Tensor:
        raise TypeError("Muon keeps no Kronecker factors")

    def basis_and_product(self, state: Any, side: str) -> tuple[Tensor, Tensor]:
        raise TypeError("Muon keeps no Kronecker factors")

    def eigenvalues_in_use(self, state: Any, side: str) -> Tensor:
        raise TypeError("Muon keeps no Kronecker factors")
