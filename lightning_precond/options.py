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
from typing import Any, Literal, TypedDict

import torch

from .algorithms.base import check_nonnegative, check_positive_int
from .algorithms.eigenbasis import REFRESH_METHODS

__all__ = ["EngineOptions", "EngineOptionsDict", "NONFINITE_POLICIES", "REFRESH_MODES", "check_tolerance", "options_help"]

NONFINITE_POLICIES = ("skip", "raise")
REFRESH_MODES = ("periodic", "adaptive")
_COMMUNICATION_DTYPES = (None, torch.float32, torch.float64, torch.bfloat16, torch.float16)


class EngineOptionsDict(TypedDict, total=False):
    """The optimizer-wide keyword options of every preset.

    Args:
        max_preconditioner_dim: Largest side of a block; larger dims are cut into blocks (None: whole matrices).
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
        checkpoint_timeout: Seconds the writer of a full state_dict() waits for the other ranks to join before raising.
    """

    max_preconditioner_dim: int | None
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
    checkpoint_timeout: float


def check_tolerance(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """Optimizer-wide options (see :class:`EngineOptionsDict` for their meaning)."""

    max_preconditioner_dim: int | None = 1024
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
    checkpoint_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.max_preconditioner_dim is not None:
            check_positive_int(self.max_preconditioner_dim, "max_preconditioner_dim")
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

    @property
    def block_limit(self) -> int:
        """``max_preconditioner_dim`` as a number (no limit: whole matrices)."""
        return self.max_preconditioner_dim if self.max_preconditioner_dim is not None else 2**62


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
