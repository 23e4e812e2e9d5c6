"""Lightning Trainer(strategy="ddp", devices=2) with our optimizer and callbacks.

Run as a script (Lightning's DDP launcher re-runs this file for rank 1):
    python integration_tests/scripts/lightning_ddp.py --out DIR --steps 20 [--devices 1|2]
        [--algorithm SOAP] [--save ckpt] [--resume ckpt]
Writes DIR/params.pt (rank 0) and DIR/world.txt; CSV logs under DIR/logs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from integration_tests.lightning_app import TinyRegression, finish  # noqa: E402
from lightning_precond.callbacks import AdaptiveEigenbasisRefresh, EigenStalenessMonitor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--algorithm", default="SOAP")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp2"])
    parser.add_argument("--save")
    parser.add_argument("--resume")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    else:
        strategy = "ddp" if args.devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        accumulate_grad_batches=1 if args.devices > 1 else 2,
        logger=CSVLogger(str(out / "logs"), name="", version=""),
        callbacks=[EigenStalenessMonitor(log_every_n_steps=2), AdaptiveEigenbasisRefresh(tolerance=0.05, check_every=4)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    model = TinyRegression(args.algorithm, shard=args.strategy == "fsdp2")
    trainer.fit(model, ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)
    finish(trainer, out, model.flat_params())


if __name__ == "__main__":
    main()
