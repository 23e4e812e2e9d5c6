"""Checkpoints at scale: the sharded form, and resuming per-rank files at another world size.

* :func:`sharded_state_dict` selects each rank's shard for plain torch DCP (see
  :mod:`lightning_precond.engine.shards`); DCP's own ``get_optimizer_state_dict`` /
  ``set_optimizer_state_dict`` select it without it, and reshard between world sizes.
* :func:`load_shards` resumes from every rank's shard (e.g. DeepSpeed's per-rank files, which
  DeepSpeed itself reloads only at the world size that wrote them) at any world size: each
  rank copies the blocks it now owns and cuts its own pieces of the vectors.
* :func:`deepspeed_shards` reads our state out of a DeepSpeed checkpoint directory, memory
  mapped, so a rank reads from disk only what it loads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .engine.checkpoint import FRAGMENT_KEY
from .engine.optimizer import PreconditionedOptimizer
from .engine.shards import SHARD_TAG, sharded_state_dict

__all__ = ["sharded_state_dict", "load_shards", "deepspeed_shards", "merge_shards"]


def merge_shards(opt: PreconditionedOptimizer, shards: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One complete state dict for ``opt`` from every rank's shard: blocks by reference
    (memory-mapped tensors stay unread until copied), vectors' ZeRO fragments assembled into
    whole AdamW states shaped like their parameters. Raises ``ValueError`` when a shard is not
    one of ours, two shards hold the same block, or a vector's fragments do not cover it."""
    merged: dict[Any, dict[str, Any]] = {}
    fragments: dict[Any, list[Mapping[str, Tensor]]] = {}
    groups = None
    for count, shard in enumerate(shards):
        if not any(SHARD_TAG in group for group in shard.get("param_groups", ())):
            raise ValueError(
                f"shard {count} is not a lightning_precond shard (no {SHARD_TAG!r} tag in its param groups): "
                "pass each rank's state_dict() taken in the sharded form (DeepSpeed ZeRO files, or inside "
                "lightning_precond.sharded_state_dict)"
            )
        if groups is None:
            groups = [{k: v for k, v in group.items() if k != SHARD_TAG} for group in shard["param_groups"]]
        for key, entry in shard["state"].items():
            target = merged.setdefault(key, {})
            for name, value in entry.items():
                if name == FRAGMENT_KEY:
                    fragments.setdefault(key, []).append(value)
                elif name in target and name.startswith("block"):
                    raise ValueError(f"two shards hold {key!r} {name}: shards of different checkpoints?")
                else:
                    target[name] = value
    if groups is None:
        raise ValueError("no shards given")
    opt._setup()
    keys = [key for group in groups for key in group["params"]]
    if len(keys) != len(opt._shapes):
        raise ValueError(f"the shards' param groups hold {len(keys)} parameters, this optimizer {len(opt._shapes)}")
    for position, key in enumerate(keys):
        if key in fragments:
            merged[key]["adamw"] = _whole(opt._name_of_index(position), fragments[key], opt._shapes[position])
    return {"state": merged, "param_groups": groups}


def _whole(name: str, pieces: list[Mapping[str, Tensor]], shape: tuple[int, ...]) -> dict[str, Tensor]:
    """A vector's AdamW state from the fragments the ranks held."""
    numel = math.prod(shape)
    covered = torch.zeros(numel, dtype=torch.bool)
    out = {n: torch.zeros(numel, dtype=pieces[0][n].dtype) for n in ("exp_avg", "exp_avg_sq")}
    for piece in pieces:
        start, size = int(piece["flat_start"]), piece["exp_avg"].numel()
        if start + size > numel:
            raise ValueError(f"a shard's fragment of {name} ends at {start + size}, past its {numel} elements")
        covered[start : start + size] = True
        for n in out:
            out[n][start : start + size] = piece[n].reshape(-1)
    if not bool(covered.all()):
        raise ValueError(f"the shards' fragments of {name} do not cover it: a rank's shard is missing")
    return {"step": pieces[0]["step"], **{n: t.view(shape) for n, t in out.items()}}


def load_shards(opt: PreconditionedOptimizer, shards: Iterable[Mapping[str, Any]]) -> None:
    """Load every rank's shard of a checkpoint into ``opt`` at any world size (call it on
    every rank). Validated fully before anything changes, like ``load_state_dict``.

    Under DeepSpeed ZeRO, load the model with ``engine.load_checkpoint(dir, tag,
    load_optimizer_states=False)`` first; that restores the run exactly only when the
    module's weights are the fp32 master weights (no fp16 / bf16), which is checked.
    """
    _check_master_weights(opt)
    opt.load_state_dict(merge_shards(opt, shards))


def _check_master_weights(opt: PreconditionedOptimizer) -> None:
    low = sorted({str(p.dtype) for group in opt._group_params for p in group if p.dtype not in (torch.float32, torch.float64)})
    if low and opt._deepspeed_took_over():
        raise ValueError(
            f"the model's weights are {', '.join(low)}: loading a ZeRO checkpoint at another world size with "
            "load_optimizer_states=False loses DeepSpeed's fp32 master weights, so the run would not continue "
            "exactly; resume at the world size that saved it (engine.load_checkpoint), or train in fp32"
        )


def deepspeed_shards(checkpoint_dir: str | Path, tag: str | None = None) -> Iterator[dict[str, Any]]:
    """Our optimizer's shard from each rank's file of a DeepSpeed checkpoint, memory mapped
    (``tag``: the checkpoint's tag, default the one in its ``latest`` file)."""
    root = Path(checkpoint_dir)
    if tag is None:
        latest = root / "latest"
        if not latest.exists():
            raise ValueError(f"{root} has no 'latest' file; pass the checkpoint's tag")
        tag = latest.read_text().strip()
    files = sorted((root / tag).glob("*optim_states.pt"), key=_rank_of)
    if not files:
        raise ValueError(f"{root / tag} holds no DeepSpeed optimizer files (*optim_states.pt)")
    for file in files:
        saved = torch.load(file, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
        yield saved["base_optimizer_state"] if "base_optimizer_state" in saved else saved["optimizer_state_dict"]


def _rank_of(path: Path) -> int:
    """The data-parallel rank in DeepSpeed's file name (``..._pp_rank_<r>_mp_rank_...``)."""
    parts = path.name.split("_")
    for i, part in enumerate(parts[:-1]):
        if part == "rank" and parts[i - 1] == "pp" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return 0
