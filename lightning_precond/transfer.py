"""Hyperparameter transfer across widths (muP) for the matrix-preconditioned optimizers.

Tune ``lr`` and ``weight_decay`` on a small *base* model, then train a wider model of the same
shape family with the param groups of :func:`param_groups`: per-layer learning-rate and
weight-decay multipliers that keep the size of every layer's update, measured in the norm the
spectral condition of feature learning uses, independent of width. Equations, sources and what
was derived here rather than read in a paper: ``docs/transfer.md``.

The rule for a matrix ``W`` (``d_out x d_in``; an embedding is the map from one-hot tokens,
``d_in`` = vocabulary) is the spectral condition (Yang, Simon and Bernstein 2023; applied per
optimizer by Qiu et al. 2025, arXiv 2512.05620, and Gupta et al. 2026, arXiv 2602.20937)::

    ||lr * U||_op  ~  sqrt(d_out / d_in)    =>    lr  ~  sqrt(d_out / d_in) / ||U||_op

with ``||U||_op`` the spectral norm the optimizer's direction ``U`` has, as a function of the
shape, for gradients of a strong low-rank signal over full-rank noise (what training sees).
Derived here from each direction's equations and checked numerically by
``tests/test_transfer.py`` (``lr * ||U||_op / sqrt(d_out / d_in)`` width-independent):

===================================== ============================== ===============================
optimizer (why)                       ``||U||_op`` ~                  lr multiplier ~
===================================== ============================== ===============================
AdamW (entries ~ +-1 on the signal)   ``sqrt(d_out d_in)``            ``1 / d_in``
SOAP, KL-SOAP, eigenvalue-corrected   ``sqrt(d_out) + sqrt(d_in)``    ``sqrt(d_out/d_in) /
Shampoo (Adam in the eigenbasis: the                                  (sqrt(d_out) + sqrt(d_in))``
signal is one entry, the rest is
normalized noise, entries ~ +-1)
Shampoo grafted from adam / rmsprop / ``sqrt(max(d_out, d_in))``      ``sqrt(d_out/d_in) /
adagrad (a whitened, polar-like                                       sqrt(max(d_out, d_in))``
direction rescaled to Adam's
Frobenius norm ``sqrt(d_out d_in)``)
Shampoo without grafting (exponent    1                               ``sqrt(d_out / d_in)``
1/4 per side: the polar factor), ASGO
Muon ``update_scale="rms"``           ``0.2 sqrt(max(d_out, d_in))``  ``sqrt(d_out/d_in) /
                                                                      sqrt(max(d_out, d_in))``
Muon ``update_scale="shape"``         ``sqrt(max(1, d_out / d_in))``  ``min(1, sqrt(d_out / d_in))``
KL-Shampoo (1/n, 1/m trace            ``(d_out d_in)^{1/4}``          ``d_out^{1/4} d_in^{-3/4}``
normalization of its factors)
any, ``spectral_normalization=True``  1 (normalized by the engine)    ``sqrt(d_out / d_in)``
===================================== ============================== ===============================

Only ratios to the base model matter: a layer's multiplier is its rule at its shape divided by
the rule at its base shape, so the tuned ``lr`` is the base model's. Groups that take AdamW in
the engine (``precondition=False``: embeddings, heads, vectors by default) follow the AdamW
row; vectors (biases, norms) keep ``lr`` and no weight decay. Weight decay is *independent*
(``W <- (1 - wd) W`` per step, the optimizers' ``weight_decay_mode="independent"``) and scales
as ``1 / width`` (Qiu et al.: nearly optimal across optimizers), ``width`` the layer's largest
width ratio to the base.

The head: with :func:`output_multiplier` applied to the logits (``scale_output(model.head,
output_multiplier(model, base_model))``, muP's readout multiplier), the head's own lr
multiplier is the rule divided by the multiplier's ratio (1 for AdamW), so
``output_multiplier=True`` here must match what the model does. :func:`init_` gives the muP
initialization, :func:`residual_multiplier` the ``1/L`` branch multiplier for depth.

Example::

    from lightning_precond import SOAP, transfer

    transfer.init_(model, base_model=base)
    transfer.scale_output(model.head, transfer.output_multiplier(model, base_model=base))
    groups = transfer.param_groups(model, base_model=base, lr=3e-3, weight_decay=1e-4, optimizer="SOAP")
    opt = SOAP(groups, weight_decay_mode="independent")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .groups import ROLES, Overrides
from .groups import param_groups as role_groups

__all__ = [
    "OPTIMIZERS",
    "param_groups",
    "lr_rule",
    "init_",
    "output_multiplier",
    "residual_multiplier",
    "scale_output",
]

#: The optimizers :func:`param_groups` has rules for (names of this package's presets, and
#: torch's AdamW as the baseline).
OPTIMIZERS = ("AdamW", "SOAP", "KLSOAP", "EigenvalueCorrectedShampoo", "Shampoo", "KLShampoo", "Muon", "ASGO")
_ADAM_IN_BASIS = ("SOAP", "KLSOAP", "EigenvalueCorrectedShampoo")
# The preset options that change a rule, per optimizer, with their accepted values.
_RULE_OPTIONS: Mapping[str, Mapping[str, tuple[Any, ...]]] = {
    "Shampoo": {"grafting": ("adam", "adagrad", "rmsprop", None), "exponent": (0.25,)},
    "Muon": {"update_scale": ("rms", "shape")},
}
_WEIGHT_DECAY_MODES = ("independent", "decoupled")


def _optimizer_name(optimizer: Any) -> str:
    name = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", None)
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} (a name or the class), got {optimizer!r}")
    return name


def _check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(options, Mapping):
        raise ValueError(f"optimizer_options must be a mapping, got {type(options).__name__}")
    accepted = _RULE_OPTIONS.get(name, {})
    resolved = {"grafting": "adam", "exponent": 0.25, "update_scale": "rms"}
    for key, value in options.items():
        if key not in accepted:
            raise ValueError(
                f"optimizer_options key {key!r} does not change {name}'s rule; accepted: {sorted(accepted) or 'none'}"
            )
        if value not in accepted[key]:
            raise ValueError(f"optimizer_options[{key!r}] for {name} must be one of {accepted[key]}, got {value!r}")
        resolved[key] = value
    return resolved


def lr_rule(optimizer: str, d_out: int, d_in: int, *, spectral_normalization: bool = False,
            **options: Any) -> float:
    """The learning rate, up to a width-independent constant, that satisfies the spectral
    condition for a ``d_out x d_in`` matrix under ``optimizer`` (table in the module docstring).

    Raises:
        ValueError: an unknown optimizer or option, or a non-positive dimension.
    """
    name = _optimizer_name(optimizer)
    resolved = _check_options(name, options)
    for label, dim in (("d_out", d_out), ("d_in", d_in)):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{label} must be a positive int, got {dim!r}")
    target = math.sqrt(d_out / d_in)
    if spectral_normalization:
        return target
    if name == "AdamW":
        norm = math.sqrt(d_out * d_in)
    elif name in _ADAM_IN_BASIS:
        norm = math.sqrt(d_out) + math.sqrt(d_in)
    elif name == "Shampoo" and resolved["grafting"] is not None:
        norm = math.sqrt(max(d_out, d_in))
    elif name == "Muon":
        norm = 0.2 * math.sqrt(max(d_out, d_in)) if resolved["update_scale"] == "rms" else math.sqrt(max(1.0, d_out / d_in))
    elif name == "KLShampoo":
        norm = (d_out * d_in) ** 0.25
    else:  # Shampoo without grafting, ASGO: the polar factor of a low-rank gradient
        norm = 1.0
    return target / norm


# ---------------------------------------------------------------------------- shapes
def _fan(role: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """``(d_out, d_in)`` of a matrix parameter: an embedding's weight ``[V, d]`` maps one-hot
    tokens to ``d``, so ``d_in = V``; every other weight is ``[d_out, d_in, ...]``."""
    if role == "embedding":
        return int(shape[1]) * math.prod(shape[2:]), int(shape[0])
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def _base_shapes(model: nn.Module, base_model: nn.Module | None, base_widths: Mapping[int, int] | None,
                 overrides: Overrides | None) -> Callable[[str, Tensor], tuple[int, ...]]:
    if (base_model is None) == (base_widths is None):
        raise ValueError("give exactly one of base_model and base_widths")
    if base_model is not None:
        if not isinstance(base_model, nn.Module):
            raise ValueError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
        shapes = {name: tuple(p.shape) for name, p in base_model.named_parameters()}

        def from_model(name: str, param: Tensor) -> tuple[int, ...]:
            if name not in shapes:
                raise ValueError(f"base_model has no parameter {name!r}: it must be of the model's shape family")
            if len(shapes[name]) != param.dim():
                raise ValueError(f"{name}: base shape {shapes[name]} and shape {tuple(param.shape)} differ in order")
            return shapes[name]

        return from_model
    if not isinstance(base_widths, Mapping) or not base_widths:
        raise ValueError(f"base_widths must be a non-empty mapping {{dim: base dim}}, got {base_widths!r}")
    for dim, base in base_widths.items():
        for label, value in (("key", dim), ("value", base)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"base_widths {label}s must be positive ints, got {value!r}")
    return lambda name, param: tuple(base_widths.get(int(d), int(d)) for d in param.shape)


def _ratios(role: str, shape: tuple[int, ...], base: tuple[int, ...]) -> tuple[int, int, int, int]:
    d_out, d_in = _fan(role, shape)
    b_out, b_in = _fan(role, base)
    return d_out, d_in, b_out, b_in


# ---------------------------------------------------------------------------- groups
def param_groups(
    model: nn.Module,
    *,
    base_model: nn.Module | None = None,
    base_widths: Mapping[int, int] | None = None,
    lr: float,
    weight_decay: float,
    optimizer: str | type = "SOAP",
    optimizer_options: Mapping[str, Any] | None = None,
    spectral_normalization: bool = False,
    output_multiplier: bool = True,
    weight_decay_mode: str | None = None,
    overrides: Overrides | None = None,
    role_options: Mapping[str, Mapping[str, Any]] | None = None,
    named: bool = True,
) -> list[dict[str, Any]]:
    """Torch param groups with muP multipliers of ``lr`` and ``weight_decay`` per layer.

    Built on :func:`lightning_precond.param_groups` (its roles hidden / embedding / head /
    vector and their options): each role's group is split by multiplier, every group keeps
    ``role`` and the role's options and gets its own ``lr`` and ``weight_decay``.

    Args:
        model: the model to train.
        base_model: a smaller model of the same shape family (same parameter names and
            orders), the one ``lr`` and ``weight_decay`` were tuned on.
        base_widths: instead of ``base_model``, ``{dim: base dim}`` for every width-like size
            (``{512: 128, 2048: 512}``: dims of 512 were 128 in the base); other dims (vocab,
            context) are fixed.
        lr: the base model's tuned learning rate.
        weight_decay: the base model's tuned *independent* weight decay (a fraction of the
            weights per step); scaled as ``1 / width``.
        optimizer: one of :data:`OPTIMIZERS`, by name or class (``lp.SOAP``, ``torch.optim.AdamW``).
        optimizer_options: the preset options that change the rule: Shampoo's ``grafting``
            (default ``"adam"``; ``"sgd"`` has no rule: its step follows the gradient's scale)
            and ``exponent`` (0.25 only: the rules assume the polar-factor direction), Muon's
            ``update_scale`` (default ``"rms"``).
        spectral_normalization: the groups also set ``"spectral_normalization": True`` (the
            engine divides each block's direction by its spectral norm) and the preconditioned
            matrices take ``lr ~ sqrt(d_out / d_in)``. This package's optimizers only.
        output_multiplier: whether the model applies :func:`output_multiplier` to the logits.
        weight_decay_mode: how the groups' ``weight_decay`` is written: ``"independent"`` (the
            fraction itself, for ``weight_decay_mode="independent"`` optimizers: the default
            for this package's) or ``"decoupled"`` (fraction / group lr, for an optimizer that
            multiplies it by lr, as torch's AdamW: the default for ``"AdamW"``; exact at the
            groups' lr, so a schedule scales the decay with the lr).
        overrides, role_options, named: as :func:`lightning_precond.param_groups`
            (``role_options={"embedding": {...}}`` are its ``embedding=`` options).

    Returns:
        A list of param-group dicts (``params``, ``role``, ``lr``, ``weight_decay``, the role's
        options), in role order, one per role and multiplier.

    Raises:
        ValueError: a missing or extra base, an unknown optimizer or option, a non-positive
            ``lr`` or negative ``weight_decay``, a parameter missing from the base model.
    """
    name = _optimizer_name(optimizer)
    options = _check_options(name, optimizer_options or {})
    for label, value, low in (("lr", lr, 0.0), ("weight_decay", weight_decay, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < math.inf:
            raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
    for label, flag in (("spectral_normalization", spectral_normalization), ("output_multiplier", output_multiplier),
                        ("named", named)):
        if not isinstance(flag, bool):
            raise ValueError(f"{label} must be a bool, got {flag!r}")
    if spectral_normalization and name == "AdamW":
        raise ValueError("spectral_normalization needs one of this package's optimizers, not torch's AdamW")
    mode = weight_decay_mode if weight_decay_mode is not None else ("decoupled" if name == "AdamW" else "independent")
    if mode not in _WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {_WEIGHT_DECAY_MODES} or None, got {weight_decay_mode!r}")
    if role_options is not None and (not isinstance(role_options, Mapping) or set(role_options) - set(ROLES)):
        raise ValueError(f"role_options must map roles {ROLES} to group options, got {role_options!r}")
    base_shape = _base_shapes(model, base_model, base_widths, overrides)
    rule_options = {k: options[k] for k in _RULE_OPTIONS.get(name, {})}
    out: list[dict[str, Any]] = []
    for group in role_groups(model, overrides=overrides, named=True, **dict(role_options or {})):
        role = group["role"]
        preconditioned = bool(group.get("precondition", True)) and name != "AdamW"
        base_lr = group.get("lr", lr)
        base_wd = group.get("weight_decay", weight_decay)
        split: dict[tuple[float, float], list[tuple[str, Tensor]]] = {}
        for pname, param in group["params"]:
            lr_mult = wd_mult = 1.0
            if param.dim() >= 2:
                d_out, d_in, b_out, b_in = _ratios(role, tuple(param.shape), base_shape(pname, param))
                rule_name = name if preconditioned else "AdamW"
                spectral = spectral_normalization and preconditioned
                ratio = (lr_rule(rule_name, d_out, d_in, spectral_normalization=spectral,
                                 **(rule_options if preconditioned else {}))
                         / lr_rule(rule_name, b_out, b_in, spectral_normalization=spectral,
                                   **(rule_options if preconditioned else {})))
                if role == "head" and output_multiplier:
                    ratio /= b_in / d_in  # the multiplier already scales the head's update
                lr_mult = ratio
                wd_mult = 1.0 / max(d_out / b_out, d_in / b_in)
            split.setdefault((lr_mult, wd_mult), []).append((pname, param))
        for (lr_mult, wd_mult), members in split.items():
            entry = {k: v for k, v in group.items() if k not in ("params", "lr", "weight_decay")}
            group_lr = base_lr * lr_mult
            decay = base_wd * wd_mult
            if mode == "decoupled":
                decay = decay / group_lr if group_lr > 0 else 0.0
            entry.update(params=members if named else [p for _, p in members], lr=group_lr, weight_decay=decay)
            if spectral_normalization and preconditioned:
                entry["spectral_normalization"] = True
            if name == "AdamW":
                entry.pop("precondition", None)
            out.append(entry)
    return out


# ---------------------------------------------------------------------------- model-side multipliers
def _head_fan_in(model: nn.Module, base_model: nn.Module | None, base_widths: Mapping[int, int] | None,
                 overrides: Overrides | None) -> tuple[int, int]:
    """``(d_in, base d_in)`` of the logits: the untied head's, else (tied) the embedding's width."""
    base_shape = _base_shapes(model, base_model, base_widths, overrides)
    groups = {g["role"]: g for g in role_groups(model, overrides=overrides, named=True)}
    for role in ("head", "embedding"):
        if role in groups:
            pname, param = next((n, p) for n, p in groups[role]["params"] if p.dim() >= 2)
            return int(param.shape[1]), int(base_shape(pname, param)[1])
    raise ValueError("the model has no head or embedding: no output multiplier to compute")


def output_multiplier(model: nn.Module, *, base_model: nn.Module | None = None,
                      base_widths: Mapping[int, int] | None = None, overrides: Overrides | None = None) -> float:
    """muP's readout multiplier ``base_d_in / d_in`` of the head (the width its logits are
    computed from): multiply the logits by it, e.g. with :func:`scale_output`."""
    d_in, b_in = _head_fan_in(model, base_model, base_widths, overrides)
    return b_in / d_in


def residual_multiplier(depth: int, base_depth: int) -> float:
    """The ``1 / L`` residual-branch multiplier for depth transfer (Qiu et al. 2025),
    normalized to 1 at the base depth: ``base_depth / depth``. Multiply each block's branch
    output by it (``x + m * f(x)``, e.g. :func:`scale_output` on the branch's last module);
    the learning rates need no depth factor then."""
    for label, value in (("depth", depth), ("base_depth", base_depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    return base_depth / depth


def scale_output(module: nn.Module, factor: float) -> torch.utils.hooks.RemovableHandle:
    """Multiply ``module``'s output by ``factor`` (a forward hook; ``.remove()`` undoes it)."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < factor < math.inf:
        raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
    return module.register_forward_hook(lambda _module, _inputs, output: output * factor)


@torch.no_grad()
def init_(model: nn.Module, *, base_model: nn.Module | None = None, base_widths: Mapping[int, int] | None = None,
          std: float = 0.02, zero_head: bool = True, overrides: Overrides | None = None) -> None:
    """muP initialization in place, ``std`` being the base model's: hidden matrices
    ``N(0, std^2 * base_d_in / d_in)`` (variance ~ 1 / fan-in), embeddings ``N(0, std^2)``
    (width-independent), an untied head zero (muP's readout; ``zero_head=False``: as hidden),
    vectors untouched (biases stay as the model made them, norms at 1)."""
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0.0 < std < math.inf:
        raise ValueError(f"std must be a finite number > 0, got {std!r}")
    if not isinstance(zero_head, bool):
        raise ValueError(f"zero_head must be a bool, got {zero_head!r}")
    base_shape = _base_shapes(model, base_model, base_widths, overrides)
    for group in role_groups(model, overrides=overrides, named=True):
        role = group["role"]
        for pname, param in group["params"]:
            if param.dim() < 2:
                continue
            if role == "embedding":
                param.normal_(0.0, std)
            elif role == "head" and zero_head:
                param.zero_()
            else:
                _, d_in = _fan(role, tuple(param.shape))
                _, b_in = _fan(role, base_shape(pname, param))
                param.normal_(0.0, std * math.sqrt(b_in / d_in))
