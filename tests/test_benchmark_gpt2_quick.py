"""Smoke test of benchmarks/gpt2.py: --quick writes every report with a row per contender and
a before -> after table. Never asserts a timing."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpt2.py"


def _load():
    spec = importlib.util.spec_from_file_location("benchmarks_gpt2", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_quick_run_writes_the_reports(tmp_path):
    bench = _load()
    report = bench.main(["--quick", "--optimizers", "SOAP", "Muon", "--out", str(tmp_path), "--tag", "before"])
    rows = {(r["optimizer"], r["groups"]): r for r in report["single"]}
    assert set(rows) == {("AdamW", "all"), ("SOAP", "all"), ("SOAP", "split"), ("Muon", "all"), ("Muon", "split")}
    for row in rows.values():
        assert row["steps"] == 3 and not row["error"] and row["state_bytes"] > 0, row
    # The split keeps the embedding off the Kronecker factors.
    assert rows["SOAP", "split"]["state_over_params"] < rows["SOAP", "all"]["state_over_params"] / 5
    assert report["rows_with_gradient"] == bench.QUICK.vocab  # the tied head reaches every row
    assert 0 < report["rows_looked_up"] <= report["rows_in_text"] <= 256
    ddp = {(r["optimizer"], r["groups"]): r for r in report["ddp"]}
    assert set(ddp) == set(rows) and all(not r["error"] and r["steps"] == 2 for r in ddp.values())
    # Block ownership: each rank holds about half of SOAP's preconditioner state.
    assert ddp["SOAP", "all"]["max_rank_over_one_process"] < 0.75
    for name in ("before.csv", "before_ddp.csv", "before.json", "before.md"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "before.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 5

    bench.main(["--quick", "--optimizers", "SOAP", "--splits", "split", "--ddp-steps", "0", "--out", str(tmp_path),
                "--tag", "after", "--compare", "before"])
    markdown = (tmp_path / "after.md").read_text()
    assert "## `before` -> `after`" in markdown and "| SOAP | split | " in markdown
    assert not (tmp_path / "after_ddp.csv").exists()
