"""benchmarks/transfer.py --quick: every path (both modes, every optimizer, resume, report)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("transfer_benchmark", ROOT / "benchmarks" / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_transfer_benchmark_writes_runs_report_and_plots_and_resumes(tmp_path, capsys):
    bench = _module()
    started = time.perf_counter()
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    optimizers, modes = set(bench.OPTIMIZERS), set(bench.MODES)
    assert {(r["optimizer"], r["mode"]) for r in runs} == {(o, m) for o in optimizers for m in modes}
    assert len(runs) == len(optimizers) * len(modes) * 2 * 2  # 2 widths x 2 lrs x 1 seed
    assert all(r["steps"] == 3 and (r["diverged"] or r["eval_loss"] > 0) for r in runs)
    # the two modes differ (muP changes init, multipliers and per-layer lr), the seeds' batches agree
    by = {(r["optimizer"], r["mode"], r["width"], r["lr"]): r["eval_loss"] for r in runs}
    assert by["SOAP", "mup", 32, bench.BASE_LR["SOAP"]] != by["SOAP", "standard", 32, bench.BASE_LR["SOAP"]]
    table = (tmp_path / "transfer.md").read_text()
    assert "| SOAP | mup |" in table and "drift (grid steps)" in table
    assert all((tmp_path / f"transfer_{o}.png").stat().st_size > 0 for o in optimizers)
    # resumable: a second call finds every run recorded and trains nothing
    capsys.readouterr()
    bench.main(["--quick", "--out", str(tmp_path)])
    assert f"{len(runs)} already in" in capsys.readouterr().out
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(runs)
    assert time.perf_counter() - started < 60


def test_lr_grid_is_factor_two_with_at_least_seven_points():
    bench = _module()
    for optimizer in bench.OPTIMIZERS:
        grid = bench.lr_grid(optimizer)
        assert len(grid) >= 7 and all(abs(b / a - 2.0) < 1e-12 for a, b in zip(grid, grid[1:]))
        assert bench.BASE_LR[optimizer] in grid
