"""Lightning DDP on 2 CPU ranks with our callbacks; checkpoints resume at world size 1 and 2."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "lightning_ddp.py"


def run(out: Path, *args: str) -> torch.Tensor:
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out / "params.pt")


@pytest.mark.parametrize("algorithm", ["SOAP"])
def test_lightning_ddp_resumes_at_world_size_one_and_two(algorithm, tmp_path):
    full = run(tmp_path / "full", "--steps", "20", "--algorithm", algorithm)
    assert (tmp_path / "full" / "world.txt").read_text() == "2"
    ckpt = tmp_path / "half.ckpt"
    run(tmp_path / "half", "--steps", "10", "--algorithm", algorithm, "--save", str(ckpt))
    at_two = run(tmp_path / "two", "--steps", "20", "--algorithm", algorithm, "--resume", str(ckpt))
    at_one = run(tmp_path / "one", "--steps", "20", "--devices", "1", "--algorithm", algorithm,
                 "--resume", str(ckpt))
    assert (tmp_path / "one" / "world.txt").read_text() == "1"
    for name, resumed in (("world size 2", at_two), ("world size 1", at_one)):
        rel = (torch.linalg.norm(resumed - full) / torch.linalg.norm(full)).item()
        assert rel <= 1e-6, f"{algorithm} resumed at {name}: relative difference {rel:.2e}"

    with open(tmp_path / "full" / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert any(c.startswith("precond/") and c.endswith("staleness") for c in columns), sorted(columns)
    staleness = [float(r[c]) for r in rows for c in columns
                 if c.startswith("precond/") and c.endswith("/staleness") and r[c]]
    assert staleness and all(0.0 <= s <= 1.0 for s in staleness)
