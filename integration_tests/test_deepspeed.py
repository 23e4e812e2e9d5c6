"""DeepSpeed ZeRO 1, 2 and 3: our optimizer as deepspeed.initialize's client optimizer.

Two forked gloo CPU ranks per stage (one launch runs every algorithm, the checkpoint round
trip and the Lightning-facing checks, since DeepSpeed's start-up is slow) must end where one
process ends; refused configurations must fail with an error naming the setting.

Needs the ``deepspeed`` extra (``pip install -e '.[deepspeed]'``): a missing DeepSpeed is
a failure here, not a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lightning_precond as lp
from integration_tests.launch import launch, running
from integration_tests.test_ddp import BATCH, batch, flat_params, owned_blocks, single_thread, train_like_ddp
from integration_tests.test_fsdp import STEPS, make_model
from lightning_precond.registry import ALGORITHMS, names
from lightning_precond.checkpoints import deepspeed_shards, load_shards

RESUME_AT = 10


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Matrices and vectors in two groups (DeepSpeed then steps them in two calls)."""
    params = list(model.parameters())
    order = [len(getattr(p, "ds_shape", p.shape)) for p in params]  # zero.Init empties .shape
    return [
        {"params": [p for p, n in zip(params, order) if n >= 2]},
        {"params": [p for p, n in zip(params, order) if n < 2], "weight_decay": 0.0},
    ]


def ds_config(stage: int, **zero) -> dict:
    config = {"stage": stage, **zero}
    if stage == 3:
        # Small sub-groups: group 0 is stepped in two calls, so routing runs per sub-group;
        # weights are partitioned between steps, biases stay (persistent parameters).
        config.setdefault("sub_group_size", 300)
        config.setdefault("stage3_param_persistence_threshold", 100)
    return {
        "train_micro_batch_size_per_gpu": BATCH // 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": config,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _deepspeed_env(rank: int, world: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import deepspeed

    deepspeed.init_distributed("gloo")  # reuses the gloo group launch() created


def _initialize(stage: int, name: str, seed: int = 0, zero_init: bool = False,
                optimizer_options: dict | None = None, **zero):
    import deepspeed

    if zero_init:  # ZeRO-3 partitions the parameters before the optimizer is built
        with deepspeed.zero.Init(config_dict_or_path=ds_config(stage, **zero)):
            model = make_model()
    else:
        model = make_model() if seed == 0 else _reseeded(seed)
    opt = ALGORITHMS[name].build(param_groups(model), **(optimizer_options or {}))
    # Exactly how Lightning's DeepSpeedStrategy and Accelerate call it.
    engine, wrapper, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, **zero))
    return model, opt, engine, wrapper


def _reseeded(seed: int) -> torch.nn.Module:
    model = make_model()
    torch.manual_seed(seed)
    for p in model.parameters():
        p.data.normal_()
    return model


def _train(engine, steps: range, rank: int, world: int, hooks=None) -> list[dict]:
    per_rank = BATCH // world
    metrics = []
    for step in steps:
        x, y = batch(step)
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = ((engine(x[part]) - y[part]) ** 2).mean()
        engine.backward(loss)
        engine.step()
        if hooks is not None:
            metrics.append(hooks.on_step(step + 1))
    return metrics


def _full_params(model: torch.nn.Module, stage: int) -> torch.Tensor:
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return flat_params(model).clone()
    return flat_params(model).clone()


