"""Accelerate with 2 CPU processes (launched by ``torchrun --nproc-per-node 2``) training
with our optimizer; ``accelerator.save_state`` / ``load_state`` round trip.

    torchrun --nproc-per-node 2 integration_tests/scripts/accelerate_ddp.py --out DIR --steps 20 \
        [--save-at 10] [--resume DIR/state]
Writes DIR/params.pt and DIR/processes.txt on the main process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from integration_tests.test_ddp import ALGORITHMS, BATCH, batch, make_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--algorithm", default="SOAP")
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--resume")
    args = parser.parse_args()
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    out = Path(args.out)
    model = make_model()
    optimizer = ALGORITHMS[args.algorithm](model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    start = 0
    if args.resume:
        accelerator.load_state(args.resume)
        start = int((Path(args.resume) / "step.txt").read_text())
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
    if accelerator.is_main_process:
        torch.save(params, out / "params.pt")
        (out / "processes.txt").write_text(f"{accelerator.num_processes} {accelerator.distributed_type}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group in order (gloo can abort at exit)


if __name__ == "__main__":
    main()
