"""Accelerate's FSDP code path (FSDP1 ``use_orig_params=True`` or FSDP2) on 2 CPU processes
(gloo, launched by ``torchrun --nproc-per-node 2``) with our optimizer, including
``accelerator.save_state`` / ``load_state`` (``accelerate.utils.fsdp_utils.save_fsdp_model`` /
``save_fsdp_optimizer`` / ``load_fsdp_model`` / ``load_fsdp_optimizer``: FSDP's
optimizer-state API plus ``torch.distributed.checkpoint`` for sharded state dicts).

    torchrun --nproc-per-node 2 integration_tests/scripts/accelerate_fsdp.py --out DIR \
        [--fsdp-version 1|2] [--state-dict-type SHARDED_STATE_DICT|FULL_STATE_DICT] \
        [--algorithm SOAP|KLShampoo|...|AdamW] [--steps 20] [--save-at 10] [--resume DIR/state] \
        [--prime] [--optim-all-ranks] [--no-device-placement]
Writes DIR/params.pt (the full model state dict, gathered by ``accelerator.get_state_dict``),
DIR/info.json (with, for algorithms with eigenbases, the ``PreconditionerHooks`` staleness
metrics every 5 steps; the hooks are registered for checkpointing) and, after ``--resume``,
DIR/loaded_rank{r}.json (the state entries each rank holds after ``load_state``).

Options that deviate from the plain user flow (the test says which runs use them):
``--prime``: a zero-gradient lr=0 step before ``load_state`` (``prime_optimizer_state``);
``--optim-all-ranks``: FULL_STATE_DICT with ``FullOptimStateDictConfig(rank0_only=False)``;
``--no-device-placement``: ``Accelerator(device_placement=False)``.

TEST-ONLY override of private Accelerate state (``force_fsdp`` below). Accelerate never applies
FSDP on CPU: ``Accelerator(cpu=True, fsdp_plugin=...)`` under torchrun makes ``AcceleratorState``
pick ``DistributedType.MULTI_CPU`` (``PartialState._prepare_backend``), and
``AcceleratorState.__init__`` switches to ``DistributedType.FSDP`` (and stores the plugin) only
for the MULTI_GPU-like types (accelerate/state.py, the ``elif self.distributed_type in
[DistributedType.MULTI_GPU, ...]`` branch). Without ``cpu=True`` there is no device at all. So,
right after constructing the ``Accelerator`` and before ``prepare``, we set what that branch would
have set:

* ``AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP`` (via
  ``accelerator.state.distributed_type``): ``prepare_model``, ``save_state``, ``load_state``,
  ``get_state_dict`` and ``is_fsdp2`` dispatch on it;
* ``AcceleratorState._shared_state["fsdp_plugin"] = plugin`` (via ``accelerator.state.fsdp_plugin``);
* ``PartialState._shared_state["distributed_type"] = DistributedType.FSDP``, as the last line of
  ``AcceleratorState.__init__`` does, so that ``wait_for_everyone`` / ``gather`` (which read
  ``PartialState``) agree; both treat FSDP like MULTI_CPU here (``barrier``, all-gather);
* ``device`` in both shared states: ``torch.device("cpu")`` instead of ``cpu:0``. For MULTI_CPU
  ``PartialState.set_device`` makes ``torch.device("cpu", local_rank % torch.cpu.device_count())``
  = ``cpu:0``, and Accelerate's FSDP1 wrapping passes ``device_id=accelerator.device``; FSDP1 then
  fails in ``_get_compute_device`` with "Inconsistent compute device and `device_id` on rank 0:
  cpu vs cpu:0" (its compute device for CPU modules is ``torch.device("cpu")``, and
  ``cpu != cpu:0``). On a GPU ``accelerator.device`` is ``cuda:<local_rank>`` and this never
  arises. (Only the index changes; tensors land on the same CPU.)

One test-only patch of torch, FSDP1 only (``keep_cpu_flat_params_alive`` below): FSDP1's
``FlatParamHandle.to_cpu`` (used by FULL_STATE_DICT with ``offload_to_cpu=True``) moves the
unsharded FlatParameter to CPU and then frees the compute-device copy; when the compute device
*is* the CPU the "move" aliases, so it frees the data itself and the state-dict hook's
``clone()`` segfaults (``_state_dict_utils.py`` ``param_hook``, SIGSEGV on rank 0). Accelerate
forces ``offload_to_cpu=True`` in ``get_state_dict`` (FSDP1) and in ``save_fsdp_model`` /
``load_fsdp_model`` for FULL_STATE_DICT with more than one process, so those paths cannot run on
CPU without it. The patch makes ``to_cpu`` a no-op when the FlatParameter already is on CPU
(on a GPU: unchanged).

Nothing else is patched: wrapping (``FSDP(model, ..., device_id=accelerator.device)`` with
``device_id=cpu`` for FSDP1; ``fsdp2_prepare_model`` -> ``fully_shard`` on the default (CPU) mesh
for FSDP2), the optimizer-parameter swap of FSDP2, and the checkpoint functions are Accelerate's own.

What differs from a GPU run: the backend is gloo and the device is ``cpu`` (FSDP1 gets
``device_id=cpu``, FSDP2 a CPU ``DeviceMesh``); mixed precision is off (``mixed_precision="no"``,
so no ShardedGradScaler, no low-precision upcast); ``sync_module_states`` must stay False
(Accelerate's plugin looks for a GPU-like device to build its ``param_init_fn`` and raises on CPU),
so every rank builds the same seeded model instead; ``cpu_offload`` is off; no dataloader is
prepared (each rank slices its half of the global batch itself, as in accelerate_ddp.py).
With FULL_STATE_DICT the optimizer config is ``FullOptimStateDictConfig(offload_to_cpu=False,
rank0_only=True)`` instead of Accelerate's default ``offload_to_cpu=True``: on CPU, FSDP1's
``_unflatten_orig_param_states`` "offloads" each gathered state with ``value.cpu()``, which
aliases the reused all-gather buffer, so every state of a parameter ends up with the values of
the last one gathered (seen with torch AdamW: ``exp_avg == exp_avg_sq`` in optimizer.bin, the
resumed run 4% off); on a GPU ``.cpu()`` copies. (``rank0_only`` keeps Accelerate's default.)
Gloo broadcasts a non-contiguous tensor without complaint, in memory order (a transposed matrix
arrives as its transpose; NCCL checks contiguity instead, not verified here): relevant to FSDP2
FULL_STATE_DICT loading, which broadcasts from rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from integration_tests.test_ddp import BATCH, batch
from integration_tests.test_fsdp import make_model
from lightning_precond.accelerate import PreconditionerHooks
from lightning_precond.registry import ALGORITHMS as REGISTERED
from lightning_precond.registry import names

# Every registered algorithm (its short-run settings), and AdamW: the harness check, a plain
# torch optimizer through the same path.
ALGORITHMS = [*names(), "AdamW"]


def build(algorithm: str, params, **kwargs) -> torch.optim.Optimizer:
    if algorithm == "AdamW":
        return torch.optim.AdamW(params, lr=3e-3)
    return REGISTERED[algorithm].build(params, **kwargs)


def force_fsdp(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Select Accelerate's FSDP path on CPU (test only; see the module docstring)."""
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"expected MULTI_CPU before the override, got {state.distributed_type}")
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.device = torch.device("cpu")
    PartialState._shared_state["device"] = torch.device("cpu")
    assert accelerator.distributed_type == DistributedType.FSDP
    assert accelerator.is_fsdp2 == (plugin.fsdp_version == 2)
    assert accelerator.device == torch.device("cpu") == PartialState().device


