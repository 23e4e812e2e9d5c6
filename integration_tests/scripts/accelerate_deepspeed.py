"""Accelerate + DeepSpeed ZeRO-2 with 2 CPU processes training with one of our algorithms
(default SOAP; one with eigenbases), with
:class:`lightning_precond.accelerate.PreconditionerHooks` collecting staleness metrics.

    accelerate launch --num_processes 2 --use_deepspeed \
        --deepspeed_config_file integration_tests/ds_zero2.json \
        integration_tests/scripts/accelerate_deepspeed.py --out DIR [--steps 10] [--algorithm SOAP]

Needs ``transformers`` installed (else Accelerate does not run DeepSpeed on CPU).
Writes DIR/result.json on the main process: world size, distributed type, the metrics of
every monitored step and the final loss. ``accelerator.num_processes`` reports 1 under
this launch, so the world size is read from ``torch.distributed``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from integration_tests.test_ddp import BATCH, batch, make_model
from lightning_precond.accelerate import PreconditionerHooks
from lightning_precond import registry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--algorithm", default="SOAP", choices=registry.names(has_basis=True))
    args = parser.parse_args()
    torch.set_num_threads(1)
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    out = Path(args.out)
    model = make_model()
    names = dict(model.named_parameters())  # before DeepSpeed wraps the module
    optimizer = registry.ALGORITHMS[args.algorithm].build(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    hooks = PreconditionerHooks(optimizer, monitor_every=2, per_layer=True, names=names)
    half = BATCH // world
    history: list[dict] = []
    loss = torch.tensor(float("nan"))
    for step in range(1, args.steps + 1):
        x, y = batch(step)
        x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        loss = ((model(x) - y) ** 2).mean()
        accelerator.backward(loss)  # DeepSpeed: engine.backward + engine.step
        optimizer.step()  # a no-op wrapper under DeepSpeed
        optimizer.zero_grad()
        metrics = hooks.on_step(step)  # every rank: collect is a collective
        if metrics:
            accelerator.log(metrics, step=step)
            history.append({"step": step, **metrics})
    hooks.close()
    final_loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(final_loss)
        final_loss /= world
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        last = history[-1] if history else {}
        (out / "result.json").write_text(json.dumps({
            "world_size": world,
            "accelerator_num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "zero_stage": accelerator.state.deepspeed_plugin.zero_stage
            if accelerator.state.deepspeed_plugin is not None else None,
            "staleness_mean": last.get("precond/staleness_mean"),
            "staleness_max": last.get("precond/staleness_max"),
            "final_loss": float(final_loss),
            "metrics": history,
        }, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
