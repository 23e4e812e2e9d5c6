"""PreconditionerHooks: plain loops, Accelerator(cpu=True) in-process, and two forked ranks."""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_precond import SOAP, Shampoo
from lightning_precond.accelerate import PreconditionerHooks
from lightning_precond.callbacks import AdaptiveRefresh, RefreshSchedule
from lightning_precond.registry import ALGORITHMS, names

FACTORS = 4  # _model's two weight matrices, both sides factored (one-sided algorithms: factors())


def factors(name: str) -> int:
    return 2 * ALGORITHMS[name].factored_sides


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def _batches(n: int, seed: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def _train(
    model: nn.Module, optimizer: Any, hooks: PreconditionerHooks | None, steps: int
) -> dict[int, dict[str, float]]:
    logged: dict[int, dict[str, float]] = {}
    for step, (x, y) in enumerate(_batches(steps), start=1):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if hooks is not None:
            metrics = hooks.on_step(step)
            if metrics:
                logged[step] = metrics
    return logged


# Shampoo computes its roots inside the step that first preconditions (from that step's
# factors); an owner refreshes between steps, so its default schedule has the roots ready one
# step earlier (after steps 3, 7, 11; test_callbacks pins both phases) and the trajectories
# differ. The others build their basis from the first gradient: the same refreshes, bitwise.
# Roots recomputed inside a step before its direction (StatisticsFirst), so an owner's
# refresh "after step s" is the optimizer's own inside step s + 1: as many, one step earlier.
REFRESH_INSIDE_THE_STEP = frozenset({"Shampoo", "ASGO"})


@pytest.mark.parametrize("name", names(has_basis=True))
def test_default_scheduler_reproduces_the_optimizer_schedule(name: str) -> None:
    """Owning the schedule with the algorithm's default changes nothing, bit for bit (for
    Shampoo: as many refreshes, one step earlier, see REFRESH_INSIDE_THE_STEP)."""
    own = _model()
    own_opt = ALGORITHMS[name].build(own.named_parameters(), precondition_frequency=4)
    _train(own, own_opt, None, 14)

    hooked = _model()
    hooked_opt = ALGORITHMS[name].build(hooked.named_parameters(), precondition_frequency=4)
    with PreconditionerHooks(hooked_opt, scheduler=True) as hooks:
        assert hooks.owns_schedule and hooked_opt.refresh_owner is hooks
        _train(hooked, hooked_opt, hooks, 14)
    assert hooked_opt.refresh_owner is None

    if name not in REFRESH_INSIDE_THE_STEP:
        for a, b in zip(own.parameters(), hooked.parameters(), strict=True):
            assert torch.equal(a, b)
    assert [s.refresh_count for s in own_opt.preconditioner_stats()] == [
        s.refresh_count for s in hooked_opt.preconditioner_stats()
    ]
    if name in REFRESH_INSIDE_THE_STEP:
        schedule = RefreshSchedule().resolve(own_opt)
        assert hooks.last_refresh_step == max(s for s in range(1, 15) if schedule.should_refresh(s))
    else:
        assert hooks.last_refresh_step == 13  # after steps 5, 9, 13


@pytest.mark.parametrize("name", names(has_basis=True))
def test_fixed_schedule_with_warmup_and_metrics(name: str) -> None:
    model = _model()
    optimizer = ALGORITHMS[name].build(model.named_parameters(), precondition_frequency=1)
    hooks = PreconditionerHooks(
        optimizer,
        scheduler=RefreshSchedule(every=5, warmup_steps=2),
        refresh_method="eigh",
        monitor_every=4,
        per_layer=True,
        names=model.named_parameters(),
    )
    assert [s for s in range(1, 13) if hooks.should_refresh(s)] == [1, 2, 7, 12]
    logged = _train(model, optimizer, hooks, 12)
    hooks.close()

    assert sorted(logged) == [4, 8, 12]
    assert hooks.refresh_calls == 4 and hooks.last_refresh_step == 12
    metrics = logged[8]
    assert metrics["precond/factors"] == factors(name)
    assert metrics["precond/steps_since_refresh_max"] == 1.0  # refreshed after step 7
    kept = [s.side for s in optimizer.preconditioner_stats() if s.param_name == "0.weight"]
    assert len(kept) == ALGORITHMS[name].factored_sides
    for side in kept:
        assert 0.0 <= metrics[f"precond/0.weight/{side}/staleness"] <= 1.0
    assert all(math.isfinite(v) for m in logged.values() for v in m.values())
    # 1 initial decomposition + 4 scheduled refreshes; eigh leaves no staleness.
    assert [s.refresh_count for s in optimizer.preconditioner_stats()] == [5] * factors(name)
    assert logged[12]["precond/staleness_max"] < 1e-3


@pytest.mark.parametrize("name", names(has_basis=True))
def test_int_and_callable_schedulers(name: str) -> None:
    model = _model()
    optimizer = ALGORITHMS[name].build(model.parameters(), precondition_frequency=100)
    with PreconditionerHooks(optimizer, scheduler=3) as hooks:
        _train(model, optimizer, hooks, 7)
    assert hooks.refresh_calls == 2 and hooks.last_refresh_step == 6

    with PreconditionerHooks(optimizer, scheduler=lambda step: step == 2) as hooks:
        _train(model, optimizer, hooks, 4)
    assert hooks.refresh_calls == 1 and hooks.last_refresh_step == 2


@pytest.mark.parametrize("name", names(has_basis=True))
def test_monitor_only_keeps_the_optimizer_schedule(name: str) -> None:
    model = _model()
    optimizer = ALGORITHMS[name].build(model.named_parameters(), precondition_frequency=3)
    hooks = PreconditionerHooks(optimizer, monitor_every=5)
    assert not hooks.owns_schedule and optimizer.refresh_owner is None
    logged = _train(model, optimizer, hooks, 10)
    assert sorted(logged) == [5, 10]
    assert not any(key.count("/") > 1 for key in logged[5])  # aggregates only (the default)
    # The refreshes of the optimizer on its own.
    alone = _model()
    alone_opt = ALGORITHMS[name].build(alone.named_parameters(), precondition_frequency=3)
    _train(alone, alone_opt, None, 10)
    assert logged[10]["precond/refresh_count_total"] == sum(s.refresh_count for s in alone_opt.preconditioner_stats())
    if name not in REFRESH_INSIDE_THE_STEP:
        # The optimizer refreshed itself after steps 4, 7, 10.
        assert logged[10]["precond/refresh_count_total"] == factors(name) * 4


@pytest.mark.parametrize("name", names(has_basis=True))
def test_adaptive_refresh_reports_counts(name: str) -> None:
    model = _model()
    optimizer = ALGORITHMS[name].build(model.named_parameters(), precondition_frequency=1)
    hooks = PreconditionerHooks(optimizer, adaptive=AdaptiveRefresh(tolerance=0.05, check_every=3))
    logged = _train(model, optimizer, hooks, 9)
    if name in REFRESH_INSIDE_THE_STEP:  # and the check for roots before preconditioning
        assert {3, 6, 9} <= set(logged) and min(logged) <= 3
    else:
        assert sorted(logged) == [3, 6, 9]
    counts = [logged[s]["precond/adaptive_refreshed"] for s in sorted(logged)]
    assert all(0 <= c <= factors(name) for c in counts)
    assert logged[9]["precond/adaptive_refreshed_total"] == sum(counts)
    hooks.close()


def test_adaptive_shampoo_has_roots_before_preconditioning() -> None:
    model = _model()
    optimizer = Shampoo(model.named_parameters(), precondition_frequency=4)
    hooks = PreconditionerHooks(optimizer, adaptive=True)
    logged = _train(model, optimizer, hooks, 5)
    assert logged == {3: {"precond/adaptive_refreshed": 4.0, "precond/adaptive_refreshed_total": 4.0}}
    hooks.close()


def test_report_at_the_end_and_per_layer_patterns() -> None:
    model = _model()
    optimizer = SOAP(model.named_parameters())
    hooks = PreconditionerHooks(optimizer, monitor_every=4, per_layer="2.*", names=model.named_parameters())
    logged = _train(model, optimizer, hooks, 6)
    assert sorted(logged) == [4]
    assert {k for k in logged[4] if k.count("/") > 1} == {
        f"precond/2.weight/{side}/{field}" for side in ("left", "right")
        for field in ("staleness", "eigenvalue_staleness", "steps_since_refresh", "refresh_count",
                      "failure_count", "refresh_seconds")
    }
    final = hooks.report(6)  # the steps after the last interval
    assert final["precond/factors"] == FACTORS and "precond/2.weight/left/staleness" in final
    assert hooks.report(6) == {}  # reported already
    # Without an interval, report() is the only report.
    quiet = PreconditionerHooks(optimizer)
    assert quiet.on_step(7) == {} and quiet.report(7)["precond/factors"] == FACTORS
    with pytest.raises(ValueError, match="step"):
        quiet.report(-1)
    with pytest.raises(ValueError, match="per_layer"):
        PreconditionerHooks(optimizer, per_layer={"2.*": True})


@pytest.mark.parametrize("name", names(has_basis=True))
def test_state_dict_resumes_the_schedule(name: str) -> None:
    model = _model()
    optimizer = ALGORITHMS[name].build(model.parameters(), precondition_frequency=100)
    hooks = PreconditionerHooks(optimizer, scheduler=4, monitor_every=3)
    for step in range(1, 7):
        hooks.on_step(step)
    state = hooks.state_dict()
    hooks.close()

    resumed = PreconditionerHooks(optimizer, scheduler=4, monitor_every=3)
    resumed.load_state_dict(state)
    assert resumed.refresh_calls == 1 and resumed.last_refresh_step == 4
    assert resumed.on_step(6) == {}  # a repeated step does nothing
    assert resumed.on_step(7) == {}
    resumed.on_step(8)
    assert resumed.refresh_calls == 2 and resumed.last_refresh_step == 8
    assert "precond/staleness_mean" in resumed.on_step(9)
    resumed.close()


def test_errors() -> None:
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"PreconditionedOptimizer.*SGD"):
        PreconditionerHooks(sgd)
    optimizer = SOAP(_model().parameters())
    with pytest.raises(ValueError, match="scheduler and adaptive"):
        PreconditionerHooks(optimizer, scheduler=True, adaptive=True)
    with pytest.raises(ValueError, match="refresh_method"):
        PreconditionerHooks(optimizer, refresh_method="qr")
    with pytest.raises(ValueError, match="method"):
        PreconditionerHooks(optimizer, scheduler=2, refresh_method="svd")
    with pytest.raises(ValueError, match="monitor_every"):
        PreconditionerHooks(optimizer, monitor_every=0)
    with pytest.raises(ValueError, match="scheduler"):
        PreconditionerHooks(optimizer, scheduler=0)
    with pytest.raises(ValueError, match="scheduler"):
        PreconditionerHooks(optimizer, scheduler="often")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="adaptive"):
        PreconditionerHooks(optimizer, adaptive=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        PreconditionerHooks(optimizer, monitor_every=2).on_step(-1)
    with pytest.raises(ValueError, match="scheduler"):
        PreconditionerHooks(optimizer).should_refresh(3)
    first = PreconditionerHooks(optimizer, scheduler=2)
    with pytest.raises(RuntimeError, match="already owned"):
        PreconditionerHooks(optimizer, adaptive=True)
    first.close()
    PreconditionerHooks(optimizer, adaptive=True).close()


# ---------------------------------------------------------------------------- Accelerate
@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps process-wide singletons; reset them so other tests start clean."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_hooks_with_accelerator_cpu(fresh_accelerate_state: None, tmp_path: Path) -> None:
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _model()
    optimizer = SOAP(model.named_parameters(), precondition_frequency=100)
    model, prepared = accelerator.prepare(model, optimizer)
    assert isinstance(prepared, AcceleratedOptimizer)
    hooks = PreconditionerHooks(prepared, scheduler=2, monitor_every=2, names=model.named_parameters())
    assert hooks.optimizer is optimizer and optimizer.refresh_owner is hooks
    accelerator.register_for_checkpointing(hooks)

    step, logged = 0, {}
    for x, y in _batches(12):  # 12 micro-batches, 6 optimizer steps
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            prepared.step()
            prepared.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            logged[step] = hooks.on_step(step)
    assert step == 6
    assert [s for s, m in logged.items() if m] == [2, 4, 6]
    assert hooks.refresh_calls == 3 and hooks.last_refresh_step == 6
    assert [s.refresh_count for s in optimizer.preconditioner_stats()] == [4] * FACTORS

    accelerator.save_state(str(tmp_path / "state"))
    hooks.on_step(8)
    assert hooks.refresh_calls == 4 and hooks.last_refresh_step == 8
    accelerator.load_state(str(tmp_path / "state"))  # the registered hooks are restored too
    assert hooks.refresh_calls == 3 and hooks.last_refresh_step == 6
    hooks.close()


# ---------------------------------------------------------------------------- two ranks
def _rank_main(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = nn.parallel.DistributedDataParallel(_model())
    optimizer = SOAP(model.module.named_parameters(), precondition_frequency=2)
    hooks = PreconditionerHooks(
        optimizer, adaptive=AdaptiveRefresh(tolerance=0.05, check_every=3), monitor_every=3
    )
    logged: dict[int, dict[str, float]] = {}
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    for step in range(1, 7):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        logged[step] = hooks.on_step(step)
    hooks.close()
    scheduled = PreconditionerHooks(optimizer, scheduler=2)
    for step in range(7, 11):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        scheduled.on_step(step)
    scheduled.close()
    stats = optimizer.preconditioner_stats(gather=True)
    result = {
        "world_size": dist.get_world_size(),
        "logged": logged,
        "refresh_counts": [s.refresh_count for s in stats],
        "scheduled_calls": scheduled.refresh_calls,
        "params": [p.detach().flatten().tolist() for p in model.parameters()],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    del model, optimizer, hooks, scheduled
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_gather_metrics_and_count_refreshes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(
        _rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork", join=True
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in results] == [2, 2]
    first, second = results
    assert first["logged"] == second["logged"]  # gathered metrics and reduced counts agree
    assert sorted(k for k, v in first["logged"].items() if v) == ["3", "6"]
    for step in ("3", "6"):
        metrics = first["logged"][step]
        assert metrics["precond/factors"] == FACTORS  # every rank's factors, not only its own
        assert 0 <= metrics["precond/adaptive_refreshed"] <= FACTORS
        assert 0.0 <= metrics["precond/staleness_max"] <= 1.0
    assert first["refresh_counts"] == second["refresh_counts"]
    assert first["scheduled_calls"] == second["scheduled_calls"] == 2  # after steps 8 and 10
    assert first["params"] == second["params"]  # replicas stay identical
