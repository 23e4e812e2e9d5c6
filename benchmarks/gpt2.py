"""A GPT-2-shaped workload: a 50257-row tied embedding, width 768, on the offline Shakespeare.

    .venv/bin/python benchmarks/gpt2.py --tag before          # ~25 min on this 2-vCPU machine
    .venv/bin/python benchmarks/gpt2.py --tag after --compare before
    .venv/bin/python benchmarks/gpt2.py --quick --out /tmp/gpt2 # seconds: every path, tiny shapes

Model: ``examples/models.py``'s CharGPT in GPT-2's layout -- vocabulary 50257, width 768, 12
heads, 2 pre-LN blocks (``--layers 4`` for more), learned positions, context 128, the output
head tied to the token embedding (52.9M parameters, 38.6M of them the embedding).

Tokens: the complete Shakespeare (``examples/data.py``, offline), byte-level: byte ``b`` is
token ``b * (vocab // 256)``, so the used rows are spread over the whole table as a real
tokenizer's frequent tokens are (and over every 1024-row block). Only the text's distinct
bytes are ever looked up; with a tied head every row still gets a gradient (the softmax
reaches all of them). Both counts are reported.

Contenders: AdamW (torch, all parameters) and each optimizer of ``--optimizers`` twice:
``all`` -- ``model.named_parameters()``, every matrix preconditioned (the embedding too), as a
new user would start; ``split`` -- :func:`lightning_precond.param_groups` (hidden matrices
preconditioned, embedding / norms / biases on AdamW at the optimizer's lr, no weight decay on
norms and biases). Weight decay 0.01 everywhere (torch's AdamW default), every other
hyperparameter at the optimizer's default, except the learning rates in ``LEARNING_RATES``.

Protocol: all contenders start from the same weights and train in lockstep on the same
batches (``--batch-size`` 2 windows of 128 tokens per step); each step the order is rotated so
machine noise hits everyone alike. One intra-op thread (``--threads``). Per contender:
optimizer state / parameter bytes (``state_bytes()``; AdamW: its state tensors), the first
step's time (forward + backward + ``optimizer.step()``; SOAP & co build their bases there),
the steady step time (median over the steps after the first; also the mean, which includes
the periodic refreshes) and its ratio to AdamW's, the eval loss after the run on fixed
held-out windows (the last 5% of the text) and its difference to AdamW's, and the warnings
the optimizer raised. An ``all`` contender whose training time exceeds ``--cap-seconds`` stops
early (before large dims get an identity side, its steps cost 5-10x AdamW's): its eval loss is
then after fewer steps (the table says how many); AdamW and the ``split`` contenders always run
every step.

DDP: the same contenders on 2 gloo ranks (forked, one thread each), ``--ddp-steps`` steps
each: per-rank state bytes, first and steady step time.

Outputs (``--out``, default ``benchmarks/results/gpt2``): ``<tag>.csv`` (one row per
contender), ``<tag>_ddp.csv``, ``<tag>.json`` (every step time and loss) and ``<tag>.md``
(the tables, the command, the notes; with ``--compare OLD`` also OLD -> this run).
"""

from __future__ import annotations

import argparse
import collections
import csv
import gc
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "examples"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import data as example_data  # noqa: E402  (examples/data.py)
from models import CharGPT  # noqa: E402  (examples/models.py)

from lightning_precond import param_groups  # noqa: E402
from lightning_precond.registry import ALGORITHMS  # noqa: E402

DEFAULT_OPTIMIZERS = ("SOAP", "KLShampoo", "Shampoo", "Muon")
SPLITS = ("all", "split")
#: The demo's learning rates (tuned on a width-128 char-GPT, ``examples/demo.py``) divided by
#: 6 = 768 / 128, the 1/width rule of Adam-type hidden learning rates; no sweep fits the
#: budget at this size. ``--lr NAME=VALUE`` overrides.
LEARNING_RATES = {
    "AdamW": 1e-3,
    "SOAP": 1.7e-3,
    "KLShampoo": 1.7e-3,
    "Muon": 1.7e-3,
    "Shampoo": 5e-4,
    "KLSOAP": 5e-4,
    "EigenvalueCorrectedShampoo": 1.7e-4,
}
#: Besides lr and weight decay (the demo's choices: GPT betas for AdamW, SOAP's factor EMA for
#: KL-Shampoo).
OPTIMIZER_KWARGS: dict[str, dict[str, Any]] = {
    "AdamW": {"betas": (0.9, 0.95)},
    "KLShampoo": {"betas": (0.9, 0.95)},
}
WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class Shape:
    vocab: int
    width: int
    layers: int
    heads: int
    context: int


