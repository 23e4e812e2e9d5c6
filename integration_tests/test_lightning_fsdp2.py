"""Lightning ModelParallelStrategy (FSDP2 via configure_model) on 2 CPU ranks with our
callbacks; sharded (DCP) checkpoints resume at world size 2 and 1, and back."""

from __future__ import annotations

import pytest
import torch

from integration_tests.test_lightning_ddp import run


@pytest.mark.parametrize("algorithm", ["KLShampoo"])
def test_fsdp2_sharded_checkpoints_reshard_between_world_sizes(algorithm, tmp_path):
    common = ("--strategy", "fsdp2", "--algorithm", algorithm)
    full = run(tmp_path / "full", "--steps", "16", *common)
    assert (tmp_path / "full" / "world.txt").read_text() == "2"
    at_two = tmp_path / "at_two.ckpt"
    run(tmp_path / "half2", "--steps", "8", "--save", str(at_two), *common)
    assert at_two.is_dir(), "ModelParallelStrategy writes a sharded (DCP) checkpoint directory"
    at_one = tmp_path / "at_one.ckpt"
    run(tmp_path / "half1", "--steps", "8", "--devices", "1", "--save", str(at_one), *common)
    resumed = {
        "2 -> 2": run(tmp_path / "r22", "--steps", "16", "--resume", str(at_two), *common),
        "2 -> 1": run(tmp_path / "r21", "--steps", "16", "--devices", "1", "--resume", str(at_two), *common),
        "1 -> 2": run(tmp_path / "r12", "--steps", "16", "--resume", str(at_one), *common),
    }
    for name, params in resumed.items():
        rel = (torch.linalg.norm(params - full) / torch.linalg.norm(full)).item()
        assert rel <= 1e-5, f"{algorithm} {name}: relative difference {rel:.2e}"
