"""Lightning callbacks: RootRecomputeScheduler, AdaptiveEigenbasisRefresh, EigenStalenessMonitor."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_precond import SOAP, PreconditionedOptimizer, Shampoo
from lightning_precond.registry import ALGORITHMS, names
from tests.test_accelerate_hooks import REFRESH_INSIDE_THE_STEP
from lightning_precond.callbacks import (
    AdaptiveEigenbasisRefresh,
    AdaptiveRefresh,
    EigenStalenessMonitor,
    RefreshSchedule,
    RootRecomputeScheduler,
    ScheduledRefresh,
    StalenessReport,
    unwrap_optimizer,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\).*",
)

FACTORS = 4  # two weight matrices, a left and a right factor each (one-sided algorithms: see factors())


def factors(name: str) -> int:
    """The factors of TinyModule's two weight matrices under algorithm ``name``."""
    return 2 * ALGORITHMS[name].factored_sides
# The callbacks' tests run with every algorithm that has eigenbases. The exact step counts
# are SOAP's refresh phase (the basis from the first gradient, refreshed after steps k + 1,
# 2k + 1, ...), which all share but those in REFRESH_INSIDE_THE_STEP (Shampoo: roots ready
# before its first preconditioned step, then every k; no decomposition at the first gradient).
WITH_BASIS = names(has_basis=True)


# ---------------------------------------------------------------------------- fixtures
class TinyModule(pl.LightningModule):
    """``optimizer``: a registered algorithm (at its defaults, lr 1e-2) or ``"sgd"``."""

    def __init__(self, optimizer: str = "SOAP", **kwargs: Any) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.optimizer_name = optimizer
        self.optimizer_kwargs = kwargs
        self.opt: torch.optim.Optimizer | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            self.opt = torch.optim.SGD(self.parameters(), lr=0.1)
        else:
            cls = ALGORITHMS[self.optimizer_name].optimizer
            self.opt = cls(self.named_parameters(), lr=1e-2, **self.optimizer_kwargs)
        return self.opt


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 8, generator=g), torch.randn(96, 4, generator=g))
    return DataLoader(data, batch_size=8)


