"""The usual language-model split into param groups: hidden matrices preconditioned, the rest
on AdamW.

:func:`param_groups` gives every trainable parameter of a model one *role* and returns one
torch param group per role that has parameters, in the order of :data:`ROLES`:

============= ============================================== ==========================================
role          default rule (first that applies)              group options by default
============= ============================================== ==========================================
``vector``    order <= 1: biases, norm weights, scalars      ``precondition=False, weight_decay=0.0``
``embedding`` a weight of an ``nn.Embedding`` /              ``precondition=False`` (the optimizer's
              ``nn.EmbeddingBag``, also when it is tied to   ``lr`` and ``weight_decay``)
              an output head
``head``      an untied output head: the weight of the last  ``precondition=False``
              ``nn.Linear`` (module order) whose
              ``out_features`` equals the largest embedding's
              ``num_embeddings`` (the vocabulary)
``hidden``    everything else (``nn.Linear``, convolutions:  ``precondition=True``
              order >= 2)
============= ============================================== ==========================================

Parameters a custom module registers itself (a learned position table as a bare
``nn.Parameter`` of shape ``[1, T, d]``) are ``hidden`` by their order: name them in
``overrides`` when they should take AdamW.

``"precondition": False`` is the engine's per-group switch: those parameters take AdamW
with the group's ``lr`` and ``weight_decay`` (betas and eps: see the optimizer), never a
Kronecker factor. The defaults follow the GPT-2 / nanoGPT convention: every order >= 2
weight (embeddings included) decays, biases and norms do not. A tied head is the embedding's
weight: the tensor appears once, in the ``embedding`` group, named as ``named_parameters()``
first names it.

Every group carries ``"role"`` (one of :data:`ROLES`), a group key the optimizers accept and
keep in their checkpoints (per-layer rules such as muP multipliers can key on it);
``torch.optim`` optimizers keep it unused.

Overrides (``overrides=``) map a *pattern* or a *module type* to a role, or to ``None`` to
leave the parameter out. They are tried in the order given, first match wins, before the
default rules:

* ``str``: an :func:`fnmatch.fnmatchcase` pattern on the full parameter name (``*`` also
  matches dots: ``"blocks.*.attn.*.weight"``); a tied parameter matches under any of its
  names (``"lm_head.weight"`` finds the weight it shares with ``"wte.weight"``);
* ``re.Pattern``: a compiled regular expression that must match the whole name
  (``re.compile(r"blocks\\.[0-3]\\..*")``);
* a ``nn.Module`` subclass: parameters held directly by a module of that type
  (``isinstance``, so subclasses match too).

Example::

    from lightning_precond import SOAP, param_groups

    def configure_optimizers(self):
        return SOAP(param_groups(self, embedding={"lr": 1e-3}), lr=3e-3, weight_decay=0.1)

    # AdamW for the classifier of a conv net too (no embedding, so no head is guessed):
    groups = param_groups(convnet, overrides={"fc.weight": "head"})
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, Literal

from torch import Tensor, nn

__all__ = ["ROLES", "Role", "param_groups", "param_roles"]

Role = Literal["hidden", "embedding", "head", "vector"]
#: The roles, in the order their groups are returned.
ROLES: tuple[Role, ...] = ("hidden", "embedding", "head", "vector")
#: The group options of each role, under the caller's (read-only).
ROLE_DEFAULTS: Mapping[Role, Mapping[str, Any]] = MappingProxyType({
    "hidden": MappingProxyType({"precondition": True}),
    "embedding": MappingProxyType({"precondition": False}),
    "head": MappingProxyType({"precondition": False}),
    "vector": MappingProxyType({"precondition": False, "weight_decay": 0.0}),
})

OverrideKey = str | re.Pattern[str] | type[nn.Module]
Overrides = Mapping[OverrideKey, Role | None]

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_RESERVED = ("params", "param_names", "role")


class _Param:
    """A parameter with every name and every module it is registered under (tied tensors
    have several)."""

    def __init__(self, name: str, tensor: Tensor) -> None:
        self.name = name  # the first name, as model.named_parameters() gives it
        self.tensor = tensor
        self.names: list[str] = []
        self.owners: list[nn.Module] = []


def _parameters(model: nn.Module) -> list[_Param]:
    found = {id(t): _Param(name, t) for name, t in model.named_parameters()}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, tensor in module.named_parameters(recurse=False, remove_duplicate=False):
            entry = found.get(id(tensor))
            if entry is not None:
                entry.names.append(f"{module_name}.{local}" if module_name else local)
                if not any(owner is module for owner in entry.owners):
                    entry.owners.append(module)
    return list(found.values())


def _heads(model: nn.Module) -> set[int]:
    """Ids of untied head weights: the last ``nn.Linear`` whose ``out_features`` is the largest
    embedding's ``num_embeddings``."""
    vocab = max((m.num_embeddings for m in model.modules() if isinstance(m, _EMBEDDINGS)), default=None)
    if vocab is None:
        return set()
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == vocab]
    return {id(heads[-1].weight)} if heads else set()


def _check_overrides(overrides: Overrides) -> None:
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a mapping of pattern or module type -> role, got {type(overrides).__name__}")
    for key, role in overrides.items():
        is_type = isinstance(key, type) and issubclass(key, nn.Module)
        if not (isinstance(key, (str, re.Pattern)) or is_type):
            raise TypeError(
                f"overrides key {key!r} must be a name pattern (str), a compiled re.Pattern or an nn.Module subclass"
            )
        if role is not None and role not in ROLES:
            raise ValueError(f"overrides[{key!r}] must be one of {ROLES} or None, got {role!r}")


