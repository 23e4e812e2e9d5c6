"""Accelerate + DeepSpeed ZeRO-2, 2 CPU processes: an algorithm with eigenbases trains and
PreconditionerHooks reports staleness metrics through the Accelerate/DeepSpeed wrappers.

Launched as ``accelerate launch --num_processes 2 --use_deepspeed --deepspeed_config_file
integration_tests/ds_zero2.json``; needs ``transformers`` installed (without it Accelerate
does not run DeepSpeed on CPU). The first DeepSpeed start in a venv JIT-compiles its shm
comm op (about a minute); later runs take seconds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SCRIPT = HERE / "scripts" / "accelerate_deepspeed.py"
CONFIG = HERE / "ds_zero2.json"
STEPS = 10
# Registry names with eigenbases (the metrics are theirs). A subset: every algorithm is its own
# Accelerate+DeepSpeed launch (slow to start); all of them run under ZeRO-2 in test_deepspeed.
ALGORITHMS = ("SOAP",)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_accelerate_deepspeed_zero2_staleness_metrics(algorithm, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    assert accelerate.exists(), f"no accelerate next to {sys.executable}"
    command = [str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "--use_deepspeed", "--deepspeed_config_file", str(CONFIG),
               str(SCRIPT), "--out", str(tmp_path), "--steps", str(STEPS), "--algorithm", algorithm]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False,
                            cwd=HERE.parent)
    assert result.returncode == 0, result.stderr[-4000:]

    out = json.loads((tmp_path / "result.json").read_text())
    # accelerator.num_processes is not trusted here: the world size comes from torch.distributed.
    assert out["world_size"] == 2
    assert out["distributed_type"] == "DistributedType.DEEPSPEED"
    assert out["zero_stage"] == 2
    assert math.isfinite(out["final_loss"])

    history = out["metrics"]
    assert [m["step"] for m in history] == list(range(2, STEPS + 1, 2))  # monitor_every=2
    for metrics in history:
        assert metrics["precond/factors"] == 14.0  # 7 Linear weights, 2 sides each
        # staleness = ||offdiag(Q^T A Q)|| / ||Q^T A Q|| lies in [0, 1]; eigenvalue_staleness
        # is a relative change (>= 0, not bounded by 1).
        staleness = {k: v for k, v in metrics.items()
                     if k.endswith(("/staleness", "/staleness_mean", "/staleness_max"))
                     and "eigenvalue" not in k}
        assert "precond/0.weight/left/staleness" in staleness, sorted(staleness)
        assert len(staleness) == 14 + 2  # one per factor + mean and max
        for name, value in staleness.items():
            assert 0.0 <= value <= 1.0, (name, value)
        eig = {k: v for k, v in metrics.items() if "eigenvalue_staleness" in k}
        assert len(eig) == 14 + 2
        assert all(math.isfinite(v) and v >= 0.0 for v in eig.values()), eig
    assert out["staleness_mean"] == history[-1]["precond/staleness_mean"]
    assert 0.0 <= out["staleness_mean"] <= 1.0