def _trainer(callbacks: list[pl.Callback], logger: Any = False, max_steps: int = 12, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _rows_with(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def _factor_stats(module: TinyModule) -> list[Any]:
    assert isinstance(module.opt, PreconditionedOptimizer)
    return module.opt.preconditioner_stats(names=module.named_parameters())


# ---------------------------------------------------------------------------- monitor
PER_LAYER_FIELDS = (
    "staleness", "eigenvalue_staleness", "steps_since_refresh", "refresh_count", "failure_count", "refresh_seconds"
)
PER_LAYER = [
    f"precond/{name}/{side}/{field}"
    for name in ("net.0.weight", "net.2.weight")
    for side in ("left", "right")
    for field in PER_LAYER_FIELDS
]


def per_layer(module: "TinyModule") -> list[str]:
    """The per-layer keys of the factors the module's optimizer keeps (one side per matrix
    for one-sided algorithms)."""
    return [f"precond/{s.param_name}/{s.side}/{field}" for s in _factor_stats(module) for field in PER_LAYER_FIELDS]
AGGREGATES = [
    "precond/staleness_mean",
    "precond/staleness_max",
    "precond/eigenvalue_staleness_mean",
    "precond/eigenvalue_staleness_max",
    "precond/steps_since_refresh_mean",
    "precond/steps_since_refresh_max",
    "precond/refresh_count_total",
    "precond/failure_count_total",
    "precond/refresh_seconds_total",
    "precond/factors",
]


@pytest.mark.parametrize("name", WITH_BASIS)
def test_monitor_logs_per_layer_and_aggregates_to_csv(name: str, tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    module = TinyModule(name, precondition_frequency=5)
    _trainer([EigenStalenessMonitor(log_every_n_steps=4, per_layer=True)], logger=logger).fit(module, _loader())

    rows = _csv_rows(logger)
    layer_keys = per_layer(module)
    assert len(layer_keys) == factors(name) * len(PER_LAYER_FIELDS)
    for key in layer_keys + AGGREGATES:
        assert sorted(_rows_with(rows, key)) == [4, 8, 12], key
    for key in layer_keys + AGGREGATES:
        for value in _rows_with(rows, key).values():
            assert math.isfinite(value), key
            # staleness lies in [0, 1]; eigenvalue_staleness is a relative change (>= 0, not
            # bounded by 1: KL-Shampoo's and KL-SOAP's EMA eigenvalues exceed it early on)
            if key.endswith(("staleness", "_mean", "_max")) and "steps" not in key and "eigenvalue" not in key:
                assert 0.0 <= value <= 1.0 + 1e-6, (key, value)
            else:
                assert value >= 0.0, (key, value)
    assert set(_rows_with(rows, "precond/factors").values()) == {float(factors(name))}
    # The last values logged are the optimizer's.
    last = {(s.param_name, s.side): s for s in _factor_stats(module)}
    first_name, first_side = next(iter(last))
    assert (_rows_with(rows, f"precond/{first_name}/{first_side}/refresh_count")[12]
            == last[first_name, first_side].refresh_count)
    assert _rows_with(rows, "precond/failure_count_total")[12] == 0.0
    if name not in REFRESH_INSIDE_THE_STEP:
        # SOAP refreshes itself after optimizer steps 6 and 11 (frequency 5): at step 8 every
        # factor was refreshed 2 steps ago, twice in all (plus the initial eigendecomposition).
        assert _rows_with(rows, "precond/steps_since_refresh_max")[8] == 2.0
        assert _rows_with(rows, f"precond/{first_name}/{first_side}/refresh_count")[12] == 3.0


def test_monitor_logs_aggregates_only_by_default(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    _trainer([EigenStalenessMonitor(log_every_n_steps=6)], logger=logger).fit(TinyModule(), _loader())
    rows = _csv_rows(logger)
    assert sorted(_rows_with(rows, "precond/staleness_mean")) == [6, 12]
    columns = {key for key in rows[0] if key.startswith("precond/")}
    assert columns == set(AGGREGATES) | {"precond/skipped_steps_max", "precond/skipped_parameters"}


def test_monitor_per_layer_by_pattern(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    monitor = EigenStalenessMonitor(log_every_n_steps=6, per_layer="net.2.*")
    _trainer([monitor], logger=logger).fit(TinyModule(), _loader())
    columns = {key for key in _csv_rows(logger)[0] if key.startswith("precond/net.")}
    assert columns == {key for key in PER_LAYER if key.startswith("precond/net.2.weight/")}
    with pytest.raises(ValueError, match="per_layer"):
        EigenStalenessMonitor(per_layer=[])


@pytest.mark.parametrize(
    ("trainer_every", "monitor_every", "max_steps", "logged"),
    [
        (3, None, 12, [3, 6, 9, 12]),  # the Trainer's log_every_n_steps
        (50, None, 5, [5]),  # a run shorter than the interval: the report at the end
        (3, 5, 12, [5, 10, 12]),  # an explicit interval wins; the end is reported too
        (0, None, 4, [4]),  # the Trainer logs no steps: only the end
    ],
)
def test_monitor_follows_the_trainer_interval(
    trainer_every: int, monitor_every: int | None, max_steps: int, logged: list[int], tmp_path: Path
) -> None:
    logger = CSVLogger(tmp_path)
    monitor = EigenStalenessMonitor(monitor_every)
    trainer = _trainer([monitor], logger=logger, max_steps=max_steps, log_every_n_steps=trainer_every)
    trainer.fit(TinyModule(), _loader())
    assert sorted(_rows_with(_csv_rows(logger), "precond/staleness_mean")) == logged
    assert monitor.log_every_n_steps == (monitor_every or trainer_every or None)
    assert monitor.last_logged_step == max_steps


def test_monitor_logs_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    _trainer([EigenStalenessMonitor(log_every_n_steps=4, per_layer=True)], logger=logger).fit(TinyModule(), _loader())

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"precond/staleness_mean", "precond/net.0.weight/left/staleness"} <= tags
    staleness = events.Scalars("precond/staleness_max")
    assert [e.step for e in staleness] == [4, 8, 12]
    assert all(0.0 <= e.value <= 1.0 and math.isfinite(e.value) for e in staleness)


def test_monitor_needs_a_logger() -> None:
    with pytest.raises(MisconfigurationException, match="no logger"):
        _trainer([EigenStalenessMonitor(4)], logger=False).fit(TinyModule(), _loader())


# ---------------------------------------------------------------------------- scheduler
@pytest.mark.parametrize("name", WITH_BASIS)
def test_scheduler_owns_the_schedule(name: str) -> None:
    # The optimizer alone would refresh after every step; the scheduler makes it every 4.
    module = TinyModule(name, precondition_frequency=1)
    scheduler = RootRecomputeScheduler(every=4)
    _trainer([scheduler]).fit(module, _loader())

    assert scheduler.refresh_calls == 3 and scheduler.last_refresh_step == 12
    assert scheduler.refresh_seconds > 0.0
    # 1 initial eigendecomposition (first gradient) + refreshes after steps 4, 8, 12.
    assert [s.refresh_count for s in _factor_stats(module)] == [4] * factors(name)
    assert module.opt.refresh_owner is None  # detached at the end of fit


@pytest.mark.parametrize("name", WITH_BASIS)
def test_scheduler_counts_optimizer_steps_under_gradient_accumulation(name: str) -> None:
    module = TinyModule(name, precondition_frequency=100)
    scheduler = RootRecomputeScheduler(every=3)
    _trainer([scheduler], max_steps=6, accumulate_grad_batches=2).fit(module, _loader())
    assert scheduler.refresh_calls == 2 and scheduler.last_refresh_step == 6
    # the decomposition at the first gradient (SOAP & co, and whatever preconditions from step 1)
    initial = 1 if module.opt.first_refresh_steps()[0] <= 1 else 0
    assert [s.refresh_count for s in _factor_stats(module)] == [initial + 2] * factors(name)


@pytest.mark.parametrize("name", WITH_BASIS)
def test_scheduler_warmup_and_callable_in_a_run(name: str) -> None:
    warm = RootRecomputeScheduler(every=5, warmup_steps=3)  # 1, 2, 3, 8
    module = TinyModule(name, precondition_frequency=100)
    _trainer([warm], max_steps=10).fit(module, _loader())
    assert warm.refresh_calls == 4 and warm.last_refresh_step == 8

    picky = RootRecomputeScheduler(schedule=lambda step: step in (2, 7))
    module = TinyModule(name, precondition_frequency=100)
    _trainer([picky], max_steps=10).fit(module, _loader())
    assert picky.refresh_calls == 2 and picky.last_refresh_step == 7


@pytest.mark.parametrize("name", WITH_BASIS)
def test_default_scheduler_follows_the_algorithm(name: str) -> None:
    module = TinyModule(name, precondition_frequency=5)
    scheduler = RootRecomputeScheduler()
    _trainer([scheduler]).fit(module, _loader())
    # As many refreshes as the optimizer makes on its own.
    alone = TinyModule(name, precondition_frequency=5)
    _trainer([]).fit(alone, _loader())
    assert [s.refresh_count for s in _factor_stats(module)] == [s.refresh_count for s in _factor_stats(alone)]
    if name in REFRESH_INSIDE_THE_STEP:
        # roots ready before steps start, start + 5, ... (Shampoo: 5, 10, 15; ASGO: its first
        # step builds them, then 6, 11, 16)
        start = module.opt.first_refresh_steps()[0]
        due = [s for s in range(1, 17) if s >= start - 1 and (s - start + 1) % 5 == 0]
        assert scheduler.refresh_calls == len([s for s in due if s <= 12]) == 2
        assert scheduler.last_refresh_step == max(s for s in due if s <= 12)
        assert [scheduler.should_refresh(s) for s in range(1, 17)] == [s in due for s in range(1, 17)]
    else:
        # SOAP's own phase: after optimizer steps 6 and 11.
        assert scheduler.refresh_calls == 2 and scheduler.last_refresh_step == 11
        assert [scheduler.should_refresh(s) for s in range(1, 17)] == [s in (6, 11, 16) for s in range(1, 17)]


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.parametrize("name", WITH_BASIS)
def test_checkpoint_round_trip_continues_the_schedule(name: str, tmp_path: Path) -> None:
    first = RootRecomputeScheduler(every=4)
    first_monitor = EigenStalenessMonitor(log_every_n_steps=4)
    trainer = _trainer([first, first_monitor], logger=CSVLogger(tmp_path, name="a"), max_steps=6)
    trainer.fit(TinyModule(name, precondition_frequency=1), _loader())
    # The monitor reported after step 4 and at the end of fit (step 6).
    assert (first.refresh_calls, first.last_refresh_step, first_monitor.last_logged_step) == (1, 4, 6)
    checkpoint = tmp_path / "step6.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    assert saved["RootRecomputeScheduler"]["refresh_calls"] == 1

    resumed = RootRecomputeScheduler(every=4)
    resumed_monitor = EigenStalenessMonitor(log_every_n_steps=4)
    logger = CSVLogger(tmp_path, name="b")
    module = TinyModule(name, precondition_frequency=1)
    _trainer([resumed, resumed_monitor], logger=logger, max_steps=12).fit(module, _loader(), ckpt_path=checkpoint)

    # Counters continue (1 + refreshes after steps 8 and 12), no refresh replayed at step 7.
    assert (resumed.refresh_calls, resumed.last_refresh_step) == (3, 12)
    assert [s.refresh_count for s in _factor_stats(module)] == [4] * factors(name)
    assert resumed_monitor.last_logged_step == 12
    assert sorted(_rows_with(_csv_rows(logger), "precond/staleness_mean")) == [8, 12]


# ---------------------------------------------------------------------------- adaptive
@pytest.mark.parametrize("name", WITH_BASIS)
def test_adaptive_refresh_logs_counts(name: str, tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    module = TinyModule(name, precondition_frequency=1)
    adaptive = AdaptiveEigenbasisRefresh(tolerance=0.05, check_every=4)
    _trainer([adaptive], logger=logger).fit(module, _loader())

    rows = _csv_rows(logger)
    counts = _rows_with(rows, "precond/adaptive_refreshed")
    # precondition_frequency=1 makes Shampoo precondition from step 1, whose roots it builds
    # inside that step (as ASGO): no extra check for roots (test_adaptive_gives_shampoo_roots_
    # before_preconditioning has one, with a later start)
    assert sorted(counts) == [4, 8, 12]
    assert all(c == int(c) and 0 <= c <= factors(name) for c in counts.values())
    assert adaptive.refreshed_total == sum(counts.values())
    assert _rows_with(rows, "precond/adaptive_refreshed_total")[12] == adaptive.refreshed_total
    assert adaptive.refresh_calls == len(counts) and module.opt.refresh_owner is None
    # Only the checks refreshed: one initial decomposition plus at most one per check.
    assert all(1 <= s.refresh_count <= 4 for s in _factor_stats(module))


def test_adaptive_gives_shampoo_roots_before_preconditioning() -> None:
    module = TinyModule("Shampoo", precondition_frequency=5)  # preconditions from step 5
    adaptive = AdaptiveEigenbasisRefresh(tolerance=0.5, check_every=50)
    _trainer([adaptive], max_steps=6).fit(module, _loader())
    # The extra check after step 4 refreshes every never-refreshed factor.
    assert adaptive.last_refresh_step == 4 and adaptive.refreshed_total == FACTORS
    assert all(s.refresh_count == 1 for s in _factor_stats(module))
    assert all(math.isfinite(p.detach().abs().max().item()) for p in module.parameters())


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make",
    [
        lambda: RootRecomputeScheduler(every=2),
        lambda: AdaptiveEigenbasisRefresh(),
        lambda: EigenStalenessMonitor(2),
    ],
    ids=["scheduler", "adaptive", "monitor"],
)
def test_foreign_optimizer_is_rejected(make: Any, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"PreconditionedOptimizer.*SGD"):
        _trainer([make()], logger=CSVLogger(tmp_path)).fit(TinyModule("sgd"), _loader())


def test_two_schedule_owners_are_rejected() -> None:
    callbacks = [RootRecomputeScheduler(every=2), AdaptiveEigenbasisRefresh()]
    with pytest.raises(MisconfigurationException, match=r"AdaptiveEigenbasisRefresh.*owns"):
        _trainer(callbacks).fit(TinyModule(), _loader())


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: RootRecomputeScheduler(every=0), "every"),
        (lambda: RootRecomputeScheduler(every=2.5), "every"),
        (lambda: RootRecomputeScheduler(warmup_steps=-1), "warmup_steps"),
        (lambda: RootRecomputeScheduler(warmup_every=0), "warmup_every"),
        (lambda: RootRecomputeScheduler(schedule="often"), "schedule"),
        (lambda: RootRecomputeScheduler(every=3, schedule=lambda s: True), "schedule"),
        (lambda: RootRecomputeScheduler(method="svd"), "method"),
        (lambda: AdaptiveEigenbasisRefresh(tolerance=0.0), "tolerance"),
        (lambda: AdaptiveEigenbasisRefresh(tolerance=1.5), "tolerance"),
        (lambda: AdaptiveEigenbasisRefresh(check_every=0), "check_every"),
        (lambda: AdaptiveEigenbasisRefresh(method="svd"), "method"),
        (lambda: EigenStalenessMonitor(log_every_n_steps=0), "log_every_n_steps"),
        (lambda: EigenStalenessMonitor(log_every_n_steps=True), "log_every_n_steps"),
        (lambda: EigenStalenessMonitor(per_layer=3), "per_layer"),
        (lambda: EigenStalenessMonitor(per_layer=["net.*", 0]), "per_layer"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(make: Any, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()


# ---------------------------------------------------------------------------- pure logic
def _steps(schedule: RefreshSchedule, n: int = 30) -> list[int]:
    return [s for s in range(0, n + 1) if schedule.should_refresh(s)]


def test_fixed_frequency_schedule() -> None:
    assert _steps(RefreshSchedule(every=7)) == [7, 14, 21, 28]
    assert _steps(RefreshSchedule(every=1), 4) == [1, 2, 3, 4]


def test_warmup_then_sparse_schedule() -> None:
    assert _steps(RefreshSchedule(every=10, warmup_steps=4)) == [1, 2, 3, 4, 14, 24]
    assert _steps(RefreshSchedule(every=10, warmup_steps=6, warmup_every=2)) == [2, 4, 6, 16, 26]


def test_callable_schedule() -> None:
    assert _steps(RefreshSchedule(schedule=lambda step: step < 3 or step % 12 == 0)) == [1, 2, 12, 24]


def _soap(**kwargs: Any) -> SOAP:
    return SOAP(nn.Linear(4, 3).named_parameters(), **kwargs)


def test_default_schedule_per_algorithm() -> None:
    with pytest.raises(RuntimeError, match="resolve"):
        RefreshSchedule().should_refresh(3)
    # Basis from the first gradient: refresh when the optimizer itself would (k + 1, 2k + 1, ...).
    assert _steps(RefreshSchedule().resolve(_soap(precondition_frequency=10))) == [11, 21]
    # Shampoo: roots ready before its first preconditioned step, then every k.
    shampoo = Shampoo(nn.Linear(4, 3).named_parameters(), precondition_frequency=10)
    assert _steps(RefreshSchedule().resolve(shampoo)) == [9, 19, 29]
    late = Shampoo(nn.Linear(4, 3).named_parameters(), precondition_frequency=5, start_preconditioning_step=12)
    assert _steps(RefreshSchedule().resolve(late)) == [11, 16, 21, 26]
    # A warm-up without `every` takes the optimizer's frequency after it.
    assert _steps(RefreshSchedule(warmup_steps=2).resolve(_soap(precondition_frequency=10))) == [1, 2, 12, 22]
    # Explicit values are not overridden.
    explicit = RefreshSchedule(every=4)
    assert explicit.resolve(_soap()) is explicit


def test_owner_notes_and_conflicts() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    groups = [
        {"params": list(model[0].parameters()), "precondition_frequency": 4},
        {"params": list(model[1].parameters()), "precondition_frequency": 9},
    ]
    optimizer = SOAP(groups)
    owner = ScheduledRefresh(RefreshSchedule())
    notes = owner.attach([optimizer], "first")
    assert any("different precondition_frequency" in n for n in notes)
    assert owner.should_refresh(5) and not owner.should_refresh(4)  # every 4, SOAP phase
    other = AdaptiveRefresh()
    with pytest.raises(RuntimeError, match="already owned"):
        other.attach([optimizer], "second")
    owner.detach()
    assert optimizer.refresh_owner is None
    other.attach([optimizer], "second")
    assert optimizer.refresh_owner == "second"
    other.detach()

    shampoo = Shampoo(nn.Linear(4, 3).parameters(), precondition_frequency=5)
    notes = ScheduledRefresh(RefreshSchedule(every=20)).attach([shampoo], "late")
    assert any("does not refresh its roots" in n for n in notes)


def test_scheduler_warns_when_shampoo_would_lack_roots() -> None:
    with pytest.warns(UserWarning, match="does not refresh its roots"):
        module = TinyModule("Shampoo", precondition_frequency=4)
        _trainer([RootRecomputeScheduler(every=8)], max_steps=2).fit(module, _loader())


def test_state_round_trip_of_the_cores() -> None:
    report = StalenessReport(every=3)
    assert [report.due(s) for s in range(1, 8)] == [False, False, True, False, False, True, False]
    copy = StalenessReport(every=3)
    copy.load_state_dict(report.state_dict())
    assert copy.due(8) is False and copy.due(9) is True
    # A jump (several optimizer steps between calls) still finds the due step ...
    jumping = StalenessReport(every=5)
    jumping.sync(3)
    assert jumping.due(7) is True
    # ... but a fresh object does not replay the steps before its first call.
    assert StalenessReport(every=5).due(7) is False
    # every=None: never due, reports only when asked; pending until the step is reported.
    on_demand = StalenessReport(every=None)
    assert not any(on_demand.due(s) for s in range(1, 20))
    assert on_demand.pending(19) and not on_demand.pending(0)
    with pytest.raises(ValueError, match="every"):
        StalenessReport(every=0)
    adaptive = AdaptiveRefresh(check_every=2)
    adaptive.load_state_dict({"last_step": 10, "refreshed_total": 7, "refresh_calls": 3})
    assert adaptive.state_dict()["refreshed_total"] == 7 and adaptive.refresh_calls == 3


def test_unwrap_optimizer() -> None:
    optimizer = _soap()

    class ZeroWrapper:  # DeepSpeed / Accelerate keep the client at `.optimizer`
        def __init__(self, inner: Any) -> None:
            self.optimizer = inner
            self.param_groups = inner.param_groups

    assert unwrap_optimizer(LightningOptimizer(optimizer)) is optimizer
    assert unwrap_optimizer(ZeroWrapper(optimizer)) is optimizer
    assert unwrap_optimizer(LightningOptimizer(ZeroWrapper(optimizer))) is optimizer  # type: ignore[arg-type]
    sgd = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert unwrap_optimizer(ZeroWrapper(sgd)) is sgd


def test_metric_names_for_blocks_and_several_optimizers() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))
    cut = SOAP([("wide", model[0].weight)], max_preconditioner_dim=3)  # 5x6 -> 2x2 blocks
    whole = SOAP([("narrow", model[1].weight)])
    model(torch.randn(4, 6)).sum().backward()
    cut.step()
    whole.step()

    metrics = StalenessReport(every=1, per_layer=True).collect([cut, whole])
    assert metrics["precond/optimizer0/factors"] == 8.0 and metrics["precond/optimizer1/factors"] == 2.0
    for b in range(4):
        assert f"precond/optimizer0/wide/block{b}/left/staleness" in metrics
    assert "precond/optimizer1/narrow/right/eigenvalue_staleness" in metrics
    assert all(math.isfinite(v) for v in metrics.values())