FULL = Shape(vocab=50257, width=768, layers=2, heads=12, context=128)
QUICK = Shape(vocab=2048, width=32, layers=1, heads=2, context=16)


@dataclass(frozen=True)
class Config:
    shape: Shape
    steps: int
    batch_size: int
    eval_batches: int
    eval_batch_size: int
    cap_seconds: float
    ddp_steps: int
    ddp_cap_seconds: float
    seed: int
    threads: int
    optimizers: tuple[str, ...]
    splits: tuple[str, ...]
    learning_rates: dict[str, float]


# ---------------------------------------------------------------------------- data, model
def build_model(shape: Shape, seed: int) -> CharGPT:
    torch.manual_seed(seed)
    return CharGPT(shape.vocab, block_size=shape.context, n_layer=shape.layers, n_head=shape.heads,
                   n_embd=shape.width, tied_head=True)


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weight once


def build_optimizer(name: str, model: nn.Module, split: str, lr: float) -> torch.optim.Optimizer:
    params: Any = param_groups(model) if split == "split" else list(model.named_parameters())
    kwargs = {"lr": lr, "weight_decay": WEIGHT_DECAY, **OPTIMIZER_KWARGS.get(name, {})}
    if name == "AdamW":
        return torch.optim.AdamW(params, **kwargs)
    return ALGORITHMS[name].optimizer(params, **kwargs)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        total += float(model(x, y)[1]) * x.numel()
        count += x.numel()
    model.train()
    return total / count