def keep_cpu_flat_params_alive() -> None:
    """FSDP1 on CPU: ``FlatParamHandle.to_cpu`` must not free a FlatParameter already on CPU."""
    from torch.distributed.fsdp._flat_param import FlatParamHandle

    original = FlatParamHandle.to_cpu

    @contextlib.contextmanager
    def to_cpu(self):  # type: ignore[no-untyped-def]
        if self.flat_param.device.type == "cpu":
            yield  # nothing to move, and nothing to free (the GPU copy it would free is the data)
            return
        with original(self):
            yield

    FlatParamHandle.to_cpu = to_cpu


def prime_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """A zero-gradient step at lr 0 on every rank, so that the optimizer has state to load into.

    Accelerate's FSDP1 SHARDED_STATE_DICT load builds the ``torch.distributed.checkpoint``
    template from ``FSDP.optim_state_dict(model, optimizer)`` of the *fresh* optimizer; a fresh
    ``torch.optim`` optimizer has no state, so the template is empty and nothing is loaded
    (training silently restarts the moments). ``torch.distributed.checkpoint.state_dict`` does
    the same priming internally (``_init_optim_state``) for its own API (Accelerate's FSDP2 path).
    """
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--algorithm", default="SOAP", choices=ALGORITHMS)
    parser.add_argument("--fsdp-version", type=int, default=1, choices=[1, 2])
    parser.add_argument("--state-dict-type", default="SHARDED_STATE_DICT",
                        choices=["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--optim-all-ranks", action="store_true",
                        help="FULL_STATE_DICT: FullOptimStateDictConfig(rank0_only=False) (default: True)")
    parser.add_argument("--no-device-placement", action="store_true",
                        help="Accelerator(device_placement=False): AcceleratedOptimizer then skips its "
                             "state_dict()/load_state_dict() round trip at prepare")
    parser.add_argument("--prime", action="store_true",
                        help="before load_state, create the optimizer state with a zero-gradient lr=0 step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from torch.distributed.fsdp import FullOptimStateDictConfig

    optim_config = None  # Accelerate's default
    if args.state_dict_type == "FULL_STATE_DICT":
        # Accelerate's default is offload_to_cpu=True, rank0_only=True; offloading is dropped
        # (on CPU FSDP1 aliases the gathered state, see the module docstring)
        optim_config = FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=not args.optim_all_ranks)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=args.fsdp_version,
        auto_wrap_policy="TRANSFORMER_BASED_WRAP",  # a unit per Linear (matrix + bias), then the root
        transformer_cls_names_to_wrap=["Linear"],
        use_orig_params=True if args.fsdp_version == 1 else None,
        sync_module_states=False if args.fsdp_version == 1 else None,
        cpu_ram_efficient_loading=False,
        state_dict_type=args.state_dict_type,
        optim_state_dict_config=optim_config,
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, device_placement=not args.no_device_placement)
    force_fsdp(accelerator, plugin)
    if args.fsdp_version == 1:
        keep_cpu_flat_params_alive()

    model = make_model()
    if args.fsdp_version == 1:
        # FSDP1: our optimizer needs the wrapped module (its FlatParameter layout)
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(build(args.algorithm, model.parameters(), distributed=model))
    else:
        # FSDP2: Accelerate shards the model and swaps the optimizer's parameters for the
        # DTensors; distributed="auto" detects them at the first step
        model, optimizer = accelerator.prepare(model, build(args.algorithm, model.parameters()))
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = isinstance(model, FSDP) if args.fsdp_version == 1 else isinstance(model, FSDPModule)
    assert wrapped, type(model)

    hooks = None
    if args.algorithm != "AdamW" and REGISTERED[args.algorithm].has_basis:
        hooks = PreconditionerHooks(optimizer, monitor_every=5, per_layer=False)
        accelerator.register_for_checkpointing(hooks)

    start = 0
    if args.resume:
        if args.prime:
            prime_optimizer_state(optimizer)
        accelerator.load_state(args.resume)
        start = int((Path(args.resume) / "step.txt").read_text())
        loaded = optimizer.optimizer.state_dict()["state"]  # what this rank holds after loading
        summary = {str(k): sorted(v) if isinstance(v, dict) else repr(v) for k, v in loaded.items()}
        (out / f"loaded_rank{accelerator.process_index}.json").write_text(json.dumps(summary, indent=1))
    rank, world = accelerator.process_index, accelerator.num_processes
    half = BATCH // world
    metrics: dict[int, dict[str, float]] = {}
    for step in range(start, args.steps):
        x, y = batch(step)
        x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        optimizer.zero_grad()
        accelerator.backward(((model(x) - y) ** 2).mean())
        optimizer.step()
        if hooks is not None:
            logged = hooks.on_step(step + 1)
            if logged:
                metrics[step + 1] = logged
        if args.save_at is not None and step + 1 == args.save_at:
            accelerator.save_state(str(out / "state"))
            if accelerator.is_main_process:
                (out / "state" / "step.txt").write_text(str(step + 1))
            accelerator.wait_for_everyone()

    state_dict = accelerator.get_state_dict(model)  # full, on the main process
    if accelerator.is_main_process:
        torch.save({k: v.detach().clone() for k, v in state_dict.items()}, out / "params.pt")
        info = {
            "processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "is_fsdp2": accelerator.is_fsdp2,
            "model_type": type(model).__name__,
            "state_files": sorted(p.name for p in (out / "state").iterdir()) if (out / "state").exists() else [],
            "metrics": {str(k): v for k, v in metrics.items()},
        }
        (out / "info.json").write_text(json.dumps(info, indent=1))
    if hooks is not None:
        hooks.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group in order (gloo can abort at exit)


if __name__ == "__main__":
    main()
    # Skip interpreter finalization: even after barrier + destroy_process_group on both ranks,
    # gloo's worker thread (pt_gloo_runloop) may still be destroying a completed
    # AsyncAllgatherCoalescedWork (FSDP's all-gathers) whose tensors hold Python objects; if that
    # decref meets interpreter finalization, taking the GIL exits the thread inside a noexcept
    # destructor: std::terminate, "terminate called without an active exception", SIGABRT
    # (gdb backtrace: ~AsyncAllgatherCoalescedWork <- ProcessGroupGloo::runLoop ->
    # TensorImpl::decref_pyobject -> take_gil -> pthread_exit). Seen in ~10-20% of runs on a
    # loaded 2-core machine, only after all outputs were written; not with accelerate_ddp.py.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
