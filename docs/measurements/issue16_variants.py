"""Issue 16 (engine half): the final eval loss of one optimizer variant, with the settings of
``benchmarks/convergence.py`` (same tasks, init and batches per seed; warm-up over 5% of the
steps then cosine to 10%; weight decay 0; refresh every 10 steps; factors blocked at 256 on
the autoencoder, 1024 otherwise), at one learning rate.

Usage (one line of JSON per run; ``OMP_NUM_THREADS=1``, one thread)::

    PYTHONPATH=. python docs/measurements/issue16_variants.py TASK OPTIMIZER LR SEED STEPS ['{"kwarg": value}']
    PYTHONPATH=. python docs/measurements/issue16_variants.py autoencoder SOAP 3e-3 0 80 '{"reference": true}'

``issue16_results.jsonl`` holds the runs quoted in the optimizers' docstrings. They were
taken with the tree of commit e1c6a8a (SOAP's betas given explicitly; the shift then was
HeavyBall's ``64 d eps``); ``"shift_mult": "4"`` runs patched
``eigenbasis.power_shift`` to ``4 d eps`` (today's default), ``"overlap": true`` runs patched
``AdamInBasisScaling.on_refresh`` to carry ``V`` over by the squared overlaps
``(Q_old^T Q_new)^2`` (and ``M`` by ``Q_old^T Q_new``) instead of the permutation.
"""
import json
import sys
import time

import torch

import lightning_precond as lp
from benchmarks.convergence import lr_factor
from benchmarks.tasks import build_task


def main() -> None:
    task_name, opt_name = sys.argv[1], sys.argv[2]
    lr, seed, steps = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    kwargs = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    torch.set_num_threads(1)
    task = build_task(task_name, model_seed=seed, data_seed=seed + 1, fashion_root="/usr/share/datasets/fashion-mnist")
    model = task.make_model()
    block = 256 if task_name == "autoencoder" else 1024
    opt = getattr(lp, opt_name)(list(model.parameters()), lr=lr, weight_decay=0.0, precondition_frequency=10,
                                max_preconditioner_dim=block, **kwargs)
    base = [g["lr"] for g in opt.param_groups]
    batches = task.batches()
    started = time.time()
    for step in range(steps):
        for group, lr0 in zip(opt.param_groups, base):
            group["lr"] = lr0 * lr_factor(step, steps)
        batch = next(batches)
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
    print(json.dumps({"task": task_name, "opt": opt_name, "lr": lr, "seed": seed, "steps": steps, "kwargs": kwargs,
                      "final": task.evaluate(model), "seconds": round(time.time() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
