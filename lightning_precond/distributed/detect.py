"""Which router a set of parameters needs: the one place that knows every backend.

Kept apart from :mod:`.router` (the interface) so that backends import the interface and
this module imports the backends, never the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .ddp import ReplicatedRouter
from .fsdp import FSDP1Router, FSDP2Router, is_dtensor, is_fsdp1_flattened
from .router import LocalRouter, Router
from .zero import deepspeed_took_over, zero_router

__all__ = ["resolve_router", "parameters_are_sharded", "deepspeed_took_over"]


def parameters_are_sharded(params: Sequence[Tensor]) -> bool:
    """Whether FSDP1 or FSDP2 already holds these parameters (planning must see them as they
    will be stepped)."""
    return any(is_dtensor(p) or is_fsdp1_flattened(p) for p in params)


def resolve_router(
    distributed: Any,
    communication_dtype: torch.dtype,
    params: Sequence[Tensor],
    optimizer: Any = None,
    original_groups: Sequence[Sequence[Tensor]] | None = None,
) -> Router:
    """Pick the router for ``distributed``:

    * first, DeepSpeed ZeRO (``optimizer`` wrapped by ``deepspeed.initialize``;
      ``original_groups`` are the params it was built with): ZeRO routing with
      ``distributed="auto"`` (anything else raises), or an error naming a DeepSpeed set-up
      that cannot be routed correctly;
    * ``None``: single process (each rank, if any, preconditions on its own);
    * ``"auto"``: FSDP2 when the parameters are DTensors; block ownership over the default
      group when ``torch.distributed`` runs several ranks; else single process;
    * a ``torch.nn.Module`` wrapped in FSDP1 (``use_orig_params=True``): FSDP1 routing;
    * a process group: block ownership over that group.
    """
    if optimizer is not None and original_groups is not None:
        zero = zero_router(optimizer, original_groups, communication_dtype)
        if zero is not None:
            if not (isinstance(distributed, str) and distributed == "auto"):
                raise ValueError(
                    "under DeepSpeed ZeRO the optimizer routes blocks over DeepSpeed's data-parallel "
                    f"group; leave distributed='auto' (got {distributed!r})"
                )
            return zero
    if distributed is None:
        return LocalRouter()
    if isinstance(distributed, torch.nn.Module):
        if any(is_fsdp1_flattened(p) for p in params):
            return FSDP1Router(distributed, params, communication_dtype)
        distributed = "auto"
    if isinstance(distributed, str):
        if distributed != "auto":
            raise ValueError(f"distributed must be None, 'auto', a module or a process group, got {distributed!r}")
        if any(is_dtensor(p) for p in params):
            return FSDP2Router(params, communication_dtype)
        if any(is_fsdp1_flattened(p) for p in params):
            raise ValueError(
                "FSDP1 parameters detected: pass the wrapped module, e.g. "
                "SOAP(model.parameters(), distributed=model) (in Lightning: "
                "distributed=self.trainer.strategy.model)"
            )
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return ReplicatedRouter(None, communication_dtype)
        return LocalRouter()
    return ReplicatedRouter(distributed, communication_dtype)
