"""benchmarks/quality.py: the sweep protocol on synthetic losses, and ``--quick`` end to end
(ours, AdamW and both peer packages on the conv net; a second call trains nothing).

The data are required, never skipped (see tests/test_convergence_quick.py)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_convergence_quick import _require_fashion_mnist

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT / "benchmarks"))

import quality  # noqa: E402  (benchmarks/quality.py)
from convergence import Contender  # noqa: E402


def test_ladder_rungs_are_a_factor_three_apart_and_snap():
    assert [quality.rung_lr(r) for r in range(-8, -3)] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert quality.nearest_rung(1e-3) == -6
    assert quality.rung_lr(quality.nearest_rung(0.0025)) == 3e-3
    assert quality.rung_lr(quality.nearest_rung(0.02)) == 0.03  # log-nearest: 1.5x vs 2x
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        quality.nearest_rung(0.0)


class FakeCache:
    """Records with final loss (log10(lr) - log10(optimum))^2 (+ seed / 100); counts runs."""

    def __init__(self, optimum: float, diverge_above: float = math.inf) -> None:
        self.optimum, self.diverge_above, self.keys = optimum, diverge_above, []

    def get(self, c, key, *, run=True):
        self.keys.append(key)
        if key.lr > self.diverge_above:
            return {"status": "diverged", "evals": [], "step_times": [], "state_bytes": 0, "param_bytes": 1}
        loss = (math.log10(key.lr) - math.log10(self.optimum)) ** 2 + key.seed / 100
        return {"status": "ok", "evals": [{"step": 0, "time": 0.0, "eval_loss": 9.0},
                                          {"step": 10, "time": 1.0, "eval_loss": loss}],
                "step_times": [0.1], "state_bytes": 2, "param_bytes": 1}


def _sweep(cache, anchor_impl="torch", **kw):
    c = Contender("AdamW", "AdamW", anchor_impl, build=None)  # anchor 1e-3
    return quality.sweep(cache, "mlp", c, steps=10, seeds=3, rungs=5, quick=False,
                         max_extensions=kw.pop("max_extensions", 4), **kw)


def test_sweep_extends_until_the_optimum_is_interior_then_runs_the_seeds():
    cache = FakeCache(optimum=0.1)  # three rungs above the initial 1e-4 .. 1e-2
    s = _sweep(cache)
    assert s.complete and s.interior and s.best_lr == 0.1
    assert s.lrs == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]
    assert sorted(s.seeds) == [0, 1, 2] and all(k.lr == 0.1 for k in cache.keys if k.seed > 0)


def test_sweep_reports_an_edge_optimum_when_extensions_run_out():
    s = _sweep(FakeCache(optimum=10.0), max_extensions=2)
    assert s.complete and not s.interior and s.best_lr == max(s.lrs) == 0.1


def test_a_diverging_rung_bounds_the_sweep():
    s = _sweep(FakeCache(optimum=1.0, diverge_above=5e-3))
    assert s.interior and s.best_lr == 3e-3 and math.isinf(s.finals[1e-2])


def test_summary_reports_mean_spread_and_reach_of_adamw():
    rows = quality.summarize([_sweep(FakeCache(optimum=1e-3))])
    (row,) = rows
    assert row["mean"] == pytest.approx(0.01) and row["spread"] == pytest.approx(0.01)
    # AdamW's target is its own mean: seed 2 (0.02) never reaches it, so no reach is claimed.
    assert row["steps_to_adamw"] is None and row["state_ratio"] == 2


CONTENDERS = "AdamW,SOAP,SOAP (heavyball),Muon (pytorch-optimizer)"


def _run(out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(_ROOT / "benchmarks" / "quality.py"), "--quick", "--tasks", "convnet",
         "--contenders", CONTENDERS, "--out", str(out)],
        cwd=_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    _require_fashion_mnist()
    out = tmp_path_factory.mktemp("quality")
    return out, _run(out)


def test_quick_writes_report_csv_plots_and_one_record_per_run(quick_out):
    out, proc = quick_out
    md = (out / "quality.md").read_text()
    for task in ("convnet",):
        assert f"## {task}" in md and (out / f"quality_{task}.png").stat().st_size > 0
    for name in CONTENDERS.split(","):
        assert f"| {name} |" in md
    assert "every sweep complete" in md
    records = list((out / "runs").rglob("*.json"))
    assert records and all(json.loads(p.read_text())["status"] in ("ok", "diverged") for p in records)
    assert int(re.search(r"\[quality\] (\d+) runs trained now", proc.stdout).group(1)) == len(records)


def test_quick_resumes_from_the_cache(quick_out):
    out, _ = quick_out
    again = _run(out)
    assert "[quality] 0 runs trained now" in again.stdout


def test_report_only_uses_runs_of_an_older_code_version_and_names_it(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(quality, "build_task", lambda *a, **k: object())
    monkeypatch.setattr(quality, "train_one", lambda task, c, key: trained.append(key) or {
        "status": "ok", "evals": [{"step": 3, "time": 1.0, "eval_loss": 1.5}], "step_times": [0.1]})
    c = Contender("SOAP", "SOAP", "ours", build=None)
    key = quality.RunKey("mlp", "SOAP", 1e-3, 0, 3, False)
    monkeypatch.setattr(quality, "code_version", lambda c: "lightning_precond:old")
    quality.Cache(tmp_path, math.inf).get(c, key)
    monkeypatch.setattr(quality, "code_version", lambda c: "lightning_precond:new")

    report = quality.Cache(tmp_path, math.inf)
    assert report.get(c, key, run=False)["evals"][-1]["eval_loss"] == 1.5 and len(trained) == 1
    assert report.stale == {"SOAP": {"lightning_precond:old"}}
    other_settings = quality.RunKey("mlp", "SOAP", 1e-3, 0, 4, False)  # 4 steps: never recorded
    assert report.get(c, other_settings, run=False) is None

    rerun = quality.Cache(tmp_path, math.inf)
    rerun.get(c, key)  # a training call re-runs a run recorded with older code
    assert len(trained) == 2 and rerun.stale == {}
    assert json.loads(key.path(tmp_path).read_text())["code"] == "lightning_precond:new"


def test_precision_parity_runs_the_float32_optimum_and_seeds_in_bfloat16(tmp_path, monkeypatch):
    import precision_parity  # benchmarks/precision_parity.py

    def fake_train(task, c, key):  # float32 optimum at 1e-2; bfloat16 ends 0.002 higher
        loss = 1.0 + (math.log10(key.lr) + 2) ** 2 + key.seed / 1000 + (0.002 if "bfloat16" in c.name else 0.0)
        return {"status": "ok", "evals": [{"step": key.steps, "time": 1.0, "eval_loss": loss}], "step_times": [0.1]}

    monkeypatch.setattr(quality, "build_task", lambda *a, **k: object())
    monkeypatch.setattr(quality, "train_one", fake_train)
    soap = next(c for c in quality.suite_contenders(with_peers=False)[0] if c.name == "SOAP")
    steps = quality.DEFAULT_STEPS["mlp"]
    # Without the float32 sweep in the cache there is nothing to compare (and nothing is trained).
    assert precision_parity.main(["--out", str(tmp_path), "--tasks", "mlp", "--algorithms", "SOAP"]) == []
    quality.sweep(quality.Cache(tmp_path, math.inf), "mlp", soap, steps=steps, seeds=3, rungs=5,
                  max_extensions=4, quick=False)
    (row,) = precision_parity.main(["--out", str(tmp_path), "--tasks", "mlp", "--algorithms", "SOAP"])
    assert row["lr"] == 1e-2 and row["diff"] == pytest.approx(0.002)
    assert row["within_1pct"] and not row["within_spread"]  # the seeds spread by 0.001
    assert "| mlp | SOAP | 0.01 |" in (tmp_path / "precision_parity.md").read_text()
    low = precision_parity.low_precision(soap)
    opt = low.build([torch.nn.Parameter(torch.zeros(4, 4))], 1e-3, 64)
    assert opt.param_groups[0]["matmul_dtype"] == "bfloat16"
    (half,) = precision_parity.main(["--out", str(tmp_path), "--tasks", "mlp", "--algorithms", "SOAP",
                                     "--dtype", "float16"])
    assert half["diff"] == pytest.approx(0.0)  # its own runs: the fake adds nothing to float16
    assert "| f16 - f32 |" in (tmp_path / "precision_parity_float16.md").read_text()
    assert "| bf16 - f32 |" in (tmp_path / "precision_parity.md").read_text()  # left as it was
    assert precision_parity.low_precision(soap, "float16").build(
        [torch.nn.Parameter(torch.zeros(4, 4))], 1e-3, 64).param_groups[0]["matmul_dtype"] == "float16"
    with pytest.raises(SystemExit, match="not factored"):
        precision_parity.main(["--out", str(tmp_path), "--algorithms", "Muon"])
