"""Grafting: borrow a first-order method's per-block step size for Shampoo's direction.

``P <- ||P_graft||_F / (||P||_F + 1e-16) * P``, with ``P_graft`` the direction the grafted
method (Adam, AdaGrad, RMSprop, SGD) would take on the same block. Before preconditioning
starts, ``P_graft`` is the update itself, so Adam grafting then *is* AdamW.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .statistics import ema_

__all__ = ["GRAFTING_METHODS", "graft_direction", "graft_norm"]

GRAFTING_METHODS = ("adam", "adagrad", "rmsprop", "sgd", None)


def graft_direction(
    method: str | None,
    second: Tensor | None,
    grad: Tensor,
    momentum: Tensor,
    beta2: float,
    eps: float,
    step: int,
) -> Tensor | None:
    """The grafted method's direction for ``momentum`` (already bias-corrected); updates its
    second moment ``second`` (``[k, m, n]``, None for sgd) from ``grad``. ``None`` when
    grafting is off."""
    if method is None:
        return None
    if method == "sgd":
        return momentum
    assert second is not None
    if method == "adagrad":
        second.addcmul_(grad, grad)
        denom = second.sqrt().add_(eps)
    else:
        ema_(second, grad * grad, beta2)
        if method == "adam":
            denom = (second.sqrt() / (1.0 - beta2**step) ** 0.5).add_(eps)
        else:  # rmsprop
            denom = second.sqrt().add_(eps)
    return momentum / denom


def graft_norm(direction: Tensor, graft: Tensor) -> Tensor:
    """Rescale each block of ``direction`` to the Frobenius norm of ``graft``."""
    scale = torch.linalg.matrix_norm(graft) / (torch.linalg.matrix_norm(direction) + 1e-16)
    return direction * scale[..., None, None]
