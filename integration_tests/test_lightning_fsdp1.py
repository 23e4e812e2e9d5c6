"""Lightning's FSDPStrategy (FSDP1, ``use_orig_params=True``, each ``nn.Linear`` its own unit)
on 2 CPU ranks, through the test-only CPU subclass in scripts/lightning_fsdp1.py: 2 ranks equal
1 process (and a plain single-process loop); "full" and "sharded" checkpoints resume at world
size 2 and 1. AdamW runs the same harness without our optimizers: if only our algorithms fail,
the engine is at fault, not the harness."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from integration_tests.scripts.lightning_fsdp1 import make_optimizer
from integration_tests.test_ddp import make_model, single_thread, train_like_ddp

SCRIPT = Path(__file__).parent / "scripts" / "lightning_fsdp1.py"
STEPS = 20
ALGORITHMS = ["AdamW", "SOAP", "Shampoo"]


def run(out: Path, *args: str) -> torch.Tensor:
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out / "params.pt")


def world(out: Path) -> int:
    return int((out / "world.txt").read_text())


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 2-rank run of STEPS steps, once per algorithm for the whole module."""
    done: dict[str, torch.Tensor] = {}

    def get(algorithm: str) -> torch.Tensor:
        if algorithm not in done:
            out = tmp_path_factory.mktemp(f"{algorithm}_two_ranks")
            done[algorithm] = run(out, "--steps", str(STEPS), "--algorithm", algorithm)
            assert world(out) == 2
        return done[algorithm]

    return get


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_fsdp1_ranks_equal_one_process(algorithm, uninterrupted, tmp_path):
    two = uninterrupted(algorithm)
    # One process: FSDP1 at world size 1, accumulating the two half batches.
    one = run(tmp_path, "--steps", str(STEPS), "--devices", "1", "--algorithm", algorithm)
    assert world(tmp_path) == 1
    # A plain loop with the same optimizer settings and the 2-rank averaged gradient.
    model = make_model()
    opt = make_optimizer(algorithm, model.parameters())
    with single_thread():
        train_like_ddp(model, opt, range(STEPS), 2)
    plain = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for name, params in (("1 process", one), ("plain loop", plain)):
        rel = relative(two, params)
        assert rel <= 1e-5, f"{algorithm}: 2 FSDP1 ranks vs {name}: relative difference {rel:.2e}"


@pytest.mark.parametrize("state_dict_type", ["full", "sharded"])
@pytest.mark.parametrize("algorithm", ["AdamW", "SOAP"])
def test_fsdp1_checkpoint_resumes_at_world_size_two_and_one(algorithm, state_dict_type, uninterrupted, tmp_path):
    full = uninterrupted(algorithm)
    common = ("--algorithm", algorithm, "--state-dict-type", state_dict_type)
    ckpt = tmp_path / "half.ckpt"
    run(tmp_path / "half", "--steps", str(STEPS // 2), "--save", str(ckpt), *common)
    # Lightning: "full" is one file, "sharded" a torch.distributed.checkpoint directory.
    assert ckpt.is_dir() == (state_dict_type == "sharded")
    for devices in (2, 1):
        out = tmp_path / f"resumed_at_{devices}"
        resumed = run(out, "--steps", str(STEPS), "--devices", str(devices), "--resume", str(ckpt), *common)
        assert world(out) == devices
        rel = relative(resumed, full)
        assert rel <= 1e-5, (
            f"{algorithm} {state_dict_type} checkpoint resumed at world size {devices}: relative difference {rel:.2e}"
        )


@pytest.mark.parametrize("state_dict_type", ["full", "sharded"])
def test_fsdp1_checkpoint_from_one_process_resumes_at_two(state_dict_type, uninterrupted, tmp_path):
    """And back: saved by FSDPStrategy at world size 1, resumed at 2."""
    full = uninterrupted("SOAP")
    common = ("--algorithm", "SOAP", "--state-dict-type", state_dict_type)
    ckpt = tmp_path / "half.ckpt"
    run(tmp_path / "half", "--steps", str(STEPS // 2), "--devices", "1", "--save", str(ckpt), *common)
    out = tmp_path / "resumed"
    resumed = run(out, "--steps", str(STEPS), "--resume", str(ckpt), *common)
    assert world(out) == 2
    rel = relative(resumed, full)
    assert rel <= 1e-5, f"SOAP {state_dict_type} checkpoint from 1 process resumed at 2: relative difference {rel:.2e}"
