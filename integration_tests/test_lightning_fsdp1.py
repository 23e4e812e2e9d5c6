"""Lightning's FSDPStrategy (FSDP1, ``use_orig_params=True``, each ``nn.Linear`` its own unit)
on 2 CPU ranks, through the test-only CPU subclass in scripts/lightning_fsdp1.py: 2 ranks equal
1 process (and a plain single-process loop); "full" and "sharded" checkpoints resume at world
size 2 and 1. AdamW runs the same harness without our optimizers: if only our algorithms fail,
the engine is at fault, not the harness.

Seven launches in all: each fits all its cases (algorithm x state dict type) in turn.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from integration_tests.scripts.lightning_fsdp1 import make_optimizer
from integration_tests.test_ddp import make_model, single_thread, train_like_ddp

SCRIPT = Path(__file__).parent / "scripts" / "lightning_fsdp1.py"
STEPS = 20
# Registry names: a subset, as each case adds a Lightning FSDP1 fit to several launches
# (test_fsdp trains every registered algorithm under FSDP1); AdamW runs the harness without
# our optimizers.
ALGORITHMS = ("AdamW", "SOAP", "Shampoo")
CHECKPOINTED = ("AdamW", "SOAP")
STATE_DICT_TYPES = ("full", "sharded")


def run(out: Path, *args: str) -> str:
    """The script; ``""`` or its failure (each case's result is written as soon as it is done)."""
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        capture_output=True, text=True, timeout=600, check=False,
    )
    if result.returncode == 0:
        return ""
    errors = dict.fromkeys(line for line in result.stderr.splitlines() if re.search(r"\w(Error|Exception): ", line))
    return f"{SCRIPT.name} {' '.join(args)} failed: " + " | ".join(list(errors)[-4:]) + f"\n{result.stderr[-3000:]}"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


class Launches:
    """Each launch once per module, when a test first needs it; a case's result from it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, str] = {}

    def result(self, launch: str, case: str, *args: str) -> tuple[torch.Tensor, int]:
        """``case``'s (params, world size) from ``launch`` (started with ``args`` if new)."""
        if launch not in self.done:
            self.done[launch] = run(self.root / launch, *args)
        path = self.root / launch / case
        if not (path / "params.pt").exists():
            pytest.fail(f"{case}: no result from launch {launch!r}\n{self.done[launch]}")
        return torch.load(path / "params.pt"), int((path / "world.txt").read_text())

    def uninterrupted(self, algorithm: str) -> torch.Tensor:
        """The 2-rank run of STEPS steps (state dict type irrelevant: nothing is saved)."""
        params, world = self.result("two_ranks", f"{algorithm}-full", "--steps", str(STEPS),
                                    "--algorithms", ",".join(ALGORITHMS))
        assert world == 2
        return params


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> Launches:
    return Launches(tmp_path_factory.mktemp("lightning_fsdp1"))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_fsdp1_ranks_equal_one_process(algorithm, launches):
    two = launches.uninterrupted(algorithm)
    # One process: FSDP1 at world size 1, accumulating the two half batches.
    one, world = launches.result("one_process", f"{algorithm}-full", "--steps", str(STEPS), "--devices", "1",
                                 "--algorithms", ",".join(ALGORITHMS))
    assert world == 1
    # A plain loop with the same optimizer settings and the 2-rank averaged gradient.
    model = make_model()
    opt = make_optimizer(algorithm, model.parameters())
    with single_thread():
        train_like_ddp(model, opt, range(STEPS), 2)
    plain = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for name, params in (("1 process", one), ("plain loop", plain)):
        rel = relative(two, params)
        assert rel <= 1e-5, f"{algorithm}: 2 FSDP1 ranks vs {name}: relative difference {rel:.2e}"


@pytest.mark.parametrize("state_dict_type", STATE_DICT_TYPES)
@pytest.mark.parametrize("algorithm", CHECKPOINTED)
def test_fsdp1_checkpoint_resumes_at_world_size_two_and_one(algorithm, state_dict_type, launches):
    full = launches.uninterrupted(algorithm)
    case = f"{algorithm}-{state_dict_type}"
    cases = ("--algorithms", ",".join(CHECKPOINTED), "--state-dict-types", ",".join(STATE_DICT_TYPES))
    ckpt = launches.root / "saved_at_two"
    launches.result("half_at_two", case, "--steps", str(STEPS // 2), "--save", str(ckpt), *cases)
    # Lightning: "full" is one file, "sharded" a torch.distributed.checkpoint directory.
    assert (ckpt / f"{case}.ckpt").is_dir() == (state_dict_type == "sharded")
    for devices in (2, 1):
        resumed, world = launches.result(f"resumed_at_{devices}", case, "--steps", str(STEPS), "--devices",
                                         str(devices), "--resume", str(ckpt), *cases)
        assert world == devices
        rel = relative(resumed, full)
        assert rel <= 1e-5, (
            f"{algorithm} {state_dict_type} checkpoint resumed at world size {devices}: relative difference {rel:.2e}"
        )


@pytest.mark.parametrize("state_dict_type", STATE_DICT_TYPES)
def test_fsdp1_checkpoint_from_one_process_resumes_at_two(state_dict_type, launches):
    """And back: saved by FSDPStrategy at world size 1, resumed at 2."""
    full = launches.uninterrupted("SOAP")
    case = f"SOAP-{state_dict_type}"
    cases = ("--algorithms", "SOAP", "--state-dict-types", ",".join(STATE_DICT_TYPES))
    ckpt = launches.root / "saved_at_one"
    launches.result("half_at_one", case, "--steps", str(STEPS // 2), "--devices", "1", "--save", str(ckpt), *cases)
    resumed, world = launches.result("one_to_two", case, "--steps", str(STEPS), "--resume", str(ckpt), *cases)
    assert world == 2
    rel = relative(resumed, full)
    assert rel <= 1e-5, f"SOAP {state_dict_type} checkpoint from 1 process resumed at 2: relative difference {rel:.2e}"
