"""Lightning ModelParallelStrategy (FSDP2 via configure_model) on 2 CPU ranks with our
callbacks; sharded (DCP) checkpoints resume at world size 2 and 1, and back.

Every registered algorithm, in six launches for all of them (scripts/lightning_ddp.py fits
the algorithms in turn).
"""

from __future__ import annotations

import pytest
import torch

from integration_tests.test_lightning_ddp import result, run
from integration_tests.launch import dcp_block_files
from lightning_precond.registry import ALGORITHMS, names


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning_fsdp2")
    common = ("--strategy", "fsdp2")
    at_two, at_one = root / "at_two", root / "at_one"
    failures = [
        run(root / "full", "--steps", "16", *common),
        run(root / "half2", "--steps", "8", "--save", str(at_two), *common),
        run(root / "half1", "--steps", "8", "--devices", "1", "--save", str(at_one), *common),
        run(root / "r22", "--steps", "16", "--resume", str(at_two), *common),
        run(root / "r21", "--steps", "16", "--devices", "1", "--resume", str(at_two), *common),
        run(root / "r12", "--steps", "16", "--resume", str(at_one), *common),
    ]
    return root, "\n".join(f for f in failures if f)


@pytest.mark.parametrize("algorithm", names())
def test_fsdp2_sharded_checkpoints_reshard_between_world_sizes(algorithm, runs):
    root, failure = runs
    full, world = result(root / "full", algorithm, failure)
    assert world == 2
    assert (root / "at_two" / f"{algorithm}.ckpt").is_dir(), \
        f"ModelParallelStrategy writes a sharded (DCP) checkpoint directory\n{failure}"
    # Sharded for real: DCP's get_optimizer_state_dict(full_state_dict=False), which the strategy
    # calls, selects our sharded form by itself, so each block is written by its owner only.
    blocks = dcp_block_files(root / "at_two" / f"{algorithm}.ckpt")
    if ALGORITHMS[algorithm].has_basis:
        assert blocks and len(set().union(*blocks.values())) == 2, "blocks must come from both ranks' files"
    resumed = {"2 -> 2": "r22", "2 -> 1": "r21", "1 -> 2": "r12"}
    for name, run_dir in resumed.items():
        params, _ = result(root / run_dir, algorithm, failure)
        rel = (torch.linalg.norm(params - full) / torch.linalg.norm(full)).item()
        assert rel <= 1e-5, f"{algorithm} {name}: relative difference {rel:.2e}"
