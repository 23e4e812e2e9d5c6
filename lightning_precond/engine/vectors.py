"""The vector path: AdamW, through torch's own functional kernel, for every parameter the
block plan leaves unblocked (biases, norm weights, scalars).

Whole local parameters keep ``torch.optim.AdamW``'s state (``step``, ``exp_avg``,
``exp_avg_sq``) in ``optimizer.state``, so their trajectory *is* torch's AdamW. Where a
backend hands flat fragments (DeepSpeed ZeRO) the same kernel runs on the fragments: AdamW is
elementwise, so each element follows the one-process update.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw

__all__ = ["zero_adamw_state", "adamw_step"]


def zero_adamw_state(p: Tensor) -> dict[str, Tensor]:
    """``torch.optim.AdamW``'s fresh state for ``p`` (a parameter, or a ZeRO flat fragment)."""
    return {
        "step": torch.zeros((), dtype=torch.float32),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


def _local_shards(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The local shards when all of ``tensors`` are DTensors laid out alike (FSDP2), else the
    tensors: AdamW is elementwise, so each shard steps as the whole would (the same kernels,
    without DTensor's dispatch per operation)."""
    first = tensors[0]
    if type(first).__name__ != "DTensor":
        return tensors
    if any(type(t).__name__ != "DTensor" or t.placements != first.placements or t.device_mesh != first.device_mesh
           or t.shape != first.shape for t in tensors[1:]):
        return tensors
    return tuple(t.to_local() for t in tensors)


def adamw_step(
    items: Iterable[tuple[Tensor, Tensor, MutableMapping[str, Tensor]]],
    config: Any,
    *,
    maximize: bool = False,
    foreach: bool | None = None,
    independent_decay: bool = False,
) -> None:
    """One AdamW step of every ``(value, grad, state)`` with a group config's ``lr``,
    ``weight_decay`` and :meth:`vector_adamw` hyperparameters (one kernel call); ``maximize``
    and ``foreach`` as torch.optim.AdamW's (``foreach=None``: torch picks, as AdamW does).
    ``independent_decay``: ``W <- (1 - weight_decay) W`` instead of AdamW's ``1 - lr *
    weight_decay``, applied where AdamW applies its own (before the Adam step)."""
    values, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    for value, grad, state in items:
        value, grad, exp_avg, exp_avg_sq = _local_shards(value, grad, state["exp_avg"], state["exp_avg_sq"])
        values.append(value)
        grads.append(grad)
        exp_avgs.append(exp_avg)
        exp_avg_sqs.append(exp_avg_sq)
        steps.append(state["step"])
    if not values:
        return
    beta1, beta2, eps = config.vector_adamw()
    weight_decay = config.weight_decay
    if independent_decay:
        if weight_decay != 0.0:
            torch._foreach_mul_(values, 1.0 - weight_decay)
        weight_decay = 0.0
    adamw(
        values, grads, exp_avgs, exp_avg_sqs, [], steps,
        foreach=foreach,
        amsgrad=False, beta1=beta1, beta2=beta2, lr=config.lr, weight_decay=weight_decay,
        eps=eps, maximize=maximize,
    )
