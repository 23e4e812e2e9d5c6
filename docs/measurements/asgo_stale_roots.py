"""ASGO's stale roots (docs/measurements/asgo_stale_roots.md): short runs of the quality suite's
tasks, and the per-block step of several optimizers fed the same gradients.

    python docs/measurements/asgo_stale_roots.py train mlp "asgo:eigenvalues='refresh'" 3e-3,1e-2,3e-2 0,1
    python docs/measurements/asgo_stale_roots.py steps mlp "muon;asgo:eigenvalues='refresh';asgo" 1e-2 1,2,11,50

A spec is ``name:key=value,...`` with name adamw, muon or asgo and keyword arguments of the
optimizer (Python literals). ``train``: benchmarks/quality.py's train_one loop (the schedule of
convergence.py, weight decay 0, refresh every 10 steps, blocks of 256 on the autoencoder, one
thread, model seed s and data seed s + 1), final eval loss appended to ``--out`` (jsonl).
``steps``: a model trained by AdamW (lr given) supplies each step's gradient; every spec's
optimizer, at lr 1 and kept at the same weights, takes a step from it; printed per matrix: the
step's RMS and spectral norm.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lightning_precond as lp  # noqa: E402
from convergence import lr_factor  # noqa: E402
from tasks import build_task  # noqa: E402

BLOCK = {"autoencoder": 256}
STEPS = {"chargpt": 200, "autoencoder": 100, "mlp": 200}


def parse(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    kw = {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        kw[key] = eval(value, {})  # noqa: S307 - literals from the command line
    return name, kw


def make_opt(spec: str, params: list, lr: float, task: str) -> torch.optim.Optimizer:
    name, kw = parse(spec)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    cls = {"asgo": lp.ASGO, "muon": lp.Muon}[name]
    extra = {"weight_decay": 0.0, "max_preconditioner_dim": BLOCK.get(task, 1024)}
    if name == "asgo":
        extra["precondition_frequency"] = 10
    return cls(params, lr=lr, **{**extra, **kw})


def train(task_name: str, spec: str, lr: float, seed: int, out: Path) -> float:
    task = build_task(task_name, model_seed=seed, data_seed=seed + 1)
    steps = STEPS[task_name]
    model = task.make_model()
    opt = make_opt(spec, list(model.parameters()), lr, task_name)
    base = [g["lr"] for g in opt.param_groups]
    batches = task.batches()
    t0, status = time.time(), "ok"
    for step in range(steps):
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * lr_factor(step, steps)
        loss = task.loss(model, next(batches))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            status = "diverged"
            break
    final = task.evaluate(model) if status == "ok" else math.inf
    if not math.isfinite(final):
        final, status = math.inf, "diverged"
    record = {"task": task_name, "spec": spec, "lr": lr, "seed": seed, "steps": steps, "final": final,
              "status": status, "sec": round(time.time() - t0, 1)}
    with open(out, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return final


def steps(task_name: str, specs: list[str], ref_lr: float, report: list[int]) -> None:
    task = build_task(task_name, model_seed=0, data_seed=1)
    model = task.make_model()
    ref = torch.optim.AdamW(model.parameters(), lr=ref_lr, weight_decay=0.0)
    shadows = []
    for spec in specs:
        ps = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        shadows.append((spec, ps, make_opt(spec, ps, 1.0, task_name)))
    batches = task.batches()
    for step in range(1, max(report) + 1):
        task.loss(model, next(batches)).backward()
        for spec, ps, opt in shadows:
            before = [p.detach().clone() for p in ps]
            for p, q in zip(ps, model.parameters()):
                p.grad = q.grad.clone()
            opt.step()
            if step in report:
                rows = []
                for p, b in zip(ps, before):
                    if p.ndim < 2:
                        continue
                    d = (b - p.detach()).reshape(p.shape[0], -1)
                    rows.append(f"{tuple(d.shape)}: rms {d.pow(2).mean().sqrt().item():.3g} "
                                f"sn {torch.linalg.matrix_norm(d, 2).item():.3g}")
                print(f"step {step} {spec:30s} | " + " | ".join(rows), flush=True)
        ref.step()
        ref.zero_grad(set_to_none=True)
        for _, ps, _ in shadows:
            for p, q in zip(ps, model.parameters()):
                p.data.copy_(q.data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("train", "steps"))
    ap.add_argument("task", choices=tuple(STEPS))
    ap.add_argument("spec", help="train: one spec; steps: specs separated by ';'")
    ap.add_argument("lrs", help="train: comma list of lrs; steps: the AdamW lr of the gradient source")
    ap.add_argument("which", help="train: comma list of seeds; steps: comma list of steps to print")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("asgo_stale_roots.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mode == "train":
        for seed in (int(s) for s in args.which.split(",")):
            for lr in (float(x) for x in args.lrs.split(",")):
                train(args.task, args.spec, lr, seed, args.out)
    else:
        steps(args.task, args.spec.split(";"), float(args.lrs), [int(s) for s in args.which.split(",")])


if __name__ == "__main__":
    main()