def _stage_worker(rank: int, world: int, stage: int, out: str) -> None:
    """Every algorithm for ``stage``, then a save/load round trip and the hooks, in one launch."""
    _deepspeed_env(rank, world)
    from lightning_precond.accelerate import PreconditionerHooks
    from lightning_precond.callbacks import unwrap_optimizer
    from lightning_precond.distributed.zero import ZeroRouter

    results: dict = {"world": dist.get_world_size()}
    for name in names():
        with running(f"ZeRO-{stage} {name}"):
            model, opt, engine, wrapper = _initialize(stage, name)
            if name == "KLShampoo":  # set up outside any DeepSpeed call (finds the wrapper by gc)
                assert len(opt.preconditioner_stats(gather=True)) == 8
            _train(engine, range(STEPS), rank, world)
            results[name] = _full_params(model, stage)
            assert isinstance(opt._router, ZeroRouter) and opt._router.stage == stage
            # One routing unit per flat partition DeepSpeed steps: 2 groups, or 3 ZeRO-3 sub-groups.
            assert len(opt._router._units) == (3 if stage == 3 else 2)
            results[f"{name}.comm"] = opt._router.bytes_last_step
            results[f"{name}.owned"] = owned_blocks(name, opt)
            # What Lightning's callbacks and our Accelerate hooks look behind: the ZeRO wrapper.
            assert wrapper is engine.optimizer and wrapper.optimizer is opt
            assert unwrap_optimizer(engine.optimizer) is opt

    if stage == 3:
        model, opt, engine, _ = _initialize(stage, "SOAP", zero_init=True)
        _train(engine, range(STEPS), rank, world)
        results["SOAP.zero_init"] = _full_params(model, stage)

    # Save at step RESUME_AT through DeepSpeed, resume into a differently initialised model.
    checkpoint = Path(out) / "ckpt"
    model, opt, engine, _ = _initialize(stage, "SOAP")
    _train(engine, range(RESUME_AT), rank, world)
    engine.save_checkpoint(str(checkpoint), tag="t")
    model, opt, engine, _ = _initialize(stage, "SOAP", seed=1)
    engine.load_checkpoint(str(checkpoint), tag="t")
    _train(engine, range(RESUME_AT, STEPS), rank, world)
    results["resumed"] = _full_params(model, stage)

    # The hooks behind the ZeRO wrapper: scheduled refreshes and gathered staleness metrics.
    model, opt, engine, wrapper = _initialize(stage, "SOAP")
    hooks = PreconditionerHooks(wrapper, scheduler=4, monitor_every=5, per_layer=False)
    results["metrics"] = _train(engine, range(10), rank, world, hooks)
    results["hook_refreshes"] = hooks.refresh_calls

    # Lightning's own DeepSpeedStrategy code path (made to run on CPU) with our callback.
    results["lightning"] = _lightning_fit(rank, world, stage, out)
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _lightning_fit(rank: int, world: int, stage: int, out: str) -> torch.Tensor:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    from lightning_precond.callbacks import EigenStalenessMonitor

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """Test-only: lifts DeepSpeedStrategy's CUDA checks (private Lightning API)."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        @property
        def root_device(self) -> torch.device:
            return torch.device("cpu", self.local_rank)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, item, _):
            x, y = batch(int(item[0]))
            part = slice(self.global_rank * BATCH // world, (self.global_rank + 1) * BATCH // world)
            return ((self.net(x[part]) - y[part]) ** 2).mean()

        def configure_optimizers(self):
            return ALGORITHMS["SOAP"].build(param_groups(self.net))

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.arange(STEPS), batch_size=1)

    os.environ["NODE_RANK"] = "0"  # with LOCAL_RANK set, Lightning uses the forked ranks as they are
    config = ds_config(stage)
    del config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]  # Lightning sets them
    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=CPUDeepSpeedStrategy(config=config), max_steps=STEPS,
        use_distributed_sampler=False, logger=CSVLogger(out, name="lightning", version=f"zero{stage}"),
        callbacks=[EigenStalenessMonitor(log_every_n_steps=5, per_layer=False)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module)
    wrapper = trainer.optimizers[0]
    assert type(wrapper).__name__.startswith("DeepSpeedZeroOptimizer") and isinstance(wrapper.optimizer, lp.SOAP)
    return _full_params(module.net, stage)


def reference(name: str) -> torch.Tensor:
    model = make_model()
    opt = ALGORITHMS[name].build(param_groups(model))
    with single_thread():
        train_like_ddp(model, opt, range(STEPS), 2)
    return flat_params(model)


def resumed_in_one_process(shards: list[dict]) -> tuple[dict, torch.Tensor]:
    """SOAP for RESUME_AT steps in one process (returns those weights), then a new optimizer
    loading every rank's ``shards`` continues to STEPS (returns the final flat parameters)."""
    model = make_model()
    with single_thread():
        train_like_ddp(model, ALGORITHMS["SOAP"].build(param_groups(model)), range(RESUME_AT), 2)
        at_resume = {k: v.clone() for k, v in model.state_dict().items()}
        opt = ALGORITHMS["SOAP"].build(param_groups(model))
        load_shards(opt, shards)
        train_like_ddp(model, opt, range(RESUME_AT, STEPS), 2)
    return at_resume, flat_params(model)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_equals_one_process(stage, tmp_path):
    launch(_stage_worker, 2, stage, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    for name in names():
        expected = reference(name)
        for r in ranks:
            rel = _relative(r[name], expected)
            print(f"ZeRO-{stage} {name}: relative difference {rel:.2e}")
            assert rel <= 1e-5, f"ZeRO-{stage} {name}: relative difference {rel:.2e}"
        assert torch.equal(ranks[0][name], ranks[1][name])
        if ALGORITHMS[name].has_basis:  # every block is computed by exactly one rank (seen in its stats)
            assert not ranks[0][f"{name}.owned"] & ranks[1][f"{name}.owned"]
            assert len(ranks[0][f"{name}.owned"] | ranks[1][f"{name}.owned"]) == 4
        print(f"ZeRO-{stage} {name}: all-to-all bytes per step (rank 0) {ranks[0][name + '.comm']}")

    if stage == 3:  # optimizer built from zero.Init's already partitioned parameters
        assert _relative(ranks[0]["SOAP.zero_init"], reference("SOAP")) <= 1e-5
    # Lightning's DeepSpeedStrategy passing our optimizer to deepspeed.initialize.
    assert _relative(ranks[0]["lightning"], reference("SOAP")) <= 1e-5
    logged = (tmp_path / "lightning" / f"zero{stage}" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in logged[1:]]
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    assert all(float(r["precond/factors"]) == 8 for r in rows)  # both ranks' factors

    # DeepSpeed checkpoint round trip: continues exactly like the uninterrupted run.
    for r in ranks:
        assert torch.equal(r["resumed"], r["SOAP"]), f"ZeRO-{stage}: resumed run differs"

    # Each rank's file holds only the blocks it owns and its own fragments of the vectors
    # (disk = 1x the state); together they resume a single process (lightning_precond.load_shards).
    files = sorted((tmp_path / "ckpt" / "t").glob("*optim_states.pt"))
    assert len(files) == 2
    client = list(deepspeed_shards(tmp_path / "ckpt", "t"))
    assert client[0]["param_groups"][0]["params"] == [0, 1, 2, 3]
    blocks = [{(index, key) for index, entry in c["state"].items() for key in entry if key.startswith("block")}
              for c in client]
    assert blocks[0] and blocks[1] and not blocks[0] & blocks[1] and len(blocks[0] | blocks[1]) == 4
    fragments = [{index for index, entry in c["state"].items() if "adamw_fragment" in entry} for c in client]
    assert fragments[0] | fragments[1] == {4, 5, 6, 7}  # every bias, in pieces
    assert all(int(c["state"][i]["adamw_fragment"]["step"]) == RESUME_AT for c in client for i in c["state"]
               if "adamw_fragment" in c["state"][i])
    at_resume, single = resumed_in_one_process(client)
    assert _relative(single, ranks[0]["SOAP"]) <= 1e-5
    # DeepSpeed's own fp32 export still reads these checkpoints.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    exported = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"), tag="t")
    for key, value in at_resume.items():
        assert _relative(exported[key], value) <= 1e-5, key

    # Hooks behind the ZeRO wrapper: refreshes every 4 steps, staleness gathered from both ranks.
    for r in ranks:
        assert r["hook_refreshes"] == ranks[0]["hook_refreshes"] >= 1
        reported = [m for m in r["metrics"] if m]
        assert len(reported) == 2 and all("precond/staleness_max" in m for m in reported)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]


