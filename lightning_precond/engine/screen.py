"""The gradient screen: every check of a step's gradients in one host sync, before anything
changes, with the ranks' verdicts agreed in one small all-reduce where they must be."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..distributed.router import Router
from .buckets import Bucket

__all__ = ["PositionCache", "VectorWork", "must_agree", "screen", "vector_checks"]


@dataclass
class VectorWork:
    """A vector (or unblocked parameter) this rank steps: the whole local tensor, or a flat
    fragment starting at ``flat_start`` (DeepSpeed ZeRO)."""

    param_index: int
    group_index: int
    value: Tensor
    grad: Tensor
    flat_start: int | None


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (reductions on it then need no collective), else the tensor."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


#: The verdict positions of a set of vectors on a device, built once per set, not every step;
#: owned by the caller (one per optimizer), so that nothing is cached at module level.
PositionCache = dict[tuple[tuple[int, ...], torch.device], Tensor]


def vector_checks(
    vectors: list[VectorWork], num_params: int, device: torch.device, agree: bool, positions: PositionCache
) -> tuple[Tensor, Tensor | None]:
    """Whether each vector's gradient here is finite, and where ranks must ``agree`` this
    rank's verdict: ``[1 (blocks: checked by the screen), then per parameter: its vector
    pieces here finite]``. Device tensors, read by nobody yet: a router may carry the verdict
    in its gather. ``positions``: the caller's cache of index tensors."""
    vector_ok = torch.stack([torch.isfinite(_local(v.grad)).all() for v in vectors]).float() if vectors \
        else torch.zeros(0, device=device)
    if not agree:
        return vector_ok, None
    verdict = torch.ones(num_params + 1, device=device)
    if vectors:
        key = (tuple(1 + v.param_index for v in vectors), device)
        index = positions.get(key)
        if index is None:
            index = positions[key] = torch.tensor(key[0], device=device)
        verdict.scatter_reduce_(0, index, vector_ok, reduce="amin")
    return vector_ok, verdict


def must_agree(policy: str, router: Router) -> bool:
    """Whether ranks must agree on the verdicts (``nonfinite_grad="raise"``, or vectors
    sharded across ranks)."""
    return policy == "raise" or (router.vectors_sharded and router.world_size > 1)


def screen(
    work: list[tuple[Bucket, list[int], Tensor]],
    vectors: list[VectorWork],
    headroom: float,
    policy: str,
    router: Router,
    name_of: Callable[[int], str],
    vector_ok: Tensor,
    verdict: Tensor | None,
    agreed: Tensor | None = None,
) -> tuple[list[bool], list[bool], list[bool]]:
    """Whether each block's gradient is usable (finite, and small enough that no statistic
    can overflow), whether it is not all zeros, and whether each vector's gradient is
    finite (``vector_ok``, ``verdict``: from :func:`vector_checks`): one host sync per step
    for all of them. Where ranks must agree (:func:`must_agree`), ``agreed`` is ``verdict``'s
    minimum over ranks as the router's gather carried it (vectors only), else the ranks
    agree here through one small all-reduce (``nonfinite_grad="raise"``: blocks too).

    A block whose gradient is all zeros is treated as having no gradient: it carries
    nothing to learn from and would give SOAP a basis of zeros (Lightning's and DCP's
    zero-gradient, lr-0 initialization step; ZeRO's zero gradients for unused parameters).
    """
    usable_parts, nonzero_parts = [], []
    for _, _, g in work:
        flat = g.flatten(1)
        usable_parts.append(torch.isfinite(flat).all(dim=1) & torch.isfinite(flat.square().sum(dim=1) * headroom))
        nonzero_parts.append(flat.ne(0).any(dim=1))
    device = vector_ok.device
    usable = torch.cat(usable_parts).float() if work else torch.zeros(0, device=device)
    nonzero = torch.cat(nonzero_parts).float() if work else torch.zeros(0, device=device)
    parts = [usable, nonzero, vector_ok]
    if verdict is not None:  # ranks must agree (see must_agree)
        if agreed is None:
            # Every rank's verdict: [all blocks usable, then per parameter: its vector pieces here finite].
            verdict = verdict.clone()
            verdict[0] = usable.min() if usable.numel() else 1.0
            agreed = router.all_ranks_min(verdict)
        parts.append(agreed.to(device=usable.device, dtype=usable.dtype))
    flags = torch.cat(parts).tolist()  # the one host sync
    n, k = usable.numel(), vector_ok.numel()
    finite = [f > 0 for f in flags[:n]]
    used = [f > 0 for f in flags[n : 2 * n]]
    vectors_finite = [f > 0 for f in flags[2 * n : 2 * n + k]]
    all_usable = True
    if len(parts) == 4:
        agreed = flags[2 * n + k :]
        all_usable = min(agreed) > 0  # every rank's blocks, every vector anywhere
        vectors_finite = [agreed[1 + v.param_index] > 0 for v in vectors]
    if policy == "raise" and not (all_usable and all(vectors_finite)):
        blocks = [bucket.blocks[i] for bucket, present, _ in work for i in present]
        bad = [f"{name_of(b.param_index)} block {b.id}" for b, ok in zip(blocks, finite) if not ok]
        bad += [name_of(v.param_index) for v, ok in zip(vectors, vectors_finite) if not ok]
        names = ", ".join(bad[:5]) or "a block or vector held by another rank"
        raise FloatingPointError(
            f"non-finite (or overflowing) gradient in {names} (nonfinite_grad='raise'); "
            "use nonfinite_grad='skip' to skip such blocks and vectors instead"
        )
    return finite, used, vectors_finite
