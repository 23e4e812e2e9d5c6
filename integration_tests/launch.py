"""Run a function on N gloo CPU ranks forked from the test process (fast, no re-import)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        assert dist.get_world_size() == world_size
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks."""
    torch.multiprocessing.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, start_method="fork"
    )


@contextlib.contextmanager
def running(case: str) -> Iterator[None]:
    """Name ``case`` in the error when a worker's case fails (the launch reports it)."""
    try:
        yield
    except Exception as error:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise RuntimeError(f"{case} failed on rank {rank}") from error


def save_case(out: str | Path, case: str, rank: int, result: Any) -> None:
    """A worker's result for ``case``, saved as soon as the case is done (see :func:`launch_cases`)."""
    torch.save(result, Path(out) / f"{case}.rank{rank}.pt")


def launch_cases(fn: Callable[..., None], world_size: int, *args: Any) -> str:
    """:func:`launch` for a worker that runs several cases (e.g. every registered algorithm)
    in one launch and saves each with :func:`save_case`. Returns ``""``, or the failure's
    text instead of raising it: the cases done before a failure keep their results, and each
    test row reads its own with :func:`case_results` (which reports the failure when its
    case has none). One launch for many cases saves the start-up of one launch per case."""
    try:
        launch(fn, world_size, *args)
    except Exception as error:  # the ranks' tracebacks, from torch.multiprocessing
        return f"{type(error).__name__}: {error}"
    return ""


def case_results(out: str | Path, case: str, world_size: int, failure: str) -> list[Any]:
    """Every rank's :func:`save_case` result for ``case``; fails the test if one is missing."""
    files = [Path(out) / f"{case}.rank{rank}.pt" for rank in range(world_size)]
    if not all(f.exists() for f in files):
        import pytest

        pytest.fail(f"{case}: no result from every rank; the launch failed:\n{failure[-6000:] or '(no error)'}")
    return [torch.load(f, weights_only=False) for f in files]


def dcp_block_files(checkpoint_dir: str | Path) -> dict[str, set[str]]:
    """For a torch.distributed.checkpoint directory: the data files (one per saving rank)
    that hold the block state of our optimizers, by block key (``...block<b>.<tensor>``)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(checkpoint_dir)).read_metadata()
    files: dict[str, set[str]] = {}
    for index, info in metadata.storage_data.items():
        if ".block" in index.fqn:
            files.setdefault(index.fqn, set()).add(info.relative_path)
    return files
