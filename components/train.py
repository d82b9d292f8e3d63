"""Distributed CLIP pretraining with Ray Train (TorchTrainer, DDP), tracked in MLflow.

    result = train("s3://b/data/manifest.json", "s3://b/runs/r1", TrainConfig(model="ViT-B-32"),
                   TrackingConfig(experiment="clip"))

The driver (this module) creates the MLflow run, starts (or joins) Ray, runs the TorchTrainer whose
workers execute `components.train_loop.train_loop_per_worker`, then turns the last checkpoint into
`<output>/model.pt` (loadable with `clip_model.checkpoint.load_model`), logs the loss curve and the
model, and writes `<output>/train_result.json`.

Recovery: checkpoints go to `<storage_path>/<run_name>/checkpoint_XXXXXXXX` (local or s3://). A failed
worker restarts the whole group from the latest checkpoint (up to `max_failures` times); submitting
again with the same `run_name` and `storage_path` resumes as well.

CLI (the KubeRay RayJob entrypoint):
    python -m components.train --manifest URI --output URI --config JSON_FILE_OR_STRING \
        [--tracking-uri URI] [--experiment NAME] [--parent-run-id ID]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import config_from_dict
from components import storage
from components.optim import OptimConfig
from components.tracking import TrackingConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Every training setting, logged whole to MLflow. The image size comes from the model config."""

    model: str = "tiny"  # a clip_model config name or JSON path
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # per worker and micro-step; global batch = batch_size * grad_accum * num_workers
    grad_accum: int = 1
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    grad_checkpointing: bool = False
    torch_compile: bool = False
    # CLIP's optimiser recipe (see components/optim.py)
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 1.0  # max global grad norm; None or 0: off
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    checkpoint_every: int = 500  # steps; a final checkpoint is always written
    keep_checkpoints: int = 3
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None  # default {"CPU": 1} (+ {"GPU": 1} with use_gpu)
    loader_workers: int = 2  # DataLoader processes per training worker
    seed: int = 0
    run_name: str = "clip-train"
    storage_path: str | None = None  # local dir or s3://; default <output>/ray
    max_failures: int = 2
    log_every: int = 10  # steps between MLflow metric batches
    progress_every_s: float = 5.0
    system_metrics: bool = True
    fail_at_step: int | None = None  # test hook: the last worker raises once at this step

    def __post_init__(self) -> None:
        self.optim_config()  # validates the optimiser settings
        self.betas = tuple(float(b) for b in self.betas)
        checks = {"steps": self.steps >= 1, "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
                  "checkpoint_every": self.checkpoint_every >= 1, "keep_checkpoints": self.keep_checkpoints >= 1,
                  "num_workers": self.num_workers >= 1, "loader_workers": self.loader_workers >= 0,
                  "max_failures": self.max_failures >= -1, "log_every": self.log_every >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is out of range")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r}: expected one of {PRECISIONS}")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"TrainConfig.run_name={self.run_name!r}: must be a non-empty name without '/'")

    def optim_config(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                           betas=self.betas, eps=self.eps, grad_clip=self.grad_clip, min_lr_ratio=self.min_lr_ratio)

    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision

    def worker_resources(self) -> dict[str, float]:
        res = dict(self.resources_per_worker or {"CPU": 1})
        if self.use_gpu:
            res.setdefault("GPU", 1)
        return res

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return config_from_dict(cls, d)

    @classmethod
    def from_json(cls, text_or_path: str) -> "TrainConfig":
        """A JSON string (starting with '{') or the path of a JSON file."""
        text = text_or_path if text_or_path.lstrip().startswith("{") else Path(text_or_path).read_text()
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"train config {text_or_path[:80]!r}: not valid JSON ({e})") from e


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


