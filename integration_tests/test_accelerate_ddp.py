"""Accelerate, 2 CPU processes: equal to one process; save_state / load_state continue exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from integration_tests.test_ddp import ALGORITHMS, flat_params, make_model, single_thread, train_like_ddp

SCRIPT = Path(__file__).parent / "scripts" / "accelerate_ddp.py"


def torchrun(out: Path, *args: str) -> torch.Tensor:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--standalone", str(SCRIPT), "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out / "params.pt")


def test_accelerate_two_processes_equal_one_and_resume(tmp_path):
    full = torchrun(tmp_path / "full", "--steps", "20")
    processes, kind = (tmp_path / "full" / "processes.txt").read_text().split()
    assert processes == "2" and kind == "DistributedType.MULTI_CPU"

    model = make_model()
    opt = ALGORITHMS["SOAP"](model.parameters())
    with single_thread():
        train_like_ddp(model, opt, range(20), 2)
    assert torch.equal(full, flat_params(model))

    torchrun(tmp_path / "half", "--steps", "10", "--save-at", "10")
    state = tmp_path / "half" / "state"
    assert (state / "optimizer.bin").exists()
    resumed = torchrun(tmp_path / "resumed", "--steps", "20", "--resume", str(state))
    assert torch.equal(resumed, full)
    shutil.rmtree(state)
