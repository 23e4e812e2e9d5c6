"""Lightning DDP on 2 CPU ranks with our callbacks; checkpoints resume at world size 1 and 2.

Every registered algorithm, in four launches for all of them (uninterrupted, saved at step
10, resumed at 2 and at 1 rank): each launch fits the algorithms in turn.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_precond.registry import ALGORITHMS, names

SCRIPT = Path(__file__).parent / "scripts" / "lightning_ddp.py"


def run(out: Path, *args: str) -> str:
    """The script; ``""`` or its failure (each algorithm's result is written as soon as it is
    done, so the ones before a failure can still be checked, see :func:`result`)."""
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode == 0:
        return ""
    errors = dict.fromkeys(line for line in result.stderr.splitlines() if re.search(r"\w(Error|Exception): ", line))
    return (f"{SCRIPT.name} {' '.join(args)} failed: " + " | ".join(list(errors)[-4:])
            + f"\n{result.stderr[-3000:]}")


def result(out: Path, name: str, failure: str) -> tuple[torch.Tensor, int]:
    """``name``'s final parameters and world size in the run written to ``out``."""
    if not (out / name / "params.pt").exists():
        pytest.fail(f"{name}: no result in {out}\n{failure}")
    return torch.load(out / name / "params.pt"), int((out / name / "world.txt").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning_ddp")
    ckpt = root / "checkpoints"
    failures = [
        run(root / "full", "--steps", "20"),
        run(root / "half", "--steps", "10", "--save", str(ckpt)),
        run(root / "two", "--steps", "20", "--resume", str(ckpt)),
        run(root / "one", "--steps", "20", "--devices", "1", "--resume", str(ckpt)),
    ]
    return root, "\n".join(f for f in failures if f)


@pytest.mark.parametrize("algorithm", names())
def test_lightning_ddp_resumes_at_world_size_one_and_two(algorithm, runs):
    root, failure = runs
    full, world = result(root / "full", algorithm, failure)
    assert world == 2
    at_two, _ = result(root / "two", algorithm, failure)
    at_one, world = result(root / "one", algorithm, failure)
    assert world == 1
    for name, resumed in (("world size 2", at_two), ("world size 1", at_one)):
        rel = (torch.linalg.norm(resumed - full) / torch.linalg.norm(full)).item()
        assert rel <= 1e-6, f"{algorithm} resumed at {name}: relative difference {rel:.2e}"

    if not ALGORITHMS[algorithm].has_basis:
        return  # the staleness monitor is for algorithms with eigenbases
    with open(root / "full" / algorithm / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert any(c.startswith("precond/") and c.endswith("staleness") for c in columns), sorted(columns)
    staleness = [float(r[c]) for r in rows for c in columns
                 if c.startswith("precond/") and c.endswith("/staleness") and r[c]]
    assert staleness and all(0.0 <= s <= 1.0 for s in staleness)
