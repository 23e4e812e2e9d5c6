"""Optimizer-wide options, shared by every algorithm (per-group hyperparameters live in each
algorithm's config, see :mod:`lightning_precond.algorithms`).

:class:`EngineOptionsDict` is the same set as a ``TypedDict``, so the presets' ``**options``
are typed (``Unpack[EngineOptionsDict]``): type checkers, ``help()`` and LightningCLI see
every option with its choices.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypedDict

import torch

from .algorithms.base import check_nonnegative, check_positive_int
from .algorithms.eigenbasis import REFRESH_METHODS

__all__ = ["EngineOptions", "EngineOptionsDict", "NONFINITE_POLICIES", "REFRESH_MODES", "WEIGHT_DECAY_MODES",
           "check_dim_limit",
           "check_tolerance", "options_help"]

NONFINITE_POLICIES = ("skip", "raise")
WEIGHT_DECAY_MODES = ("decoupled", "independent")
REFRESH_MODES = ("periodic", "adaptive")
_COMMUNICATION_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16, torch.float16)


class EngineOptionsDict(TypedDict, total=False):
    """The optimizer-wide keyword options of every preset.

    Args:
        max_preconditioner_dim: Largest side of a block; larger dims are cut into blocks (None: whole matrices); a param group may set its own.
        max_factor_dim: A side of a parameter's matrix view longer than this gets no factor: an identity side, not cut into blocks (None: every side gets one); a param group may set its own.
        preconditioner_dtype: Dtype of factors, bases and moments (None: float32, or float64 for float64 parameters).
        refresh: "periodic": refresh every precondition_frequency steps; "adaptive": when stale.
        refresh_method: How bases are refreshed (None: the algorithm's own).
        refresh_tolerance: Staleness above which the adaptive refresh recomputes a basis, in (0, 1].
        refresh_check_interval: Steps between staleness checks of the adaptive refresh.
        max_qr_iterations: Iteration cap of the warm-started QR algorithm.
        nonfinite_grad: What a non-finite gradient does: skip the block's step, or raise.
        max_consecutive_failures: Consecutive refresh failures of one factor before step() raises.
        precondition_1d: Precondition vectors as 1 x n matrices instead of AdamW.
        distributed: "auto" (detect the backend), None (each rank alone), a module (FSDP1) or a process group.
        communication_dtype: Dtype of the routing collectives (None: float32, float64 for float64 state).
        maximize: Maximize the objective (every gradient is negated), as in torch.optim.
        foreach: torch.optim's flag: None or False only (False: the vectors' AdamW runs torch's for-loop kernel).
        fused: torch.optim's flag: None or False only (no fused kernel).
        capturable: torch.optim's flag: False only (no CUDA-graph capture).
        differentiable: torch.optim's flag: False only (step() is not differentiable).
        checkpoint_timeout: Seconds the writer of a full state_dict() waits for the other ranks to join before raising.
        weight_decay_mode: "decoupled": W <- (1 - lr * weight_decay) W (AdamW's); "independent": W <- (1 - weight_decay) W, not scaled by lr (the muP 1/width rule's), for blocks and vectors alike.
    """

    max_preconditioner_dim: int | None
    max_factor_dim: int | None
    preconditioner_dtype: torch.dtype | None
    refresh: Literal["periodic", "adaptive"]
    refresh_method: Literal["eigh", "qr", "power"] | None
    refresh_tolerance: float
    refresh_check_interval: int
    max_qr_iterations: int
    nonfinite_grad: Literal["skip", "raise"]
    max_consecutive_failures: int
    precondition_1d: bool
    distributed: Any
    communication_dtype: torch.dtype | None
    maximize: bool
    foreach: bool | None
    fused: bool | None
    capturable: bool
    differentiable: bool
    checkpoint_timeout: float
    weight_decay_mode: Literal["decoupled", "independent"]


def check_dim_limit(value: Any, name: str) -> None:
    """A dimension limit: None (no limit) or a positive int."""
    if value is not None:
        check_positive_int(value, name)


def check_tolerance(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """Optimizer-wide options (see :class:`EngineOptionsDict` for their meaning).

    ``max_factor_dim``'s default, 30000, was chosen by measurement (README, "Large
    dimensions"; ``benchmarks/large_dims.py``): every hidden and MLP matrix of the common
    768-8192 wide models (up to Llama-3-70B's 8192 x 28672) keeps both factors, and every
    common vocabulary (30522 and up) gets an identity side, which takes SOAP's state of
    ``Embedding(50000, 64)`` from 34x its weights to 2.0x and its first step from 22 s to 0.3 s.
    """

    NO_LIMIT: ClassVar[int] = 2**62  # max_preconditioner_dim=None: whole matrices

    max_preconditioner_dim: int | None = 1024
    max_factor_dim: int | None = 30000
    preconditioner_dtype: torch.dtype | None = None
    refresh: str = "periodic"
    refresh_method: str | None = None
    refresh_tolerance: float = 0.1
    refresh_check_interval: int = 10
    max_qr_iterations: int = 10
    nonfinite_grad: str = "skip"
    max_consecutive_failures: int = 3
    precondition_1d: bool = False
    distributed: Any = "auto"
    communication_dtype: torch.dtype | None = None
    maximize: bool = False
    foreach: bool | None = None
    fused: bool | None = None
    capturable: bool = False
    differentiable: bool = False
    checkpoint_timeout: float = 60.0
    weight_decay_mode: str = "decoupled"

    def __post_init__(self) -> None:
        check_dim_limit(self.max_preconditioner_dim, "max_preconditioner_dim")
        check_dim_limit(self.max_factor_dim, "max_factor_dim")
        if self.preconditioner_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(
                "preconditioner_dtype must be None, torch.float32 or torch.float64, "
                f"got {self.preconditioner_dtype}"
            )
        if self.refresh not in REFRESH_MODES:
            raise ValueError(f"refresh must be one of {REFRESH_MODES}, got {self.refresh!r}")
        if self.refresh_method is not None and self.refresh_method not in REFRESH_METHODS:
            raise ValueError(f"refresh_method must be one of {REFRESH_METHODS}, got {self.refresh_method!r}")
        check_tolerance(self.refresh_tolerance, "refresh_tolerance")
        check_positive_int(self.refresh_check_interval, "refresh_check_interval")
        check_positive_int(self.max_qr_iterations, "max_qr_iterations")
        if self.nonfinite_grad not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_grad must be one of {NONFINITE_POLICIES}, got {self.nonfinite_grad!r}")
        check_positive_int(self.max_consecutive_failures, "max_consecutive_failures")
        if not isinstance(self.precondition_1d, bool):
            raise ValueError(f"precondition_1d must be a bool, got {self.precondition_1d!r}")
        if self.communication_dtype not in _COMMUNICATION_DTYPES:
            raise ValueError(
                "communication_dtype must be None or a floating dtype (float32, float64, bfloat16, "
                f"float16), got {self.communication_dtype}"
            )
        check_nonnegative(self.checkpoint_timeout, "checkpoint_timeout")
        if self.checkpoint_timeout == 0:
            raise ValueError("checkpoint_timeout must be > 0 seconds, got 0")
        if isinstance(self.distributed, str) and self.distributed != "auto":
            raise ValueError(
                f"distributed must be None, 'auto', a module or a process group, got {self.distributed!r}"
            )
        if self.weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(
                f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {self.weight_decay_mode!r}"
            )
        if not isinstance(self.maximize, bool):
            raise ValueError(f"maximize must be a bool, got {self.maximize!r}")
        # torch.optim's implementation flags: their default ("let the library choose", or off) is
        # what this engine does; anything else would be silently ignored, so it is refused.
        for name, allowed, why in (
            ("foreach", (None, False), "blocks are batched per shape bucket and the vectors' AdamW lets torch choose"),
            ("fused", (None, False), "there is no fused kernel"),
            ("capturable", (False,), "step() syncs the host once per step, so it cannot be captured in a CUDA graph"),
            ("differentiable", (False,), "step() runs under no_grad"),
        ):
            value = getattr(self, name)
            if not any(value is choice for choice in allowed):
                raise ValueError(
                    f"{name}={value!r} is not supported by preconditioned optimizers ({why}); "
                    f"leave {name} at {' or '.join(repr(c) for c in allowed)}"
                )

    def decay(self, lr: float, weight_decay: float) -> float:
        """The factor a step multiplies the weights by: ``1 - lr * weight_decay`` (decoupled)
        or ``1 - weight_decay`` (independent)."""
        return 1.0 - (weight_decay if self.weight_decay_mode == "independent" else lr * weight_decay)

    @property
    def block_limit(self) -> int:
        """``max_preconditioner_dim`` as a number (no limit: whole matrices)."""
        return self.max_preconditioner_dim if self.max_preconditioner_dim is not None else self.NO_LIMIT


def options_help(**preset_defaults: Any) -> str:
    """The engine options as a docstring section (type with choices, default, one line each),
    appended to every preset's docstring so that ``help(SOAP)`` lists them;
    ``preset_defaults`` are a preset's own defaults (Muon: whole matrices)."""
    defaults = {f.name: f.default for f in dataclasses.fields(EngineOptions)} | preset_defaults
    helps = {}
    for line in (inspect.getdoc(EngineOptionsDict) or "").splitlines():
        name, sep, text = line.strip().partition(": ")
        if sep and name in defaults:
            helps[name] = text
    lines = ["", "Engine options (keyword-only, shared by every optimizer):"]
    for name, hint in EngineOptionsDict.__annotations__.items():
        hint = getattr(hint, "__forward_arg__", hint)  # annotations are strings here
        lines.append(f"    {name} ({hint}, default {defaults[name]!r}): {helps[name]}")
    return "\n".join(lines)
