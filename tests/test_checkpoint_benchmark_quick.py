"""Smoke test of benchmarks/checkpoint.py: --quick writes a row per path and world size with
every measured column. Never asserts a timing (timings belong in benchmarks/)."""

import csv
import subprocess
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "checkpoint.py"


def test_quick_run_writes_every_row(tmp_path):
    subprocess.run([sys.executable, str(_SCRIPT), "--quick", "--paths", "ddp_full,fsdp2_dcp", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    rows = list(csv.DictReader((tmp_path / "checkpoint_after.csv").open()))
    assert [(r["path"], r["world"]) for r in rows] == [("ddp_full", "1"), ("ddp_full", "2"),
                                                        ("fsdp2_dcp", "1"), ("fsdp2_dcp", "2")]
    for row in rows:
        assert float(row["held_MiB"]) > 0 and float(row["disk_MiB"]) > 0
    # Two ranks hold about half of one process's state each (the blocks are shared out).
    held = {(r["path"], r["world"]): float(r["held_MiB"]) for r in rows}
    assert held[("ddp_full", "2")] < 0.75 * held[("ddp_full", "1")]
