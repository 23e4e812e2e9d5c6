"""What an algorithm is to the engine: a small protocol over one shape bucket of blocks.

The engine (``lightning_precond.engine``) cuts parameters into blocks, groups the blocks this
rank owns into *buckets* of one shape and param group, and stacks their state ``[k, ...]``.
For each bucket it asks the algorithm to

* ``create_state`` -- the bucket's typed state (a dataclass of stacked tensors);
* ``step`` -- gradients in, a direction and its step size out (or ``None`` while the
  algorithm only initializes, e.g. SOAP's first gradient builds the basis); the algorithm
  decides its own order of statistics, refresh and scaling, and calls back into the
  engine's refresh policy through :class:`StepContext`;
* ``refresh`` -- recompute one side's basis (a no-op protocol for algorithms with no basis:
  their ``sides`` is empty, so it is never called);
* ``staleness`` / ``eigenvalues_in_use`` -- for stats and the adaptive refresh.

Hyperparameters that may differ per param group are a frozen :class:`GroupConfig`,
validated when built (at construction, ``add_param_group`` and whenever a group changes).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import Tensor

from .precision import check_matmul_dtype

__all__ = [
    "Algorithm",
    "Direction",
    "FactoredConfig",
    "GroupConfig",
    "StepContext",
    "check_beta",
    "check_betas",
    "check_nonnegative",
    "check_positive_int",
    "check_bool",
    "debiased_beta",
    "tensor_fields",
]

# ---------------------------------------------------------------------------- validation
def check_nonnegative(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_bool(value: Any, name: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, bool):
        accepted = "True, False or None" if optional else "True or False"
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def debiased_beta(beta: float, samples: int) -> float:
    """The EMA coefficient that keeps ``EMA(x; beta)`` bias-corrected (Adam's ``x / (1 - beta^n)``)
    when ``samples`` values, this one included, have been averaged:
    ``1 - (1 - beta) / (1 - beta^samples)`` (0 for the first; ``beta == 1`` sums, unchanged)."""
    if beta >= 1.0 or beta <= 0.0:
        return beta
    return 1.0 - (1.0 - beta) / (1.0 - beta**samples)


def check_beta(value: Any, name: str, *, allow_one: bool = False) -> None:
    """``value`` in [0, 1) (or [0, 1] / (0, 1] when ``allow_one``: 1 sums instead of averaging)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    if allow_one and not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (1 sums the factors), got {value}")
    if not allow_one and not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_betas(betas: Any, *, second_may_be_one: bool = False) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair, got {betas!r}")
    check_beta(betas[0], "betas[0]")
    check_beta(betas[1], "betas[1]", allow_one=second_may_be_one)


C = TypeVar("C", bound="GroupConfig")


@dataclass(frozen=True, kw_only=True)
class GroupConfig:
    """Base of the per-group hyperparameters: ``lr`` and decoupled ``weight_decay``, plus
    the AdamW hyperparameters the group's vectors (biases, norms) take."""

    lr: float
    weight_decay: float
    # The named reference implementation's exact equations (each preset's docstring names it
    # and lists what the default mode changes, with the measured effect).
    reference: bool = False

    def __post_init__(self) -> None:
        check_nonnegative(self.lr, "lr")
        check_nonnegative(self.weight_decay, "weight_decay")
        check_bool(self.reference, "reference")

    @classmethod
    def from_group(cls: type[C], group: Mapping[str, Any]) -> C:
        """The config of a param group (which holds every field: torch merges the defaults)."""
        return cls(**{f.name: group[f.name] for f in dataclasses.fields(cls)})

    def values_of(self, group: Mapping[str, Any]) -> tuple[Any, ...]:
        """The group's current values of this config's fields (to detect edits cheaply)."""
        return tuple(group.get(f.name) for f in dataclasses.fields(self))

    @property
    def decay(self) -> float:
        """The decoupled weight-decay factor ``1 - lr * weight_decay``."""
        return 1.0 - self.lr * self.weight_decay

    def vector_adamw(self) -> tuple[float, float, float]:
        """``(beta1, beta2, eps)`` of the AdamW that the group's vectors take."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class FactoredConfig(GroupConfig):
    """Base of the factored algorithms' hyperparameters: adds ``matmul_dtype``, the dtype of
    the per-step statistics products and basis projections (None: the state dtype; see
    :mod:`lightning_precond.algorithms.precision`)."""

    matmul_dtype: str | torch.dtype | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_matmul_dtype(self.matmul_dtype)


# ---------------------------------------------------------------------------- state
def tensor_fields(state: Any, prefix: str = "") -> dict[str, Tensor]:
    """The tensors of a (possibly nested) state dataclass by field name, ``None`` fields
    left out. Names are unique across nesting (they are the checkpoint keys)."""
    out: dict[str, Tensor] = {}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if dataclasses.is_dataclass(value):
            out.update(tensor_fields(value))
        elif isinstance(value, Tensor):
            out[f.name] = value
    return out


def map_state(state: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """A copy of a state dataclass with ``fn`` applied to every tensor."""
    changes = {}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = map_state(value, fn)
        elif isinstance(value, Tensor):
            changes[f.name] = fn(value)
    return dataclasses.replace(state, **changes)


# ---------------------------------------------------------------------------- protocol
@dataclass
class Direction:
    """A bucket's result: ``W <- decay * W - step_size * update`` (the engine owns the sign,
    the learning rate's place and the decay; see ``Algorithm.decay_after_update``)."""

    update: Tensor  # [k, m, n]
    step_size: float


@dataclass
class StepContext:
    """What the engine hands an algorithm's ``step`` for one phase of a bucket."""

    step: int  # the number of this update if the call makes one (1-based, per block)
    first: bool  # these blocks have not received a gradient before
    config: Any  # the group's GroupConfig
    # Recompute every side's basis now with ``method`` (accounting included).
    refresh_all: Callable[[str], None]
    # Let the engine's refresh policy (periodic / adaptive / external owner) decide.
    refresh_if_due: Callable[[], None]


class Algorithm(Protocol):
    """The per-bucket protocol (see the module docstring)."""

    config_type: ClassVar[type[GroupConfig]]
    # The sides with a basis ("left", "right"), or () for algorithms without one (Muon).
    sides: tuple[str, ...]
    # SOAP: W <- (W - a U)(1 - lr wd); AdamW order otherwise: W <- W(1 - lr wd) - a U.
    decay_after_update: bool
    # The method used when neither the user nor the refresh policy chooses one.
    refresh_method: str
    # A block's gradient is refused (its step skipped) unless ||G||_F^2 * gradient_headroom
    # is finite in the state dtype: then no statistic of the algorithm can overflow.
    gradient_headroom: float

    # ``sides``: the sides of the bucket's blocks that have a factor, a subset of ``sides``
    # (the plan leaves a side without one when the parameter's dim there is above
    # ``max_factor_dim``; see ``lightning_precond.blocks``). Always () for Muon.
    def state_shapes(self, m: int, n: int, config: Any, sides: tuple[str, ...] = ...) -> dict[str, tuple[int, ...]]: ...

    def create_state(self, k: int, m: int, n: int, config: Any, dtype: torch.dtype, device: torch.device,
                     sides: tuple[str, ...] = ...) -> Any: ...

    def state_from(self, tensors: Mapping[str, Tensor]) -> Any: ...

    def step(self, state: Any, grads: Tensor, ctx: StepContext) -> Direction | None: ...

    def refresh_start(self, config: Any) -> int: ...

    def decays_after_update(self, config: Any) -> bool:
        """Whether the group's decay follows the update (``decay_after_update``, or the
        reference's order when ``config.reference``)."""
        ...

    def refresh_due(self, step: int, config: Any) -> bool:
        """The periodic schedule: whether the bases are due after update ``step`` (>= start)."""
        ...

    def refresh(self, state: Any, side: str, method: str, tolerance: float, max_iterations: int,
                config: Any = None, product: Tensor | None = None) -> list[bool]: ...

    def projected(self, state: Any, side: str) -> Tensor:
        """``Q^T A Q`` of ``side``'s factor in its current basis, ``[k, d, d]``."""
        ...

    def basis_and_product(self, state: Any, side: str) -> tuple[Tensor, Tensor]:
        """``(Q, A Q)`` of ``side``'s factor ``A`` and its current basis ``Q``, ``[k, d, d]`` each:
        the staleness check's one product, which the power and QR refreshes then start from."""
        ...

    def eigenvalues_in_use(self, state: Any, side: str) -> Tensor: ...
