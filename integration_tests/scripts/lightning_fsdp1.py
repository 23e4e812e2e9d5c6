"""Lightning's FSDPStrategy (FSDP1, ``FullyShardedDataParallel(use_orig_params=True)``) on
2 CPU ranks with gloo, each ``nn.Linear`` its own FSDP unit (a weight matrix and a bias).

Run as a script (Lightning's subprocess launcher re-runs this file for rank 1):
    python integration_tests/scripts/lightning_fsdp1.py --out DIR --steps 20 [--devices 1|2]
        [--algorithms SOAP,Shampoo,...,AdamW] [--state-dict-types full,sharded]
        [--save CKPT_DIR] [--resume CKPT_DIR]
Fits every case (algorithm x state dict type) in turn, each with its own strategy, Trainer and
module, in one launch. Writes DIR/<algorithm>-<state dict type>/params.pt (rank 0: the full
parameters, gathered, as soon as the case is done) and .../world.txt; ``--save`` writes
CKPT_DIR/<algorithm>-<state dict type>.ckpt, which ``--resume`` reads.
At ``--devices 1`` the same strategy runs FSDP1 at world size 1 (FSDP switches to NO_SHARD)
and accumulates two half batches, so it sees the global batches of the 2-rank run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from torch.distributed.fsdp import (  # noqa: E402
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    OptimStateKeyType,
    StateDictType,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy  # noqa: E402

from integration_tests.lightning_app import TinyRegression, exit_cleanly, save_result  # noqa: E402
from lightning_precond.registry import ALGORITHMS as REGISTERED  # noqa: E402
from lightning_precond.registry import names  # noqa: E402

ALGORITHMS = [*names(), "AdamW"]  # AdamW checks the harness without our optimizers


def make_optimizer(algorithm: str, params, distributed=None) -> torch.optim.Optimizer:
    """``distributed``: the FSDP1-wrapped module (None: a single process, for references)."""
    if algorithm == "AdamW":
        return torch.optim.AdamW(params, lr=3e-3)
    return REGISTERED[algorithm].build(params, distributed=distributed)


class CPUFSDPStrategy(FSDPStrategy):
    """TEST ONLY: Lightning's ``FSDPStrategy`` on CPU (gloo). Relies on private Lightning API.

    Overrides:

    * ``_setup_model`` (private): Lightning wraps the module with
      ``device_id=self.root_device.index``, which is ``None`` for ``torch.device("cpu")``; FSDP1
      then looks for an accelerator and raises "FSDP needs a non-CPU accelerator device". This
      wraps with ``device_id=torch.device("cpu")`` and otherwise the strategy's own arguments.
      Left out of Lightning's version (unused here): the already-wrapped-module branch, moving
      torchmetrics and activation checkpointing.
    * ``lightning_module_state_dict`` and ``optimizer_state`` (public hooks; both read the
      private ``_state_dict_type``), for ``state_dict_type="full"`` only: Lightning gathers both
      under ``FullStateDictConfig``/``FullOptimStateDictConfig(offload_to_cpu=True)``, which is
      broken in FSDP1 (torch 2.13) when the compute device is the CPU, because "offloading" is
      then ``.cpu()`` of a CPU tensor, i.e. no copy:

      - model: FSDP1 frees the unsharded flat parameter after "moving" it to CPU (the same
        storage), so the state dict's clone reads freed memory: SIGSEGV;
      - optimizer: FSDP1 skips its clone when offloading, so every gathered state tensor of a
        parameter is a view of one reused all-gather buffer: ``exp_avg`` comes back holding
        ``exp_avg_sq`` (silently wrong checkpoint).

      These two gather with ``offload_to_cpu=False`` (still ``rank0_only=True``) and otherwise
      do what Lightning does (the optimizer state rekeyed by parameter index on rank 0).
      Loading keeps Lightning's ``offload_to_cpu=True`` (``rank0_only=False``): that path
      neither frees nor reuses the storage.

    Why nothing else is overridden:

    * The accelerator connector's GPU check (``_check_strategy_and_fallback``) tests
      ``type(strategy) is FSDPStrategy``, which a subclass instance does not match.
    * ``setup_environment`` passes ``device_id=None`` to ``init_process_group`` on CPU, and the
      backend is given as ``process_group_backend="gloo"`` (also Lightning's CPU default).
    * ``barrier`` uses ``_determine_device_ids`` (``[None]`` on CPU) only under NCCL.
    * ``model_sharded_context`` also passes ``device_id=None``, but only ``wrap()`` calls inside
      ``configure_model`` would see it; TinyRegression (unsharded) does not call it.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(process_group_backend="gloo", **kwargs)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )

    def _full_state_dict_without_offload(self):
        return FullyShardedDataParallel.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        )

    def lightning_module_state_dict(self) -> dict:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with self._full_state_dict_without_offload():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer
        with self._full_state_dict_without_offload():
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
        if self.global_rank == 0:
            state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state


class FSDPRegression(TinyRegression):
    """TinyRegression whose optimizer is told the FSDP1-wrapped module (or is AdamW)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.algorithm, self.parameters(), distributed=self.trainer.strategy.model)


def fit(algorithm: str, state_dict_type: str, args: argparse.Namespace) -> None:
    case = f"{algorithm}-{state_dict_type}"
    strategy = CPUFSDPStrategy(
        auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
        state_dict_type=state_dict_type,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        accumulate_grad_batches=1 if args.devices > 1 else 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = FSDPRegression(algorithm)
    trainer.fit(model, ckpt_path=str(Path(args.resume) / f"{case}.ckpt") if args.resume else None)
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(Path(args.save) / f"{case}.ckpt")
    # A collective: every rank gathers the full parameters (in net.parameters() order).
    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
        params = torch.cat([p.detach().reshape(-1).clone() for p in model.net.parameters()])
    save_result(trainer, Path(args.out) / case, params)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=2, choices=[1, 2])
    parser.add_argument("--algorithms", default="SOAP", help=f"comma list, from {', '.join(ALGORITHMS)}")
    parser.add_argument("--state-dict-types", default="full", help="comma list, from full, sharded")
    parser.add_argument("--save")
    parser.add_argument("--resume")
    args = parser.parse_args()
    algorithms = args.algorithms.split(",")
    state_dict_types = args.state_dict_types.split(",")
    if not set(algorithms) <= set(ALGORITHMS) or not set(state_dict_types) <= {"full", "sharded"}:
        parser.error(f"unknown algorithm or state dict type in {args.algorithms!r} / {args.state_dict_types!r}")
    torch.set_num_threads(1)
    for algorithm in algorithms:
        for state_dict_type in state_dict_types:
            fit(algorithm, state_dict_type, args)
    exit_cleanly()


if __name__ == "__main__":
    main()
