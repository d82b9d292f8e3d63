"""Ray Train CLIP pretraining: 2 CPU workers, the tiny model, synthetic shape shards.

One local Ray instance and one MLflow store serve the whole module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from components.common import config, storage
from components.common.tracking import TrackingConfig
from components.train.config import OptimConfig, TrainConfig
from components.train.stage import train
from tests.fixtures_data import shape_shards  # noqa: F401  (a pytest fixture)

EXPERIMENT = "test-train"


HEALTH_CHECK_S = "0.5"  # Ray Train's controller polls the workers this often (default 2 s): a run's end, its
# reports and a failure are seen sooner, so each run in the module takes a few seconds less


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A local Ray for the module, started after the S3 fixture set its environment (workers inherit it)."""
    from components.common.ray_runtime import ray_session

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_S)  # read by the controller, a Ray actor
        with ray_session(num_cpus=3):
            yield


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> TrackingConfig:
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    return TrackingConfig(tracking_uri=uri, experiment=EXPERIMENT)


def small_config(**kw) -> TrainConfig:
    base = dict(model_config="tiny", steps=12, batch_size=32, num_workers=2, loader_workers=0, checkpoint_every=4,
                keep_checkpoints=2, log_every=2, max_failures=1, progress_every_s=2.0,
                lr=1e-3, warmup_steps=3, grad_clip=1.0)
    base.update(kw)
    return config.from_dict(TrainConfig, base)


def checkpoint_dirs(storage_uri: str, run_name: str) -> list[str]:
    files = storage.list_files(storage.join(storage_uri, run_name))
    return sorted({f.split("/")[-2] for f in files if f.endswith("/state.pt")})


def test_config_round_trip_and_validation():
    cfg = config.from_json(TrainConfig, json.dumps({"model_config": "ViT-B-32", "steps": 5, "lr": 1e-4,
                                                     "betas": [0.9, 0.95]}))
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.eps == 1e-6 and cfg.optim.weight_decay == 0.2
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_for(cfg.steps) == 1
    assert config.from_dict(TrainConfig, config.to_dict(cfg)) == cfg
    assert cfg.resolved_precision() == "fp32" and TrainConfig(gpus_per_worker=1).resolved_precision() == "bf16"
    with pytest.raises(config.ConfigError, match="unknown setting 'learning_rate'"):
        config.from_dict(TrainConfig, {"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="lr"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="train_crop"):
        TrainConfig(train_crop="center")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=-1)
    with pytest.raises(ValueError, match=r"budget is given twice \(steps and epochs\)"):
        TrainConfig(steps=10, epochs=2)
    with pytest.raises(ValueError, match="sampling"):
        TrainConfig(sampling="shuffled")
    assert TrainConfig().sampling == "epochs" and TrainConfig().train_crop == "random"


def test_clip_recipe_param_groups_and_schedule():
    import math

    from clip_model.model import build_model
    from components.train.optim import LOGIT_SCALE_MAX, build_optimizer, clamp_logit_scale, lr_factor

    model = build_model("tiny")
    opt = build_optimizer(model, OptimConfig())
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding",
            "visual.positional_embedding", "ln_final.weight", "ln_final.bias"} <= no_decay_names
    assert "visual.conv1.weight" in decay_names and "text_projection" in decay_names
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    # linear warmup, then cosine to zero
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5) and lr_factor(100, 10, 100) == pytest.approx(0.0)
    with __import__("torch").no_grad():
        model.logit_scale.fill_(10.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX)
    assert math.exp(LOGIT_SCALE_MAX) == pytest.approx(100)


def synthetic_batches(batch: int, image_size: int = 64, vocab: int = 600, n: int = 4):
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(1, vocab - 2, (batch, 77), generator=g)
        tokens[:, 0], tokens[:, 12], tokens[:, 13:] = vocab - 2, vocab - 1, 0  # start, end (largest id), pad
        out.append((torch.randn(batch, 3, image_size, image_size, generator=g), tokens))
    return out


