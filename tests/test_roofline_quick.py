"""benchmarks/roofline.py --quick: every path (ours, essentials in float32 and bfloat16, the
peers) on small blocks; the figures are the script's, never asserted as timings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT / "benchmarks"))

import roofline  # noqa: E402  (benchmarks/roofline.py)


def test_quick_reports_every_algorithm_and_peer(tmp_path):
    proc = subprocess.run([sys.executable, str(_ROOT / "benchmarks" / "roofline.py"), "--quick", "--out", str(tmp_path),
                           "--algorithms", "SOAP", "KLShampoo", "Muon"],
                          cwd=_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "roofline.json").read_text())
    assert [r["algorithm"] for r in result["rows"]] == ["SOAP", "KLShampoo", "Muon"]
    for r in result["rows"]:
        assert r["step_ms"] > 0 and r["essentials_f32_ms"] > 0 and r["essentials_low_ms"] > 0
        # the optimizer's own bfloat16 mode is timed wherever it has one (not Muon: ns_dtype)
        assert (r["step_low_ms"] is None) == (r["algorithm"] == "Muon")
    peers = {p["peer"] for p in result["peers"]}
    assert {"SOAP (pytorch-optimizer)", "SOAP (heavyball)", "KLShampoo (heavyball)", "Muon (pytorch-optimizer)"} <= peers
    assert all("error" not in p for p in result["peers"]), result["peers"]
    assert "| SOAP |" in (tmp_path / "roofline.md").read_text()


def test_essential_flops_count_the_listed_products():
    # SOAP on m x n: G G^T (m m n), G^T G (n n m), in and out of the basis (2 (m m n + m n n)).
    m, n = 3, 5
    assert roofline.essential_flops("SOAP", [(m, n)]) == 2 * (m * m * n + n * n * m + 2 * (m * m * n + m * n * n))
    assert roofline.essential_flops("Muon", [(m, n)]) == 2 * 5 * (2 * m * m * n + m ** 3)
    assert roofline.essential_flops("ASGO", [(m, n)]) == 2 * (2 * m * m * n + m ** 3)  # eigenvalues="current"


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        roofline.parse_args(["--shapes", "12"])
    with pytest.raises(SystemExit):
        roofline.parse_args(["--algorithms", "Adam"])
