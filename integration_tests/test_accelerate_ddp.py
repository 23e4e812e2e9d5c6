"""Accelerate, 2 CPU processes: equal to one process; save_state / load_state continue exactly.

Every registered algorithm, in three launches for all of them (uninterrupted, saved at step
10, resumed from there): each launch trains the algorithms in turn (scripts/accelerate_ddp.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from integration_tests.test_ddp import NOT_BITWISE, flat_params, make_model, single_thread, train_like_ddp
from lightning_precond.registry import ALGORITHMS, names

SCRIPT = Path(__file__).parent / "scripts" / "accelerate_ddp.py"


def torchrun(out: Path, *args: str) -> str:
    """The script on 2 processes; ``""`` or its failure (each algorithm's output is written
    as soon as it is done, so the ones before a failure can still be checked)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--standalone", str(SCRIPT), "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    return "" if result.returncode == 0 else f"torchrun {' '.join(args)} failed:\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("accelerate_ddp")
    failures = [
        torchrun(root / "full", "--steps", "20"),
        torchrun(root / "half", "--steps", "10", "--save-at", "10"),
        torchrun(root / "resumed", "--steps", "20", "--resume", str(root / "half")),
    ]
    yield root, "\n".join(f for f in failures if f)
    shutil.rmtree(root / "half")  # the saved states


def params(root: Path, run: str, name: str, failure: str) -> torch.Tensor:
    path = root / run / name / "params.pt"
    if not path.exists():
        pytest.fail(f"{name}: no {run} result\n{failure}")
    return torch.load(path)


@pytest.mark.parametrize("name", names())
def test_accelerate_two_processes_equal_one_and_resume(name, runs):
    root, failure = runs
    full = params(root, "full", name, failure)
    processes, kind = (root / "full" / "processes.txt").read_text().split()
    assert processes == "2" and kind == "DistributedType.MULTI_CPU"

    model = make_model()
    opt = ALGORITHMS[name].build(model.parameters())
    with single_thread():
        train_like_ddp(model, opt, range(20), 2)
    single = flat_params(model)
    if name in NOT_BITWISE:  # as in test_ddp
        rel = (torch.linalg.norm(full - single) / torch.linalg.norm(single)).item()
        assert rel <= 1e-6, f"{name}: relative difference {rel:.2e}"
    else:
        assert torch.equal(full, single)

    assert (root / "half" / name / "state" / "optimizer.bin").exists()
    resumed = params(root, "resumed", name, failure)
    assert torch.equal(resumed, full)
