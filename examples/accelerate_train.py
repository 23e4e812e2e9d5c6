"""Train a small model with Hugging Face Accelerate, a preconditioned optimizer and the
preconditioner hooks (refresh schedule + staleness metrics).

The task is synthetic (a fixed random teacher network to imitate), so the script needs no
data download. Run it with one process::

    accelerate launch examples/accelerate_train.py --steps 20

or with two CPU processes (``--cpu`` makes Accelerate use gloo instead of silently starting
two independent runs)::

    torchrun --nproc-per-node 2 examples/accelerate_train.py --steps 20 --cpu

Metrics go to ``accelerator.log`` (a CSV file when ``--csv PATH`` is given, else no
tracker) and are printed by the main process.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from torch import nn

from lightning_precond import (
    KLSOAP,
    SOAP,
    EigenvalueCorrectedShampoo,
    KLShampoo,
    Shampoo,
)
from lightning_precond.accelerate import PreconditionerHooks
from lightning_precond.callbacks import AdaptiveRefresh, RefreshSchedule

OPTIMIZERS = {
    "soap": SOAP,
    "shampoo": Shampoo,
    "kl-shampoo": KLShampoo,
    "kl-soap": KLSOAP,
    "ec-shampoo": EigenvalueCorrectedShampoo,
}


class CSVTracker(GeneralTracker):
    """A minimal Accelerate tracker appending ``step,name,value`` rows to one CSV file."""

    name = "csv"
    requires_logging_directory = False

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerow(["step", "name", "value"])

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            for key, value in values.items():
                writer.writerow([step, key, value])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="soap")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--precondition-frequency", type=int, default=10)
    parser.add_argument("--refresh-every", type=int, default=None, help="scheduler interval (default: the optimizer's)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="refresh after every step up to this one")
    parser.add_argument("--adaptive", action="store_true", help="refresh stale factors only (no schedule)")
    parser.add_argument("--tolerance", type=float, default=0.1, help="staleness threshold of --adaptive")
    parser.add_argument("--monitor-every", type=int, default=5, help="staleness metrics interval")
    parser.add_argument("--per-layer", nargs="*", default=None, metavar="PATTERN",
                        help="also log every factor (no PATTERN) or those of the matching parameters")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--csv", type=Path, default=None, help="write metrics to this CSV file")
    parser.add_argument("--cpu", action="store_true", help="force CPU (and gloo with several processes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.grad_accum < 1:
        parser.error(f"--grad-accum must be >= 1, got {args.grad_accum}")
    return args


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(16, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 4))


def train(args: argparse.Namespace) -> tuple[Accelerator, dict[str, float]]:
    """Train; returns the accelerator (still holding the prepared objects) and the last
    staleness metrics."""
    trackers = [CSVTracker(args.csv)] if args.csv is not None else None
    accelerator = Accelerator(cpu=args.cpu, log_with=trackers, gradient_accumulation_steps=args.grad_accum)
    accelerator.init_trackers("accelerate_train", config={"optimizer": args.optimizer, "lr": args.lr})

    torch.manual_seed(args.seed)  # same initial model and teacher on every rank
    teacher = make_model(args.hidden).requires_grad_(False)
    model = make_model(args.hidden)
    optimizer = OPTIMIZERS[args.optimizer](
        model.named_parameters(), lr=args.lr, precondition_frequency=args.precondition_frequency
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher = teacher.to(accelerator.device)

    if args.adaptive:
        policy: dict[str, Any] = {"adaptive": AdaptiveRefresh(tolerance=args.tolerance, check_every=args.monitor_every)}
    else:
        policy = {"scheduler": RefreshSchedule(args.refresh_every, warmup_steps=args.warmup_steps)}
    hooks = PreconditionerHooks(
        optimizer,
        monitor_every=args.monitor_every,
        per_layer=False if args.per_layer is None else (args.per_layer or True),
        names=accelerator.unwrap_model(model).named_parameters(),
        **policy,
    )
    accelerator.register_for_checkpointing(hooks)

    # Each rank draws its own batches.
    generator = torch.Generator().manual_seed(args.seed + 1 + accelerator.process_index)
    step = 0
    last: dict[str, float] = {}
    while step < args.steps:
        x = torch.randn(args.batch_size, 16, generator=generator).to(accelerator.device)
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), teacher(x))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        step += 1
        metrics = {"loss": accelerator.reduce(loss.detach(), reduction="mean").item(), **hooks.on_step(step)}
        accelerator.log(metrics, step=step)
        if "precond/staleness_mean" in metrics:
            last = metrics
            accelerator.print(
                f"step {step:4d}  loss {metrics['loss']:.4f}  "
                f"staleness mean {metrics['precond/staleness_mean']:.4f} max {metrics['precond/staleness_max']:.4f}  "
                f"refreshes {metrics['precond/refresh_count_total']:.0f}"
            )
    final = hooks.report(step)  # the steps after the last interval, if any (every rank calls it)
    if final:
        accelerator.log(final, step=step)
        last = final
    hooks.close()
    accelerator.print(
        f"done: {step} steps on {accelerator.num_processes} process(es), "
        f"{int(last.get('precond/factors', 0))} factors, final loss {metrics['loss']:.4f}"
    )
    if not math.isfinite(metrics["loss"]):
        raise SystemExit("training diverged (non-finite loss)")
    return accelerator, last


def main(argv: list[str] | None = None) -> dict[str, float]:
    accelerator, last = train(parse_args(argv))
    # Shut down in order: release the DDP model first, then end trackers and destroy the
    # process group (end_training). With gloo, letting the process group die at interpreter
    # exit, or destroying it under a live DDP model, sometimes hangs or aborts a process.
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return last


if __name__ == "__main__":
    main()
