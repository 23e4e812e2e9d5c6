"""Smoke test of benchmarks/step_time.py: --quick produces both reports with a row per
optimizer. Never asserts a timing."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "step_time.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmarks_step_time", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    bench = _load_benchmark()
    out = tmp_path_factory.mktemp("bench")
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    try:
        # One thread everywhere: on a shared box 2-thread steps can stall for seconds, and
        # this test checks the report paths, never timings.
        argv = ["--quick", "--profile", "--threads", "1", "--probe-threads", "1", "--out", str(out)]
        report = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    return bench, out, report


def test_report_files_exist(quick_run):
    _, out, _ = quick_run
    assert (out / "step_time.md").stat().st_size > 0
    assert (out / "step_time.json").stat().st_size > 0
    assert (out / "profile_soap.txt").stat().st_size > 0


def test_markdown_has_a_row_per_optimizer(quick_run):
    bench, out, _ = quick_run
    markdown = (out / "step_time.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    report = json.loads((out / "step_time.json").read_text())
    for name in bench.OPTIMIZER_NAMES:
        # one row per timed model, plus one per refresh-experiment run of this optimizer
        named = [r for r in rows if r.split("|")[1].strip() == name]
        refresh_runs = [r for r in report["refresh"]["runs"] if r["optimizer"] == name]
        assert len(named) == 2 + len(refresh_runs), (name, named)
    assert "Threads:" in markdown


def test_json_has_every_optimizer(quick_run):
    bench, out, _ = quick_run
    report = json.loads((out / "step_time.json").read_text())
    assert set(report["timing"]) == {"mlp", "transformer"}
    for result in report["timing"].values():
        assert list(result["optimizers"]) == list(bench.OPTIMIZER_NAMES)
        for entry in result["optimizers"].values():
            assert entry["state_bytes"] > 0
            assert entry["amortized_ms"] > 0
            assert entry["raw_step_seconds"]
    runs = report["refresh"]["runs"]
    assert {(r["optimizer"], r["refresh"]) for r in runs} == {("AdamW", "-")} | {
        (name, mode) for name in bench.WITH_BASIS for mode in ("periodic", "adaptive")
    }
    for run in runs:
        if run["optimizer"] != "AdamW":
            assert run["factors"] > 0 and run["refreshes"] >= 0
    assert report["threads"]["used"] >= 1


def test_refresh_only_writes_the_refresh_report_alone(tmp_path):
    bench = _load_benchmark()
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    try:
        report = bench.main(["--quick", "--refresh-only", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert report["timing"] == {} and "thread_probe" not in report and report["threads"]["used"] == 1
    assert not (tmp_path / "step_time.md").exists()
    markdown = (tmp_path / "refresh.md").read_text()
    assert "## Step time" not in markdown and "opt.step x periodic" in markdown
    periodic_rows = [line for line in markdown.splitlines() if "| periodic |" in line]
    assert periodic_rows and all(line.rstrip().endswith("| 1.00 |") for line in periodic_rows)
