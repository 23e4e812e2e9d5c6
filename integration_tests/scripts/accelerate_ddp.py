"""Accelerate with 2 CPU processes (launched by ``torchrun --nproc-per-node 2``) training
with our optimizers; ``accelerator.save_state`` / ``load_state`` round trip.

    torchrun --nproc-per-node 2 integration_tests/scripts/accelerate_ddp.py --out DIR --steps 20 \
        [--algorithms SOAP,Shampoo,...] [--save-at 10] [--resume SAVED_DIR]
Trains each algorithm (default: every registered one) in turn, each with its own
``Accelerator``, model and optimizer, so that ``save_state`` holds only its objects. Writes
DIR/<algorithm>/params.pt (as soon as that algorithm is done), DIR/<algorithm>/state (with
``--save-at``) and DIR/processes.txt on the main process; ``--resume`` loads
SAVED_DIR/<algorithm>/state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from integration_tests.test_ddp import BATCH, batch, make_model  # noqa: E402
from lightning_precond.registry import ALGORITHMS, names  # noqa: E402


def train(accelerator: Accelerator, name: str, out: Path, args: argparse.Namespace) -> None:
    model = make_model()
    optimizer = ALGORITHMS[name].build(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    start = 0
    if args.resume:
        state = Path(args.resume) / name / "state"
        accelerator.load_state(str(state))
        start = int((state / "step.txt").read_text())
    rank, world = accelerator.process_index, accelerator.num_processes
    half = BATCH // world
    for step in range(start, args.steps):
        x, y = batch(step)
        x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        optimizer.zero_grad()
        accelerator.backward(((model(x) - y) ** 2).mean())
        optimizer.step()
        if args.save_at is not None and step + 1 == args.save_at:
            accelerator.save_state(str(out / "state"))
            if accelerator.is_main_process:
                (out / "state" / "step.txt").write_text(str(step + 1))
    params = torch.cat([p.detach().reshape(-1) for p in accelerator.unwrap_model(model).parameters()])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(params, out / "params.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--algorithms", default=",".join(names()),
                        help=f"comma list of registered algorithms (default: all, {','.join(names())})")
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--resume")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    accelerator = None
    for name in args.algorithms.split(","):
        accelerator = Accelerator(cpu=True)  # a fresh one per algorithm: save_state saves its objects only
        (out / name).mkdir(parents=True, exist_ok=True)
        train(accelerator, name, out / name, args)
    if accelerator.is_main_process:
        (out / "processes.txt").write_text(f"{accelerator.num_processes} {accelerator.distributed_type}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group in order (gloo can abort at exit)


if __name__ == "__main__":
    main()
