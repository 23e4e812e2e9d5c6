"""Param-group keys: which a group may hold, and the per-group options of the block plan.

A param group holds the algorithm's hyperparameters (its config's fields, merged from the
optimizer's defaults), ``params`` / ``param_names``, ``role`` (see :func:`lightning_precond.param_groups`),
and three per-group options of the
block plan, which fall back to the optimizer-wide values when absent:

* ``precondition`` (default True): False puts every parameter of the group on AdamW;
* ``max_preconditioner_dim``: the group's block side limit;
* ``max_factor_dim``: above it a side of the group's matrices has no factor (identity).

Anything else is refused by :func:`check_group_keys` (a misspelled key would otherwise be
silently ignored), except the checkpoint tags and the keys that LR schedulers and the
frameworks we run under write into groups (:data:`FOREIGN_GROUP_KEYS`), and any key that
every existing group already holds (written there by such a framework after construction).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..blocks import PlanLimits
from ..options import EngineOptions, check_dim_limit

__all__ = ["PLAN_KEYS", "FOREIGN_GROUP_KEYS", "check_group_keys", "check_plan_keys", "plan_values", "plan_limits"]

# Per-group options of the block plan (the group's value, else the optimizer's).
PLAN_KEYS = ("precondition", "max_preconditioner_dim", "max_factor_dim")
# "role": the label lightning_precond.param_groups gives each group (embedding, head, hidden,
# vector), kept in checkpoints for per-layer rules to key on; it changes nothing in a step.
# "spectral_normalization" (default False): each block's direction U is replaced by
# U / ||U||_op, so that the step's spectral norm is lr (lightning_precond.transfer).
_OWN_KEYS = ("params", "param_names", "role", "spectral_normalization", *PLAN_KEYS)
FOREIGN_GROUP_KEYS = (
    "initial_lr",  # every torch LR scheduler; Lightning's LR finder and StochasticWeightAveraging
    "max_lr", "min_lr", "base_momentum", "max_momentum",  # OneCycleLR, CyclicLR
    "swa_lr",  # torch.optim.swa_utils.SWALR
    "name",  # Lightning's LearningRateMonitor names a group's logged lr by it
    "step",  # DeepSpeed ZeRO-1/2 writes it into every group when it loads a checkpoint
    "_ds_source_param_group_id",  # DeepSpeed ZeRO-3
)


def check_group_keys(group: Mapping[str, Any], hyperparameters: Iterable[str], tags: Iterable[str],
                     existing: Iterable[Mapping[str, Any]], optimizer: str) -> None:
    """Raise ValueError naming the first unknown key of ``group`` and the accepted ones."""
    existing = list(existing)
    shared = set.intersection(*(set(g) for g in existing)) if existing else set()
    known = [*_OWN_KEYS, *hyperparameters, *tags, *FOREIGN_GROUP_KEYS]
    unknown = [key for key in group if key not in known and key not in shared]
    if unknown:
        accepted = ", ".join(repr(k) for k in dict.fromkeys([*_OWN_KEYS, *hyperparameters]))
        raise ValueError(
            f"param group key {unknown[0]!r} is not an option of {optimizer}; a param group accepts {accepted} "
            f"(and the checkpoint tags and scheduler keys {', '.join(repr(k) for k in (*tags, *FOREIGN_GROUP_KEYS))})"
        )


def check_plan_keys(group: Mapping[str, Any], has_sides: bool, optimizer: str) -> None:
    """Validate the per-group plan options a group sets (ValueError naming the key)."""
    if not isinstance(group.get("precondition", True), bool):
        raise ValueError(f"precondition must be a bool, got {group['precondition']!r}")
    if not isinstance(group.get("spectral_normalization", False), bool):
        raise ValueError(f"spectral_normalization must be a bool, got {group['spectral_normalization']!r}")
    for key in ("max_preconditioner_dim", "max_factor_dim"):
        if key in group:
            check_dim_limit(group[key], key)
    if not has_sides and group.get("max_factor_dim") is not None:
        raise ValueError(
            f"max_factor_dim does not apply to {optimizer}: it keeps no Kronecker factors, so there is no side "
            "to leave unpreconditioned (put such parameters, e.g. embeddings, in a group with "
            "'precondition': False instead)"
        )


def plan_values(group: Mapping[str, Any], options: EngineOptions) -> tuple[bool, int | None, int | None]:
    """A group's effective ``(precondition, max_preconditioner_dim, max_factor_dim)``."""
    return (
        group.get("precondition", True),
        group.get("max_preconditioner_dim", options.max_preconditioner_dim),
        group.get("max_factor_dim", options.max_factor_dim),
    )


def plan_limits(group: Mapping[str, Any], options: EngineOptions, one_side: str | None = None) -> PlanLimits:
    """The group's :class:`PlanLimits`; ``one_side``: a one-sided algorithm's side choice."""
    _, max_dim, max_factor_dim = plan_values(group, options)
    return PlanLimits(max_dim if max_dim is not None else EngineOptions.NO_LIMIT, max_factor_dim, one_side)
