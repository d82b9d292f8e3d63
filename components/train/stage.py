"""Distributed CLIP pretraining with Ray Train (TorchTrainer, DDP), tracked in MLflow.

    result = train("s3://b/data/manifest.json", "s3://b/runs/r1", TrainConfig(model_config="ViT-B-32"),
                   TrackingConfig(experiment="clip"))

The driver (this module) creates the MLflow run, starts (or joins) Ray, runs the TorchTrainer whose
workers execute `components.train.loop.train_loop_per_worker`, then turns the last checkpoint into
`<output>/model.pt` (loadable with `clip_model.checkpoint.load_model`), logs the loss curve and the
model, and writes `<output>/train_result.json`.

Recovery: checkpoints go to `<storage_path>/<run_name>/checkpoint_XXXXXXXX` (local or s3://). A failed
worker restarts the whole group from the latest checkpoint (up to `max_failures` times); submitting
again with the same `run_name` and `storage_path` resumes as well. `resume_from` continues another run
(a new pipeline run, say): its checkpoint folder, the Ray run folder holding them, or its MLflow run id
(`resolve_resume`), recorded as lineage tags and params.

CLI (also the KubeRay RayJob's entrypoint): `clipflow train MANIFEST OUTPUT [--set KEY=VALUE ...]`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from components.common import config, storage
from components.common.ray_runtime import ray_session
from components.common.tracking import TrackingConfig
from components.train.config import TrainConfig

# --------------------------------------------------------------------------- helpers

def _absolute(uri: str) -> str:
    """Ray workers run in their own working directory: pass them absolute paths."""
    return uri if storage.is_s3(uri) else str(Path(uri).expanduser().resolve())


def _absolute_tracking_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def _run_config(cfg: TrainConfig, output_uri: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from components.train.attempts import FailureRecorder

    storage_uri = cfg.storage_path or storage.join(output_uri, "ray")
    kwargs: dict[str, Any] = {}
    if storage.is_s3(storage_uri):
        fs, path = storage.pyarrow_filesystem(storage_uri)
        kwargs = {"storage_filesystem": fs, "storage_path": path}
    else:
        kwargs = {"storage_path": _absolute(storage_uri)}
    return storage_uri, RunConfig(name=cfg.run_name, failure_config=FailureConfig(max_failures=cfg.max_failures),
                                  callbacks=[FailureRecorder(output_uri)],  # restart causes (train/attempts.py)
                                  checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints), **kwargs)


def resolve_resume(resume_from: str, client) -> dict:
    """`resume_from` (a checkpoint folder, a Ray run folder, or an MLflow run id) -> {checkpoint URI, the
    run it came from, the step}: what the workers restore and the lineage records."""
    import re

    from components.train.worker import META_FILE, latest_checkpoint

    source_run = None
    where = resume_from
    if re.fullmatch(r"[0-9a-f]{32}", resume_from):  # an MLflow run id: its checkpoints' folder
        source_run = resume_from
        params = client.get_run(resume_from).data.params
        if "storage_uri" not in params or "run_name" not in params:
            raise ValueError(f"resume_from={resume_from!r}: MLflow run without storage_uri/run_name params "
                             "(not a training run)")
        where = storage.join(params["storage_uri"], params["run_name"])
    checkpoint = latest_checkpoint(_absolute(where))
    if checkpoint is None:
        raise FileNotFoundError(f"resume_from={resume_from!r}: no checkpoint (checkpoint_*/state.pt) at {where}")
    meta_uri = storage.join(checkpoint, META_FILE)
    meta = storage.read_json(meta_uri) if storage.exists(meta_uri) else {}
    return {"checkpoint_uri": checkpoint, "run_id": source_run or meta.get("run_id") or "",
            "step": meta.get("step", "")}


def _loss_curve(client, run_id: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from components.train.view import metric_by_step

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*metric_by_step(client, run_id, "train/loss"), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss (rank 0)")
    ax.set_title("CLIP training loss")
    ax.grid(alpha=0.3)
    return fig


def _export_model(checkpoint, output_uri: str) -> str:
    """Final checkpoint -> `<output>/model.pt` in clip_model's format; returns its local copy's path."""
    from clip_model.checkpoint import save_model
    from clip_model.config import CLIPConfig
    from clip_model.model import CLIP
    from components.train.worker import read_state

    with checkpoint.as_directory() as d:
        state = read_state(d)
    model = CLIP(CLIPConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    local = os.path.join(tempfile.mkdtemp(prefix="clip-model-"), "model.pt")
    save_model(local, model)
    storage.upload_file(local, storage.join(output_uri, "model.pt"))
    return local


# --------------------------------------------------------------------------- the stage

def train(manifest_uri: str, output_uri: str, cfg: TrainConfig, tracking: TrackingConfig) -> dict:
    """Train CLIP on the manifest's train split; returns model_uri, run_id, steps, final_loss,
    checkpoint_uri, samples_per_s (and resumed_from_step, the step the last attempt started at)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from clip_model.config import load_config
    from components.common import tracking as trk
    from components.common.dataset import load_manifest, load_tokenizer
    from components.common.inputs import log_manifest
    from components.train.loop import train_loop_per_worker

    manifest_uri, output_uri = _absolute(manifest_uri), _absolute(output_uri)
    manifest = load_manifest(manifest_uri)
    train_split = manifest.get("splits", {}).get("train")
    if not train_split or not train_split.get("shards"):
        raise ValueError(f"manifest {manifest_uri}: no 'train' split with shards")
    model_cfg = load_config(cfg.model_config)  # fail early on an unknown model name or a too small vocabulary
    load_tokenizer(manifest["tokenizer"], model_cfg.text.vocab_size, f"model {cfg.model_config!r}")
    storage_uri, run_config = _run_config(cfg, output_uri)
    budget = cfg.budget(int(train_split["samples"]))  # refuses a budget given twice or a split under one batch
    resumed = resolve_resume(cfg.resume_from, MlflowClient(tracking.tracking_uri)) if cfg.resume_from else None

    tags = {"manifest_uri": manifest_uri, "manifest_content_hash": str(manifest.get("content_hash", "")),
            "model": cfg.model_config, "run_name": cfg.run_name}
    if resumed:
        tags.update({"lineage.resumed_from": cfg.resume_from, "lineage.resumed_from_checkpoint": resumed["checkpoint_uri"],
                     "lineage.resumed_from_run_id": resumed["run_id"]})
    with trk.stage_run("train", tracking, params=cfg, tags=tags) as run:
        run_id = run.info.run_id
        tracking_uri = _absolute_tracking_uri(mlflow.get_tracking_uri())
        mlflow.log_params({"manifest_uri": manifest_uri, "manifest_content_hash": tags["manifest_content_hash"],
                           "image_size": model_cfg.vision.image_size, "precision_resolved": cfg.resolved_precision(),
                           "global_batch": cfg.global_batch, "processes": cfg.processes,
                           "train_samples": train_split.get("samples", 0), "storage_uri": storage_uri,
                           "budget_given": budget.given, "budget_steps": budget.steps,
                           "budget_epochs": round(budget.epochs, 4), "budget_samples": budget.samples,
                           "steps_per_epoch": budget.steps_per_epoch,
                           "samples_left_out_per_epoch": budget.dropped_per_epoch,
                           **({"resumed_from_step": resumed["step"]} if resumed else {})})
        trk.log_json(model_cfg.to_dict(), "config/model.json")
        trk.log_json(manifest, "dataset/manifest.json")
        log_manifest(manifest, manifest_uri)  # the run's MLflow dataset input

        loop_config = {"cfg": config.to_dict(cfg), "manifest_uri": manifest_uri, "output_uri": output_uri,
                       "run_id": run_id, "tracking_uri": tracking_uri,
                       "checkpoints_uri": storage.join(_absolute(storage_uri), cfg.run_name),  # this run's
                       "resume_from": resumed["checkpoint_uri"] if resumed else None}
        t0 = time.perf_counter()
        with ray_session(num_cpus=cfg.processes * cfg.cpus_per_process + 1,
                         num_gpus=cfg.processes if cfg.use_gpu else None):
            trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                                   scaling_config=ScalingConfig(num_workers=cfg.processes, use_gpu=cfg.use_gpu,
                                                                resources_per_worker=cfg.process_resources()),
                                   run_config=run_config)
            result = trainer.fit()
        wall_s = time.perf_counter() - t0
        if result.checkpoint is None:
            raise RuntimeError(f"training run {cfg.run_name} finished without a checkpoint")
        metrics = dict(result.metrics or {})
        checkpoint_uri = _checkpoint_uri(storage_uri, result.checkpoint.path)
        _drop_unregistered(loop_config["checkpoints_uri"], [c.path for c, _ in result.best_checkpoints])

        local_model = _export_model(result.checkpoint, output_uri)
        trk.log_file(local_model, "model")
        client = MlflowClient()
        trk.log_figure(_loss_curve(client, run_id), "plots/loss_curve.png")
        out = {"model_uri": storage.join(output_uri, "model.pt"), "run_id": run_id,
               "steps": int(metrics.get("step", 0)), "final_loss": float(metrics.get("loss", float("nan"))),
               "checkpoint_uri": checkpoint_uri, "samples_per_s": float(metrics.get("samples_per_s", 0.0)),
               "resumed_from_step": int(metrics.get("resumed_from_step", 0)),
               "samples_seen": int(metrics.get("samples_seen", 0)), "wall_s": wall_s,
               "epochs": int(metrics.get("step", 0)) / budget.steps_per_epoch,  # nominal when resampled
               "steps_per_epoch": budget.steps_per_epoch,
               "shard_read_resumes": int(metrics.get("shard_read_resumes", 0)), "nodes": int(metrics.get("nodes", 1)),
               **({"resumed_from": resumed} if resumed else {}),
               "metrics_dropped": int(metrics.get("metrics_dropped", 0)),
               "manifest_uri": manifest_uri, "manifest_content_hash": tags["manifest_content_hash"]}
        mlflow.log_metrics({"final_loss": out["final_loss"], "samples_per_s": out["samples_per_s"],
                            "train_wall_s": wall_s, "metrics_dropped": out["metrics_dropped"]})
        mlflow.set_tags({"model_uri": out["model_uri"], "checkpoint_uri": checkpoint_uri})
        trk.log_json(out, "train_result.json")
        storage.write_json(storage.join(output_uri, "train_result.json"), out)
    print(f"[train] done: {out['steps']} steps, final loss {out['final_loss']:.4f}, "
          f"{out['samples_per_s']:.1f} samples/s, model {out['model_uri']}"
          + (f"; {out['metrics_dropped']} training metrics could not reach MLflow (dropped)"
             if out["metrics_dropped"] else ""), flush=True)
    return out


def _drop_unregistered(checkpoints_uri: str, kept: list[str]) -> None:
    """Delete the run's checkpoint folders that Ray Train does not keep: one a restart continued from before
    Ray Train had registered it (`components.train.worker`) is never among its checkpoints, so
    `keep_checkpoints` would not remove it."""
    from components.train.worker import CHECKPOINT_PREFIX

    keep = {p.rstrip("/").rsplit("/", 1)[-1] for p in kept}
    prefix = checkpoints_uri.rstrip("/") + "/"
    for f in storage.list_files(checkpoints_uri):
        folder, _, rest = f[len(prefix):].partition("/")
        if rest and folder.startswith(CHECKPOINT_PREFIX) and folder not in keep:
            storage.delete(f)


def _checkpoint_uri(storage_uri: str, checkpoint_path: str) -> str:
    """Ray gives the checkpoint path inside its filesystem (no scheme for S3): give it back as a URI."""
    if storage.is_s3(storage_uri) and not checkpoint_path.startswith("s3://"):
        return "s3://" + checkpoint_path.lstrip("/")
    return checkpoint_path