@pytest.mark.parametrize("precision,accum,checkpointing", [("bf16", 2, True), ("fp16", 1, False), ("fp32", 1, False)])
def test_train_step_precision_accumulation_checkpointing(precision, accum, checkpointing):
    import torch

    from clip_model.model import build_model
    from components.train.train_step import TrainStep
    from components.train.optim import LOGIT_SCALE_MAX, build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = build_model("tiny")
    model.set_grad_checkpointing(checkpointing)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # above ln(100): the step must clamp it
    ocfg = OptimConfig(lr=1e-3, warmup_steps=0)
    opt = build_optimizer(model, ocfg)
    sched = build_scheduler(opt, ocfg, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, enabled=precision == "fp16")
    step = TrainStep(model, opt, sched, scaler, precision, torch.device("cpu"), grad_accum=accum, grad_clip=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = iter(synthetic_batches(8))
    loss, wait = step.step(batches)
    assert torch.isfinite(loss) and loss.item() > 0.5 and wait >= 0
    assert len(list(batches)) == 4 - accum  # one batch per micro-step
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "visual.conv1.weight" in changed and "token_embedding.weight" in changed
    assert model.logit_scale.item() <= LOGIT_SCALE_MAX + 1e-6 and sched.last_epoch == 1
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
    with pytest.raises(TypeError, match="on_device"):
        step.step(iter([(torch.zeros(8, 3, 64, 64, dtype=torch.uint8), synthetic_batches(8)[0][1])] * accum))


def _step_for(model, accum: int, compile: bool):
    import torch

    from components.train.optim import build_optimizer, build_scheduler
    from components.train.train_step import TrainStep

    ocfg = OptimConfig(lr=1e-3, warmup_steps=0)
    opt = build_optimizer(model, ocfg)
    # aot_eager: dynamo (which decides graph breaks and recompiles) and AOTAutograd without inductor's
    # C++ code generation, which takes ~40 s on two cores; the GPU check runs inductor.
    return TrainStep(model, opt, build_scheduler(opt, ocfg, total_steps=10), torch.amp.GradScaler("cpu", enabled=False),
                     "fp32", torch.device("cpu"), grad_accum=accum, grad_clip=1.0, compile=compile,
                     compile_backend="aot_eager")


def test_regional_compile_no_graph_breaks_no_recompiles_across_steps():
    import torch
    from torch._dynamo.utils import counters  # dynamo's own tally of compiled graphs and graph breaks

    from clip_model.model import build_model

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = build_model("tiny")
    compiled = build_model("tiny")
    compiled.load_state_dict(eager.state_dict())
    batches = synthetic_batches(8, n=8)
    eager_step, compiled_step = _step_for(eager, 2, compile=False), _step_for(compiled, 2, compile=True)
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in compiled.residual_blocks()) and len(compiled.residual_blocks()) == 4

    first = compiled_step.step(iter(batches[:2]))[0]  # compiles
    assert torch.allclose(first, eager_step.step(iter(batches[:2]))[0], atol=1e-5)
    # one graph per tower and grad mode (the accumulation's gradient-free first pass), shared by every
    # block of the tower: not one per block; fullgraph=True would have raised on a graph break
    assert counters["stats"]["unique_graphs"] == 4 and not counters["graph_break"]
    with torch.compiler.set_stance("fail_on_recompile"):  # raises if a later step needs a new graph
        for i in range(1, 4):
            loss = compiled_step.step(iter(batches[2 * i:2 * i + 2]))[0]
            assert torch.allclose(loss, eager_step.step(iter(batches[2 * i:2 * i + 2]))[0], atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 4
    torch._dynamo.reset()


def test_train_step_does_not_wait_for_the_device(monkeypatch):
    """A step converts no tensor to a Python value (each such conversion waits for a GPU)."""
    import torch

    from clip_model.model import build_model

    torch.manual_seed(0)
    step = _step_for(build_model("tiny"), 2, compile=False)
    batches = iter(synthetic_batches(8))
    step.step(batches)  # warm-up: lazy state (optimizer moments, cached labels)

    def forbidden(name):
        def f(self, *a, **kw):
            raise AssertionError(f"Tensor.{name} in a training step waits for the device")
        return f

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    loss, _ = step.step(batches)
    monkeypatch.undo()
    assert loss.requires_grad is False and loss.item() > 0


def test_worker_loop_without_ray_checkpoints_and_resumes(shape_shards, tmp_path):
    """The per-worker loop in this process (LocalWorker, what the GPU check runs), with two reader
    workers and accumulation: it reports every checkpoint, keeps the newest and resumes from it."""
    from components.train.loop import run_worker_loop
    from components.train.worker import LocalWorker

    def loop_config(steps: int) -> dict:
        cfg = small_config(steps=steps, checkpoint_every=2, log_every=1, batch_size=8, grad_accum=2, loader_workers=2,
                           loader_prefetch=1, system_metrics=False, cpus_per_process=1)
        return {"cfg": config.to_dict(cfg), "manifest_uri": shape_shards, "output_uri": str(tmp_path),
                "run_id": None, "tracking_uri": None}

    worker = LocalWorker(tmp_path / "checkpoints", keep=2)
    run_worker_loop(loop_config(4), worker)
    assert [r["step"] for r in worker.reports] == [2, 4] and worker.reports[-1]["samples_seen"] == 4 * 8 * 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_00000002", "checkpoint_00000004"]
    assert worker.load_state()["step"] == 4
    again = LocalWorker(tmp_path / "checkpoints", keep=2)
    run_worker_loop(loop_config(6), again)
    assert [(r["step"], r["resumed_from_step"]) for r in again.reports] == [(6, 4)]
    assert again.reports[-1]["samples_seen"] == 6 * 8 * 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_00000004", "checkpoint_00000006"]


def test_the_latest_checkpoint_on_storage_is_a_complete_one(tmp_path):
    """What a restart may take from storage beside Ray Train's registered checkpoint: the newest folder whose
    state.pt has the size its meta.json records (an upload cut short, or one whose meta.json has not landed,
    is passed over); a folder given directly is taken as it is."""
    from components.train.worker import checkpoint_name, checkpoint_step, latest_checkpoint

    def folder(step: int, state: bytes, recorded: int | None) -> Path:
        d = tmp_path / checkpoint_name(step)
        d.mkdir()
        (d / "state.pt").write_bytes(state)
        if recorded is not None:
            (d / "meta.json").write_text(json.dumps({"step": step, "state_bytes": recorded}))
        return d

    assert latest_checkpoint(str(tmp_path)) is None
    folder(4, b"x" * 10, 10)
    folder(8, b"x" * 10, 10)
    folder(12, b"x" * 5, 10)  # cut short
    folder(16, b"x" * 10, None)  # meta.json not there yet
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own files are no checkpoint
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_00000008")
    assert checkpoint_step(latest_checkpoint(str(tmp_path))) == 8
    assert latest_checkpoint(str(tmp_path / "checkpoint_00000012")) == str(tmp_path / "checkpoint_00000012")
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        checkpoint_step("runs/checkpoint_2026-12-06_22-00-00")


def test_training_learns_checkpoints_on_s3_and_tracks(ray_local, tracking, shape_shards, bucket):
    """A short run on S3 storage: the loss falls, checkpoints and the model land in the bucket, and the
    MLflow run holds config, lineage, per-step and system metrics, the loss curve and the model."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from clip_model.checkpoint import load_model

    output = f"s3://{bucket}/runs/r1"
    cfg = small_config(steps=30, checkpoint_every=12, log_every=1, run_name="learn", lr=2e-3, warmup_steps=4)
    res = train(shape_shards, output, cfg, tracking)

    assert res["steps"] == 30 and res["resumed_from_step"] == 0 and res["samples_per_s"] > 0
    assert res["samples_seen"] == 30 * 32 * 2
    # checkpoints in the run's storage: every 12 steps and the final one, the newest 2 kept
    assert checkpoint_dirs(f"{output}/ray", "learn") == ["checkpoint_00000024", "checkpoint_00000030"]
    assert res["checkpoint_uri"] == f"{output}/ray/learn/checkpoint_00000030"
    # the model file loads with clip_model; train_result.json matches the return value
    assert res["model_uri"] == f"{output}/model.pt"
    model = load_model(storage.read_bytes(res["model_uri"]))
    assert model.visual.image_size == 64 and model.logit_scale.exp().item() <= 100.0 + 1e-4
    assert storage.read_json(f"{output}/train_result.json")["run_id"] == res["run_id"]

    client = MlflowClient(tracking.tracking_uri)
    losses = [m.value for m in sorted(client.get_metric_history(res["run_id"], "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 30
    tenth = len(losses) // 10
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    assert last <= 0.7 * first, f"loss fell only from {first:.3f} to {last:.3f}"

    run = mlflow.get_run(res["run_id"])
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    for key in ("train/lr", "train/logit_scale", "train/samples_per_s", "train/data_wait_s", "final_loss"):
        assert key in m, key
    assert m["metrics_dropped"] == 0 and m["train/shard_read_resumes"] == 0  # a healthy store loses nothing
    assert any(k.startswith("system/") for k in m), sorted(m)
    assert p["optim.lr"] == "0.002" and p["batch_size"] == "32" and p["manifest_uri"] == shape_shards
    manifest = json.loads(Path(shape_shards).read_text())
    assert p["manifest_content_hash"] == manifest["content_hash"] and t["code_version"]
    artifacts = {a.path for d in ("", "plots", "config", "model", "dataset")
                 for a in client.list_artifacts(res["run_id"], d)}
    assert {"plots/loss_curve.png", "config/train.json", "model/model.pt", "train_result.json",
            "dataset/manifest.json"} <= artifacts
    assert run.info.status == "FINISHED"
    from ray._private.state import actors  # every actor of this Ray, ended ones too

    started = {a["ActorClassName"].rsplit(".", 1)[-1] for a in actors().values()}
    assert "RayTrainWorker" in started and "PreemptionWatcher" not in started, "no drain watcher on a local Ray"


def test_worker_failure_resumes_from_checkpoint_then_resubmission_resumes(ray_local, tracking, shape_shards, tmp_path):
    out = tmp_path / "out"
    # two micro-batches per step: DDP syncs gradients on the second only (no_sync on the first)
    cfg = small_config(steps=8, checkpoint_every=4, fail_at_step=6, run_name="fault", batch_size=16, grad_accum=2)
    res = train(shape_shards, str(out), cfg, tracking)
    assert (out / "_injected_failure_step6.marker").exists()  # the failure did happen
    # the restarted group resumed from the latest checkpoint before the failure and finished the run
    assert res["steps"] == 8 and res["resumed_from_step"] == 4
    # the data position continued: samples seen count every optimizer step exactly once
    assert res["samples_seen"] == 8 * 16 * 2 * 2
    assert checkpoint_dirs(str(out / "ray"), "fault") == ["checkpoint_00000004", "checkpoint_00000008"]
    # the restart shows (components/train/attempts.py): the controller recorded the cause, MLflow the attempts
    import mlflow

    from components.train.attempts import history

    done, failures = history(str(out))
    assert [(a["attempt"], a["first_step"]) for a in done] == [(1, 0), (2, 4)]
    assert "RuntimeError: injected failure (fail_at_step=6) on worker rank 1" in failures[-1]["cause"]
    tags = mlflow.get_run(res["run_id"]).data.tags
    assert tags["restarts"] == "1" and tags["attempt_first_steps"] == "0,4"

    # same run name + storage path, submitted through the CLI (the RayJob entrypoint) under a pipeline
    # parent run: the new submission starts from the last checkpoint (step 8)
    from pipelines.cli import main

    parent = mlflow.MlflowClient(tracking.tracking_uri).create_run(
        mlflow.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    cli_config = config.to_dict(small_config(steps=8, checkpoint_every=4, run_name="fault", batch_size=16, grad_accum=2))
    assert main(["train", shape_shards, str(out), "--config", json.dumps(cli_config), "--steps", "10",
                 "--tracking-uri", tracking.tracking_uri, "--experiment", EXPERIMENT, "--parent-run-id", parent]) == 0
    res2 = storage.read_json(str(out / "train_result.json"))
    assert res2["resumed_from_step"] == 8 and res2["steps"] == 10 and res2["samples_seen"] == 10 * 16 * 2 * 2
    assert mlflow.get_run(res2["run_id"]).data.tags["mlflow.parentRunId"] == parent
    assert checkpoint_dirs(str(out / "ray"), "fault") == ["checkpoint_00000008", "checkpoint_00000010"]
    from clip_model.checkpoint import load_model

    assert load_model(res2["model_uri"]).config.embed_dim == 64

    # a new run (its own name and folder, as a new pipeline run) continues that one by its MLflow run id
    cont = train(shape_shards, str(tmp_path / "next"), small_config(steps=12, checkpoint_every=4, run_name="next",
                                                                     batch_size=16, grad_accum=2,
                                                                     resume_from=res2["run_id"]), tracking)
    assert cont["resumed_from_step"] == 10 and cont["steps"] == 12
    assert cont["resumed_from"]["checkpoint_uri"] == str(out / "ray" / "fault" / "checkpoint_00000010")
    tags = mlflow.get_run(cont["run_id"]).data.tags
    assert tags["lineage.resumed_from"] == res2["run_id"] and tags["lineage.resumed_from_run_id"] == res2["run_id"]
    assert tags["lineage.resumed_from_checkpoint"].endswith("/fault/checkpoint_00000010")


def test_cli_rejects_a_bad_config(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["train", str(tmp_path / "m.json"), str(tmp_path), "--config", '{"stepz": 3}']) == 2
    assert "unknown setting 'stepz'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "m.json"), str(tmp_path), "--set", "steps=many"]) == 2
    assert "TrainConfig.steps: 'many' is not an int" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "train_result.json")
