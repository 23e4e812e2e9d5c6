"""Lightning Trainer(strategy="ddp", devices=2) with our optimizers and callbacks.

Run as a script (Lightning's DDP launcher re-runs this file for rank 1):
    python integration_tests/scripts/lightning_ddp.py --out DIR --steps 20 [--devices 1|2]
        [--algorithms SOAP,Muon,...] [--strategy ddp|fsdp2] [--save CKPT_DIR] [--resume CKPT_DIR]
Fits each algorithm in turn (default: every registered one), each with its own Trainer and
module, in one launch: the process group and the rank processes are set up once. Writes
DIR/<algorithm>/params.pt (rank 0, as soon as that algorithm is done) and
DIR/<algorithm>/world.txt, CSV logs under DIR/<algorithm>/logs; ``--save`` writes
CKPT_DIR/<algorithm>.ckpt, which ``--resume`` reads. The staleness monitor and adaptive
refresh callbacks go with the algorithms that have eigenbases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from integration_tests.lightning_app import TinyRegression, exit_cleanly, save_result  # noqa: E402
from lightning_precond import registry  # noqa: E402
from lightning_precond.callbacks import AdaptiveEigenbasisRefresh, EigenStalenessMonitor  # noqa: E402


def fit(name: str, args: argparse.Namespace, out: Path) -> None:
    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    else:
        strategy = "ddp" if args.devices > 1 else "auto"
    callbacks = []
    if registry.ALGORITHMS[name].has_basis:
        callbacks = [EigenStalenessMonitor(log_every_n_steps=2, per_layer=True),
                     AdaptiveEigenbasisRefresh(tolerance=0.05, check_every=4)]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        accumulate_grad_batches=1 if args.devices > 1 else 2,
        logger=CSVLogger(str(out / "logs"), name="", version=""),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    model = TinyRegression(name, shard=args.strategy == "fsdp2", exact=args.exact_gradients)
    trainer.fit(model, ckpt_path=str(Path(args.resume) / f"{name}.ckpt") if args.resume else None)
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(Path(args.save) / f"{name}.ckpt")
    save_result(trainer, out, model.flat_params())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--algorithms", default=",".join(registry.names()),
                        help="comma list of registered algorithms (default: all)")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp2"])
    parser.add_argument("--exact-gradients", action="store_true",
                        help="a bilinear integer-data loss: bitwise equal gradients at every world size")
    parser.add_argument("--save")
    parser.add_argument("--resume")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.algorithms.split(","):
        fit(name, args, Path(args.out) / name)
    exit_cleanly()


if __name__ == "__main__":
    main()