# ---------------------------------------------------------------------------- one process
@dataclass
class Contender:
    optimizer_name: str
    split: str
    lr: float
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    step_seconds: list[float] = field(default_factory=list)
    optimizer_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    warnings: collections.Counter[str] = field(default_factory=collections.Counter)
    capped: bool = False
    error: str = ""
    state_bytes: int = 0

    @property
    def label(self) -> str:
        return self.optimizer_name if self.optimizer_name == "AdamW" else f"{self.optimizer_name} ({self.split})"

    @property
    def active(self) -> bool:
        return not (self.capped or self.error)

    def step(self, x: torch.Tensor, y: torch.Tensor, cap: float) -> None:
        assert self.model is not None and self.optimizer is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                started = time.perf_counter()
                loss = self.model(x, y)[1]
                loss.backward()
                middle = time.perf_counter()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                done = time.perf_counter()
            except Exception as exc:  # recorded, the other contenders go on
                self.error = f"{type(exc).__name__}: {exc}"[:300]
                return
        self.warnings.update(str(w.message).split("\n")[0][:160] for w in caught)
        self.step_seconds.append(done - started)
        self.optimizer_seconds.append(done - middle)
        self.losses.append(loss.item())
        if sum(self.step_seconds) > cap:
            self.capped = True


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def run_single(cfg: Config, train: torch.Tensor, eval_set: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    shape = cfg.shape
    contenders = [Contender("AdamW", "all", cfg.learning_rates["AdamW"])]
    contenders += [Contender(name, split, cfg.learning_rates[name]) for name in cfg.optimizers for split in cfg.splits]
    for c in contenders:
        c.model = build_model(shape, cfg.seed)
        c.optimizer = build_optimizer(c.optimizer_name, c.model, c.split, c.lr)
    param_bytes = parameter_bytes(contenders[0].model)
    parameters = sum(p.numel() for p in contenders[0].model.parameters())
    initial_eval = evaluate(contenders[0].model, eval_set)

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    batches = list(example_data.random_batches(train, cfg.batch_size, shape.context, gen, num_batches=cfg.steps))
    looked_up = torch.unique(torch.cat([x.flatten() for x, _ in batches])).numel()
    # Rows of the tied weight with a nonzero gradient after one backward (the head reaches all).
    probe = build_model(shape, cfg.seed)
    probe(*batches[0])[1].backward()
    grad_rows = int((probe.tok_emb.weight.grad.abs().sum(dim=1) > 0).sum())
    del probe

    for index, (x, y) in enumerate(batches):
        order = contenders[index % len(contenders):] + contenders[: index % len(contenders)]
        for c in order:
            if c.active:
                c.step(x, y, cfg.cap_seconds if c.split == "all" and c.optimizer_name != "AdamW" else math.inf)
        if index == 0:
            for c in contenders:  # state exists after the first step
                c.state_bytes = state_bytes(c.optimizer) if c.optimizer is not None else 0
        print(f"step {index + 1}/{cfg.steps}: " + ", ".join(
            f"{c.label} {c.step_seconds[-1]:.1f}s" for c in contenders if c.active and len(c.step_seconds) == index + 1
        ), flush=True)

    rows = []
    adamw = contenders[0]
    adamw_steady = _median(adamw.step_seconds[1:])
    for c in contenders:
        eval_loss = evaluate(c.model, eval_set) if c.step_seconds and not c.error else math.nan
        if c is adamw:
            adamw_eval = eval_loss
        steady = _median(c.step_seconds[1:])
        rows.append({
            "optimizer": c.optimizer_name,
            "groups": "all" if c.optimizer_name == "AdamW" else c.split,
            "lr": c.lr,
            "param_bytes": param_bytes,
            "state_bytes": c.state_bytes,
            "state_over_params": c.state_bytes / param_bytes,
            "first_step_s": c.step_seconds[0] if c.step_seconds else math.nan,
            "first_optimizer_step_s": c.optimizer_seconds[0] if c.optimizer_seconds else math.nan,
            "steady_step_ms": 1e3 * steady,
            "max_step_s": max(c.step_seconds[1:], default=math.nan),
            "mean_step_ms": 1e3 * statistics.fmean(c.step_seconds[1:]) if len(c.step_seconds) > 1 else math.nan,
            "steady_optimizer_step_ms": 1e3 * _median(c.optimizer_seconds[1:]),
            "steady_vs_adamw": steady / adamw_steady,
            "steps": len(c.step_seconds),
            "capped": c.capped,
            "train_loss_last": c.losses[-1] if c.losses else math.nan,
            # the same batch at the same step: comparable also for a capped contender
            "train_minus_adamw_same_step": c.losses[-1] - adamw.losses[len(c.losses) - 1] if c.losses else math.nan,
            "eval_loss": eval_loss,
            "eval_minus_adamw": eval_loss - adamw_eval,
            "warnings": sum(c.warnings.values()),
            "warning_kinds": " | ".join(f"{n}x {m}" for m, n in c.warnings.most_common(3)),
            "error": c.error,
        })
        c.model, c.optimizer = None, None
        gc.collect()
    raw = {
        "initial_eval_loss": initial_eval,
        "rows_looked_up": looked_up,
        "rows_in_text": int(torch.unique(train).numel()),
        "rows_with_gradient": grad_rows,
        "parameters": parameters,
        "steps": {c.label: {"step_seconds": c.step_seconds, "optimizer_seconds": c.optimizer_seconds,
                            "losses": c.losses} for c in contenders},
    }
    return rows, raw


# ---------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, cfg: Config, cases: list[tuple[str, str]], batches: list[Any], out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from integration_tests.launch import running, save_case

    for name, split in cases:
        case = f"{name}-{split}"
        with running(case):
            model = build_model(cfg.shape, cfg.seed)
            ddp = DistributedDataParallel(model)
            optimizer = build_optimizer(name, model, split, cfg.learning_rates[name])
            seconds: list[float] = []
            for step in range(cfg.ddp_steps):
                x, y = batches[step * world + rank]
                started = time.perf_counter()
                ddp(x, y)[1].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seconds.append(time.perf_counter() - started)
                over = torch.tensor([float(sum(seconds) > cfg.ddp_cap_seconds)])
                dist.all_reduce(over, op=dist.ReduceOp.MAX)  # every rank stops together
                if over.item():
                    break
            save_case(out, case, rank, {"state_bytes": state_bytes(optimizer), "seconds": seconds})
            del model, ddp, optimizer
            gc.collect()


def run_ddp(cfg: Config, train: torch.Tensor, param_bytes: int, single: dict[tuple[str, str], int]) -> list[dict[str, Any]]:
    from integration_tests.launch import case_results, launch_cases

    world = 2
    cases = [("AdamW", "all")] + [(name, split) for name in cfg.optimizers for split in cfg.splits]
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    batches = list(example_data.random_batches(train, cfg.batch_size, cfg.shape.context, gen,
                                               num_batches=cfg.ddp_steps * world))
    rows = []
    with tempfile.TemporaryDirectory() as out:
        failure = launch_cases(_ddp_worker, world, cfg, cases, batches, out)
        for name, split in cases:
            try:
                results = case_results(out, f"{name}-{split}", world, failure)
            except BaseException as exc:  # pytest.fail raises a BaseException subclass
                rows.append({"optimizer": name, "groups": split, "error": str(exc)[:300]})
                continue
            per_rank = [r["state_bytes"] for r in results]
            seconds = [max(step) for step in zip(*(r["seconds"] for r in results))]  # the slower rank
            one = single.get((name, split))
            rows.append({
                "optimizer": name,
                "groups": split,
                "state_bytes_rank0": per_rank[0],
                "state_bytes_rank1": per_rank[1],
                "max_rank_over_params": max(per_rank) / param_bytes,
                "max_rank_over_one_process": max(per_rank) / one if one else math.nan,
                "first_step_s": seconds[0],
                "steady_step_ms": 1e3 * _median(seconds[1:]),
                "steps": len(seconds),
                "error": "",
            })
    return rows


# ---------------------------------------------------------------------------- reports
def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return format(value, spec)


def _mb(value: float) -> str:
    mb = value / 2**20
    return f"{mb:,.0f}" if mb >= 10 else f"{mb:.2f}"


def markdown(cfg: Config, command: str, rows: list[dict[str, Any]], raw: dict[str, Any],
             ddp: list[dict[str, Any]], compare: tuple[str, list[dict[str, str]]] | None, tag: str) -> str:
    s = cfg.shape
    lines = [
        f"# GPT-2-shaped workload: `{tag}`",
        "",
        f"Command: `{command}`",
        "",
        f"CharGPT in GPT-2's layout: vocabulary {s.vocab}, width {s.width}, {s.layers} layers, {s.heads} heads, "
        f"context {s.context}, tied head; {raw['parameters']:,} parameters "
        f"({_mb(rows[0]['param_bytes'])} MB float32). Byte-level tokens on the complete Shakespeare (byte b -> "
        f"row b * {s.vocab // 256}); batch {cfg.batch_size} x {s.context} tokens, {cfg.steps} steps in lockstep, "
        f"{cfg.threads} thread(s); eval on {cfg.eval_batches} x {cfg.eval_batch_size} held-out windows "
        f"(initial eval loss {raw['initial_eval_loss']:.3f}).",
        "",
        f"Rows of the {s.vocab}-row embedding: {raw['rows_looked_up']} looked up by the run's input batches "
        f"({raw['rows_in_text']} distinct in the training text); with the tied head "
        f"{raw['rows_with_gradient']} rows get a nonzero gradient at every step (the softmax reaches every row).",
        "",
        "| optimizer | groups | lr | state / params | first step s | steady ms/step | x AdamW | "
        "opt.step ms | slowest later step s | steps | eval loss | - AdamW | warnings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = f"{r['steps']}" + (" (capped)" if r["capped"] else "") + (" (error)" if r["error"] else "")
        lines.append(
            f"| {r['optimizer']} | {r['groups']} | {r['lr']:g} | {_fmt(r['state_over_params'], '.2f')} | "
            f"{_fmt(r['first_step_s'], '.1f')} | {_fmt(r['steady_step_ms'], ',.0f')} | "
            f"{_fmt(r['steady_vs_adamw'], '.2f')} | {_fmt(r['steady_optimizer_step_ms'], ',.0f')} | "
            f"{_fmt(r['max_step_s'], '.1f')} | {steps} | "
            f"{_fmt(r['eval_loss'], '.3f')} | {_fmt(r['eval_minus_adamw'], '+.3f')} | {r['warnings']} |"
        )
    notes = [f"- {r['optimizer']} ({r['groups']}): {r['warning_kinds']}" for r in rows if r["warning_kinds"]]
    notes += [f"- {r['optimizer']} ({r['groups']}) failed: {r['error']}" for r in rows if r["error"]]
    capped = [f"{r['optimizer']} ({r['groups']})" for r in rows if r["capped"]]
    if capped:
        notes.append(
            f"- Capped at {cfg.cap_seconds:g} s of training: {', '.join(capped)}; their eval loss is after the "
            "steps shown, not comparable with the others'. Train loss at their last step minus AdamW's at the same "
            "step (same batch): " + ", ".join(
                f"{r['optimizer']} ({r['groups']}) {_fmt(r['train_minus_adamw_same_step'], '+.3f')}"
                for r in rows if r["capped"]) + "."
        )
    if notes:
        lines += ["", "Warnings, errors and caps:", "", *notes]
    if ddp:
        lines += [
            "",
            f"## 2 DDP ranks (gloo, forked, 1 thread each; {cfg.ddp_steps} steps)",
            "",
            "| optimizer | groups | state MB rank 0 | rank 1 | max rank / params | max rank / 1 process | "
            "first step s | steady ms/step | steps |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ddp:
            if r.get("error"):
                lines.append(f"| {r['optimizer']} | {r['groups']} | failed: {r['error'][:120]} | | | | | | |")
                continue
            lines.append(
                f"| {r['optimizer']} | {r['groups']} | {_mb(r['state_bytes_rank0'])} | {_mb(r['state_bytes_rank1'])} | "
                f"{r['max_rank_over_params']:.2f} | {_fmt(r['max_rank_over_one_process'], '.2f')} | "
                f"{r['first_step_s']:.1f} | {_fmt(r['steady_step_ms'], ',.0f')} | {r['steps']} |"
            )
    if compare is not None:
        old_tag, old_rows = compare
        old = {(r["optimizer"], r["groups"]): r for r in old_rows}
        lines += [
            "",
            f"## `{old_tag}` -> `{tag}`",
            "",
            "| optimizer | groups | state / params | first step s | steady x AdamW | eval loss |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            o = old.get((r["optimizer"], r["groups"]))
            if o is None:
                continue
            pairs = [("state_over_params", ".2f"), ("first_step_s", ".1f"), ("steady_vs_adamw", ".2f"),
                     ("eval_loss", ".3f")]
            cells = [f"{_fmt(float(o[k]), f)} -> {_fmt(r[k], f)}" for k, f in pairs]
            lines.append(f"| {r['optimizer']} | {r['groups']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------- entry point
def _lr(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in LEARNING_RATES:
        raise argparse.ArgumentTypeError(f"unknown optimizer {name!r}; choose from {sorted(LEARNING_RATES)}")
    return name, float(value)


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 3 steps: a smoke run of every path")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 30)")
    parser.add_argument("--batch-size", type=int, default=2, help="windows of `context` tokens per step")
    parser.add_argument("--cap-seconds", type=float, default=None,
                        help="an `all` contender stops after this much training time (default 120)")
    parser.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS),
                        choices=[n for n in LEARNING_RATES if n != "AdamW"])
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--lr", type=_lr, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--ddp-steps", type=int, default=None, help="steps at 2 DDP ranks (default 3; 0: no DDP run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="run", help="file names under --out: <tag>.csv, <tag>.md, ...")
    parser.add_argument("--compare", default=None, metavar="TAG", help="add an OLD -> this table from <TAG>.csv")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpt2")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    if args.layers is not None:
        shape = Shape(shape.vocab, shape.width, args.layers, shape.heads, shape.context)
    cfg = Config(
        shape=shape,
        steps=args.steps or (3 if args.quick else 30),
        batch_size=args.batch_size,
        eval_batches=1 if args.quick else 4,
        eval_batch_size=2 if args.quick else 4,
        cap_seconds=args.cap_seconds or (60.0 if args.quick else 120.0),
        ddp_steps=(2 if args.quick else 3) if args.ddp_steps is None else args.ddp_steps,
        ddp_cap_seconds=30.0 if args.quick else 60.0,
        seed=args.seed,
        threads=args.threads,
        optimizers=tuple(args.optimizers),
        splits=tuple(args.splits),
        learning_rates={**LEARNING_RATES, **dict(args.lr)},
    )
    return args, cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, cfg = parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        started = time.perf_counter()
        text = example_data.load_shakespeare()
        tokens = example_data.byte_tokens(text, cfg.shape.vocab)
        train, held_out = example_data.train_eval_split(tokens, 0.05)
        eval_set = list(example_data.eval_batches(held_out, cfg.eval_batch_size, cfg.shape.context,
                                                  max_batches=cfg.eval_batches))
        rows, raw = run_single(cfg, train, eval_set)
        single = {(r["optimizer"], r["groups"]): r["state_bytes"] for r in rows}
        ddp = run_ddp(cfg, train, rows[0]["param_bytes"], single) if cfg.ddp_steps > 0 else []
        raw["wall_clock_s"] = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)

    args.out.mkdir(parents=True, exist_ok=True)
    compare = None
    if args.compare:
        with open(args.out / f"{args.compare}.csv", newline="") as f:
            compare = (args.compare, list(csv.DictReader(f)))
    command = "python benchmarks/gpt2.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    write_csv(args.out / f"{args.tag}.csv", rows)
    if ddp:
        write_csv(args.out / f"{args.tag}_ddp.csv", ddp)
    report = {"config": asdict(cfg), "command": command, "single": rows, "ddp": ddp, **raw}
    (args.out / f"{args.tag}.json").write_text(json.dumps(report, indent=1, default=str))
    text_md = markdown(cfg, command.strip(), rows, raw, ddp, compare, args.tag)
    text_md += f"\nWall-clock of the whole run: {raw['wall_clock_s'] / 60:.1f} min.\n"
    (args.out / f"{args.tag}.md").write_text(text_md)
    print(text_md)
    return report


if __name__ == "__main__":
    main()