# case: (stage, zero_optimization options, other config, expected error type, text it names)
REFUSED = {
    "round_robin": (2, {"round_robin_gradients": True}, {}, NotImplementedError, "round_robin_gradients"),
    "offload": (2, {"offload_optimizer": {"device": "cpu"}}, {"zero_force_ds_cpu_optimizer": False},
                NotImplementedError, "offload_optimizer"),
    "offload3": (3, {"offload_optimizer": {"device": "cpu"}}, {"zero_force_ds_cpu_optimizer": False},
                 NotImplementedError, "offload_optimizer"),
    "elastic": (1, {"elastic_checkpoint": True}, {}, NotImplementedError, "elastic_checkpoint"),
    "universal": (2, {}, {"checkpoint": {"load_universal": True}}, NotImplementedError, "load_universal"),
    "version": (2, {}, {}, NotImplementedError, "not a tested version"),
    "planned_before": (2, {}, {}, RuntimeError, "before deepspeed.initialize"),
}


def _refusal_worker(rank: int, world: int, out: str) -> None:
    _deepspeed_env(rank, world)
    import deepspeed

    messages: dict = {"world": dist.get_world_size()}
    for case, (stage, zero, extra, error_type, _) in REFUSED.items():
        model = make_model()
        opt = ALGORITHMS["SOAP"].build(param_groups(model))
        if case == "planned_before":
            opt.preconditioner_stats()  # plans for plain data parallelism, before DeepSpeed takes over
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={**ds_config(stage, **zero), **extra})
        saved = deepspeed.__version__
        if case == "version":
            deepspeed.__version__ = "0.99.0"
        try:
            _train(engine, range(1), rank, world)
            messages[case] = None
        except error_type as error:
            messages[case] = str(error)
        finally:
            deepspeed.__version__ = saved
    # Without zero_force_ds_cpu_optimizer=false DeepSpeed itself refuses a client optimizer.
    model = make_model()
    try:
        deepspeed.initialize(model=model, optimizer=ALGORITHMS["SOAP"].build(param_groups(model)),
                             config=ds_config(2, offload_optimizer={"device": "cpu"}))
        messages["forced"] = None
    except Exception as error:  # ZeRORuntimeException
        messages["forced"] = str(error)
    torch.save(messages, Path(out) / f"refusals{rank}.pt")


def test_refused_configurations_fail_clearly(tmp_path):
    launch(_refusal_worker, 2, str(tmp_path))
    for rank in range(2):
        messages = torch.load(tmp_path / f"refusals{rank}.pt", weights_only=False)
        assert messages["world"] == 2
        for case, (*_, needle) in REFUSED.items():
            assert messages[case] is not None, f"{case}: not refused"
            assert needle in messages[case], f"{case}: {messages[case]}"
        assert messages["forced"] is not None and "zero_force_ds_cpu_optimizer" in messages["forced"]
