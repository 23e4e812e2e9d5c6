"""examples/accelerate_train.py under real launchers: `accelerate launch` and `torchrun`."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "accelerate_train.py"
BIN = Path(sys.executable).parent


def _launcher(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HOME"] = str(tmp_path / "hf")  # no user `accelerate config` file leaks in
    env["OMP_NUM_THREADS"] = "1"
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _run(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT, env=_env(tmp_path))
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result


def _metrics(path: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["name"], {})[int(row["step"])] = float(row["value"])
    return out


def test_accelerate_launch_one_process(tmp_path: Path) -> None:
    metrics_csv = tmp_path / "metrics.csv"
    command = [
        str(_launcher("accelerate")), "launch",
        "--num_processes", "1", "--num_machines", "1", "--cpu",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(SCRIPT), "--steps", "10", "--csv", str(metrics_csv), "--per-layer",
    ]
    result = _run(command, tmp_path)

    assert "staleness mean" in result.stdout
    assert "done: 10 steps on 1 process(es)" in result.stdout
    metrics = _metrics(metrics_csv)
    assert sorted(metrics["loss"]) == list(range(1, 11))
    assert sorted(metrics["precond/staleness_mean"]) == [5, 10]
    for step in (5, 10):
        assert 0.0 <= metrics["precond/staleness_max"][step] <= 1.0
        assert metrics["precond/factors"][step] == 6.0  # three weight matrices
        assert metrics["precond/failure_count_total"][step] == 0.0
    assert any(name.endswith("/left/staleness") for name in metrics)


def test_torchrun_two_cpu_processes_adaptive(tmp_path: Path) -> None:
    metrics_csv = tmp_path / "metrics.csv"
    command = [
        str(_launcher("torchrun")), "--nproc-per-node", "2",
        str(SCRIPT), "--steps", "10", "--cpu", "--adaptive", "--tolerance", "0.05", "--csv", str(metrics_csv),
    ]
    result = _run(command, tmp_path)

    assert "done: 10 steps on 2 process(es)" in result.stdout  # not two independent runs
    metrics = _metrics(metrics_csv)
    assert metrics["precond/factors"] == {5: 6.0, 10: 6.0}  # both ranks' factors, gathered
    refreshed = metrics["precond/adaptive_refreshed"]
    assert sorted(refreshed) == [5, 10] and all(0 <= v <= 6 for v in refreshed.values())
    assert metrics["precond/adaptive_refreshed_total"][10] == sum(refreshed.values())