def _matches(key: OverrideKey, param: _Param) -> bool:
    if isinstance(key, str):
        return any(fnmatch.fnmatchcase(name, key) for name in param.names)
    if isinstance(key, re.Pattern):
        return any(key.fullmatch(name) for name in param.names)
    return any(isinstance(owner, key) for owner in param.owners)


def _default_role(param: _Param, heads: set[int]) -> Role:
    if param.tensor.dim() <= 1:
        return "vector"
    if any(isinstance(owner, _EMBEDDINGS) for owner in param.owners):
        return "embedding"
    if id(param.tensor) in heads:
        return "head"
    return "hidden"


def _roles(model: nn.Module, overrides: Overrides, include_frozen: bool) -> Iterator[tuple[_Param, Role | None]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_overrides(overrides)
    heads = _heads(model)
    used: set[int] = set()
    params = [p for p in _parameters(model) if include_frozen or p.tensor.requires_grad]
    for param in params:
        for index, (key, role) in enumerate(overrides.items()):
            if _matches(key, param):
                used.add(index)
                yield param, role
                break
        else:
            yield param, _default_role(param, heads)
    unused = [key for index, key in enumerate(overrides) if index not in used]
    if unused:
        example = params[0].name if params else "(none)"
        raise ValueError(
            f"overrides {unused!r} match no {'' if include_frozen else 'trainable '}parameter "
            f"(a misspelled pattern? names look like {example!r}; patterns match the whole name)"
        )


def param_roles(
    model: nn.Module, *, overrides: Overrides | None = None, include_frozen: bool = False
) -> dict[str, Role | None]:
    """The role :func:`param_groups` gives each parameter, by its first name (``None``: left
    out by an override). A quick way to check the split before training.

    Raises:
        TypeError, ValueError: as :func:`param_groups`.

    Example::

        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 10))
        >>> param_roles(model)
        {'0.weight': 'embedding', '1.weight': 'vector', '1.bias': 'vector', '2.weight': 'head', '2.bias': 'vector'}
    """
    return {p.name: role for p, role in _roles(model, overrides or {}, include_frozen)}


def param_groups(
    model: nn.Module,
    *,
    overrides: Overrides | None = None,
    hidden: Mapping[str, Any] | None = None,
    embedding: Mapping[str, Any] | None = None,
    head: Mapping[str, Any] | None = None,
    vector: Mapping[str, Any] | None = None,
    include_frozen: bool = False,
    named: bool = True,
) -> list[dict[str, Any]]:
    """Param groups for the usual LLM split, for any optimizer of this package (and torch's).

    Hidden matrices are preconditioned; embeddings, output heads, norms and biases take AdamW
    (see the module docstring for the rules and :data:`ROLE_DEFAULTS`). Each tensor appears
    once (tied weights are deduplicated); empty groups are left out.

    Args:
        model: the model (a ``LightningModule`` is one: ``param_groups(self)``).
        overrides: ``{pattern or module type: role or None}``, tried in order before the
            default rules; ``None`` leaves the matching parameters out. Every key must match
            at least one parameter.
        hidden, embedding, head, vector: group options of that role, merged over its
            defaults (``embedding={"lr": 1e-3}`` keeps ``precondition=False``;
            ``embedding={"precondition": True}`` preconditions it). Any option the optimizer
            takes per group is allowed; ``params``, ``param_names`` and ``role`` are not.
        include_frozen: also return parameters with ``requires_grad=False`` (they take no
            step until they get gradients; keep them when unfreezing later under FSDP or
            DeepSpeed, which cannot add groups after the first step).
        named: give ``(name, parameter)`` pairs, so the optimizer's statistics and errors
            name the parameters (``False``: bare tensors).

    Returns:
        ``[{"params": [...], "role": ..., "precondition": ..., **options}, ...]``, in the
        order of :data:`ROLES`.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or an override key is neither a
            string, a compiled pattern nor a module type.
        ValueError: for an unknown role, an override matching no parameter, a reserved
            key in the role options, or a model without trainable parameters.

    Example::

        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
        >>> [(g["role"], g["precondition"], len(g["params"])) for g in param_groups(model)]
        [('hidden', True, 1), ('embedding', False, 1), ('vector', False, 3)]
    """
    options: dict[Role, dict[str, Any]] = {}
    for role, given in zip(ROLES, (hidden, embedding, head, vector), strict=True):
        if given is not None and not isinstance(given, Mapping):
            raise TypeError(f"{role} must be a mapping of group options, got {type(given).__name__}")
        reserved = [key for key in (given or {}) if key in _RESERVED]
        if reserved:
            raise ValueError(f"{role} options may not set {reserved}: param_groups fills them in")
        options[role] = {**ROLE_DEFAULTS[role], **(given or {})}
    members: dict[Role, list[_Param]] = {role: [] for role in ROLES}
    for param, role in _roles(model, overrides or {}, include_frozen):
        if role is not None:
            members[role].append(param)
    if not any(members.values()):
        raise ValueError("param_groups found no parameter to optimize (all frozen or left out by overrides?)")
    return [
        {
            "params": [(p.name, p.tensor) if named else p.tensor for p in members[role]],
            "role": role,
            **options[role],
        }
        for role in ROLES
        if members[role]
    ]
