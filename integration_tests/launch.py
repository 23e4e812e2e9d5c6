"""Run a function on N gloo CPU ranks forked from the test process (fast, no re-import)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
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