def _init_ray(cfg: TrainConfig) -> bool:
    """Join a running Ray (or RAY_ADDRESS); else start a local one sized to the job. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return False
    res = cfg.worker_resources()
    start_local_ray(num_cpus=int(cfg.num_workers * res.get("CPU", 1)) + 1,
                    num_gpus=int(cfg.num_workers * res.get("GPU", 0)))
    return True


def start_local_ray(num_cpus: int, num_gpus: int = 0) -> None:
    """A local Ray whose workers can import this project even when it is not pip-installed."""
    import ray

    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus or None, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})


def _run_config(cfg: TrainConfig, output_uri: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    storage_uri = cfg.storage_path or storage.join(output_uri, "ray")
    kwargs: dict[str, Any] = {}
    if storage.is_s3(storage_uri):
        fs, path = storage.pyarrow_filesystem(storage_uri)
        kwargs = {"storage_filesystem": fs, "storage_path": path}
    else:
        kwargs = {"storage_path": _absolute(storage_uri)}
    return storage_uri, RunConfig(name=cfg.run_name, failure_config=FailureConfig(max_failures=cfg.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints), **kwargs)


def _loss_curve(client, run_id: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: (m.step, m.timestamp))
    by_step = {m.step: m.value for m in history}  # a restart may log a step twice: keep the latest
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(by_step), list(by_step.values()), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss (rank 0)")
    ax.set_title("CLIP training loss")
    ax.grid(alpha=0.3)
    return fig


def _export_model(checkpoint, output_uri: str) -> str:
    """Final checkpoint -> `<output>/model.pt` in clip_model's format; returns its local copy's path."""
    import torch

    from clip_model.checkpoint import save_model
    from clip_model.config import CLIPConfig
    from clip_model.model import CLIP
    from components.train_loop import STATE_FILE

    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
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
    from components import tracking as trk
    from components import wds
    from components.train_loop import train_loop_per_worker

    manifest_uri, output_uri = _absolute(manifest_uri), _absolute(output_uri)
    manifest = wds.load_manifest(manifest_uri)
    train_split = manifest.get("splits", {}).get("train")
    if not train_split or not train_split.get("shards"):
        raise ValueError(f"manifest {manifest_uri}: no 'train' split with shards")
    model_cfg = load_config(cfg.model)  # fail early on an unknown model name or a too small vocabulary
    vocab = wds.load_tokenizer(manifest["tokenizer"]).vocab_size
    if vocab > model_cfg.text.vocab_size:
        raise ValueError(f"tokenizer {manifest['tokenizer']} has {vocab} ids but model {cfg.model!r} has "
                         f"text.vocab_size={model_cfg.text.vocab_size}")
    storage_uri, run_config = _run_config(cfg, output_uri)

    tags = {"manifest_uri": manifest_uri, "manifest_content_hash": str(manifest.get("content_hash", "")),
            "model": cfg.model, "run_name": cfg.run_name}
    with trk.stage_run("train", tracking, params=cfg, tags=tags) as run:
        run_id = run.info.run_id
        tracking_uri = _absolute_tracking_uri(mlflow.get_tracking_uri())
        mlflow.log_params({"manifest_uri": manifest_uri, "manifest_content_hash": tags["manifest_content_hash"],
                           "image_size": model_cfg.vision.image_size, "precision_resolved": cfg.resolved_precision(),
                           "global_batch": cfg.batch_size * cfg.grad_accum * cfg.num_workers,
                           "train_samples": train_split.get("samples", 0), "storage_uri": storage_uri})
        trk.log_json(model_cfg.to_dict(), "config/model.json")
        trk.log_json(manifest, "dataset/manifest.json")

        loop_config = {"cfg": cfg.to_dict(), "manifest_uri": manifest_uri, "output_uri": output_uri,
                       "run_id": run_id, "tracking_uri": tracking_uri, "precision": cfg.resolved_precision(),
                       "cpu_threads": max(1, int(cfg.worker_resources().get("CPU", 1))),
                       "progress_every_s": cfg.progress_every_s, "system_metrics": cfg.system_metrics}
        started_ray = _init_ray(cfg)
        t0 = time.perf_counter()
        try:
            trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                                   scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                                                resources_per_worker=cfg.worker_resources()),
                                   run_config=run_config)
            result = trainer.fit()
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        wall_s = time.perf_counter() - t0
        if result.checkpoint is None:
            raise RuntimeError(f"training run {cfg.run_name} finished without a checkpoint")
        metrics = dict(result.metrics or {})
        checkpoint_uri = _checkpoint_uri(storage_uri, result.checkpoint.path)

        local_model = _export_model(result.checkpoint, output_uri)
        trk.log_file(local_model, "model")
        client = MlflowClient()
        trk.log_figure(_loss_curve(client, run_id), "plots/loss_curve.png")
        out = {"model_uri": storage.join(output_uri, "model.pt"), "run_id": run_id,
               "steps": int(metrics.get("step", 0)), "final_loss": float(metrics.get("loss", float("nan"))),
               "checkpoint_uri": checkpoint_uri, "samples_per_s": float(metrics.get("samples_per_s", 0.0)),
               "resumed_from_step": int(metrics.get("resumed_from_step", 0)),
               "samples_seen": int(metrics.get("samples_seen", 0)), "wall_s": wall_s,
               "manifest_uri": manifest_uri, "manifest_content_hash": tags["manifest_content_hash"]}
        mlflow.log_metrics({"final_loss": out["final_loss"], "samples_per_s": out["samples_per_s"],
                            "train_wall_s": wall_s})
        mlflow.set_tags({"model_uri": out["model_uri"], "checkpoint_uri": checkpoint_uri})
        trk.log_json(out, "train_result.json")
        storage.write_json(storage.join(output_uri, "train_result.json"), out)
    print(f"[train] done: {out['steps']} steps, final loss {out['final_loss']:.4f}, "
          f"{out['samples_per_s']:.1f} samples/s, model {out['model_uri']}", flush=True)
    return out


def _checkpoint_uri(storage_uri: str, checkpoint_path: str) -> str:
    """Ray gives the checkpoint path inside its filesystem (no scheme for S3): give it back as a URI."""
    if storage.is_s3(storage_uri) and not checkpoint_path.startswith("s3://"):
        return "s3://" + checkpoint_path.lstrip("/")
    return checkpoint_path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m components.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="dataset manifest URI (local path or s3://)")
    p.add_argument("--output", required=True, help="output URI for model.pt and train_result.json")
    p.add_argument("--config", default="{}", help="TrainConfig as a JSON string or a JSON file path")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="clip")
    p.add_argument("--parent-run-id", default=None)
    args = p.parse_args(argv)
    cfg = TrainConfig.from_json(args.config)
    result = train(args.manifest, args.output, cfg,
                   TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment,
                                  parent_run_id=args.parent_run_id))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
