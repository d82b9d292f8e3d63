"""The pipeline's steps as plain functions: what each KFP component runs, testable without KFP.

A step turns KFP's small typed values and artifacts into calls of the stage functions in
`components/` and records lineage on the pipeline's parent MLflow run. Artifacts are duck-typed
(`.path`, `.metadata`, and for metrics `.log_metric`), so tests pass simple objects.

Every stage reads and writes its bulky data under `RunContext.work_uri` (a local directory or an
`s3://bucket/prefix/<run id>` prefix); the KFP artifact itself holds a small JSON pointer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components import storage
from components.tracking import TrackingConfig, stage_run, tag_run

SYNTHETIC = "synthetic"  # source / eval URI meaning "generate the bundled synthetic corpus"


@dataclass
class RunContext:
    """What every step of one pipeline run shares; passed between KFP tasks as a JSON string."""

    work_uri: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    s3_endpoint: str = ""
    pipeline_run_id: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunContext":
        ctx = cls(**json.loads(text))
        ctx.activate()
        return ctx

    def activate(self) -> None:
        """Point storage and MLflow at this run's endpoints (in this process)."""
        if self.s3_endpoint:
            os.environ["AWS_ENDPOINT_URL"] = self.s3_endpoint
            os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", self.s3_endpoint)

    @property
    def tracking(self) -> TrackingConfig:
        return TrackingConfig(self.tracking_uri or None, self.experiment, self.parent_run_id or None)

    def uri(self, *parts: str) -> str:
        return storage.join(self.work_uri, *parts)


def _write_pointer(artifact: Any, payload: dict) -> None:
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(payload, indent=2, default=str))
    for key in ("uri", "content_hash", "run_id", "samples"):
        if key in payload and payload[key] is not None:
            artifact.metadata[key] = payload[key]


def _read_pointer(artifact: Any) -> dict:
    return json.loads(Path(artifact.path).read_text())


# ---------------------------------------------------------------------------------------------
def start_tracking(data_root: str, tracking_uri: str, experiment: str, pipeline_run_id: str,
                   s3_endpoint: str, params: dict) -> str:
    """Open the pipeline's parent MLflow run (tagged with the KFP run id); returns the RunContext JSON."""
    import mlflow

    tracking = TrackingConfig(tracking_uri or None, experiment)
    ctx = RunContext(work_uri=storage.join(data_root, pipeline_run_id), tracking_uri=tracking_uri,
                     experiment=experiment, parent_run_id="", s3_endpoint=s3_endpoint,
                     pipeline_run_id=pipeline_run_id)
    ctx.activate()
    with stage_run("pipeline", tracking, params=params,
                   tags={"kfp.run_id": pipeline_run_id, "work_uri": ctx.work_uri}) as run:
        ctx.parent_run_id = run.info.run_id
        # Leave the parent run open: the exit handler closes it with the pipeline's final status.
        mlflow.MlflowClient().set_terminated(run.info.run_id, status="RUNNING")
    return ctx.to_json()


def finish_tracking(tracking_uri: str, experiment: str, pipeline_run_id: str, state: str) -> str:
    """Close the parent run of `pipeline_run_id` with the pipeline's final state (exit handler)."""
    import mlflow

    TrackingConfig(tracking_uri or None, experiment).apply()
    runs = mlflow.search_runs(filter_string=f"tags.`kfp.run_id` = '{pipeline_run_id}' and tags.stage = 'pipeline'",
                              output_format="list")
    status = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED"}.get(state, "FINISHED")
    for run in runs:
        mlflow.MlflowClient().set_terminated(run.info.run_id, status=status)
    return status


# ---------------------------------------------------------------------------------------------
def filter_step(ctx_json: str, source_uri: str, preset: str, synthetic_samples: int, filtered: Any) -> dict:
    """Filter raw pairs (generating the bundled synthetic corpus when source_uri is 'synthetic')."""
    from components.filter import filter_pairs
    from components.filter_rules import FilterConfig

    ctx = RunContext.from_json(ctx_json)
    if source_uri == SYNTHETIC:
        source_uri = _generate_synthetic_corpus(ctx, synthetic_samples)
    cfg = FilterConfig.preset(preset)
    out = ctx.uri("filtered")
    with stage_run("filter", ctx.tracking, params=cfg, tags={"source_uri": source_uri}) as run:
        stats = filter_pairs(source_uri, out, cfg)
        import mlflow

        mlflow.log_metrics({"total": stats["total"], "kept": stats["kept"],
                            **{f"rejected.{k}": v for k, v in stats["rejected"].items()}})
        _log_output_file(storage.join(out, "stats.png"), "plots")
        _log_output_file(storage.join(out, "stats.json"), None)
        for sample in storage.list_files(storage.join(out, "rejects")):  # rejected examples, per reason
            _log_output_file(sample, "rejects")
    tag_run(ctx.tracking, ctx.parent_run_id, {"lineage.source_uri": source_uri, "lineage.filtered_uri": out})
    payload = {"uri": out, "source_uri": source_uri, "run_id": run.info.run_id, "stats": stats,
               "samples": stats["kept"]}
    _write_pointer(filtered, payload)
    return payload


def shard_step(ctx_json: str, filtered: Any, samples_per_shard: int, vocab_size: int, dataset: Any) -> dict:
    """Write the kept pairs as webdataset shards + tokenizer + manifest.json (written last)."""
    import mlflow

    from components.shard import ShardConfig, shard

    ctx = RunContext.from_json(ctx_json)
    src = _read_pointer(filtered)
    cfg = ShardConfig(samples_per_shard=samples_per_shard, vocab_size=vocab_size)
    out = ctx.uri("shards")
    with stage_run("shard", ctx.tracking, params=cfg) as run:
        manifest = shard(src["uri"], out, cfg)
        manifest_uri = storage.join(out, "manifest.json")
        counts = {f"samples.{name}": split["samples"] for name, split in manifest["splits"].items()}
        mlflow.log_metrics({**counts, "shards": sum(len(s["shards"]) for s in manifest["splits"].values())})
        mlflow.set_tags({"dataset.manifest_uri": manifest_uri, "dataset.content_hash": manifest["content_hash"]})
        _log_output_file(manifest_uri, None)
    tag_run(ctx.tracking, ctx.parent_run_id, {"lineage.manifest_uri": manifest_uri,
                                               "lineage.dataset_content_hash": manifest["content_hash"]})
    payload = {"uri": manifest_uri, "content_hash": manifest["content_hash"], "run_id": run.info.run_id,
               "tokenizer": manifest["tokenizer"], "samples": manifest["splits"]["train"]["samples"]}
    _write_pointer(dataset, payload)
    return payload


def train_step(ctx_json: str, dataset: Any, model_config: str, steps: int, batch_size: int,
               learning_rate: float, num_workers: int, gpus_per_worker: int, cpus_per_worker: str,
               memory_per_worker: str, launcher: str, image: str, model: Any) -> dict:
    """Train locally with Ray Train, or as a KubeRay RayJob on the cluster (launcher='rayjob').

    On the cluster `num_workers` counts worker pods with `gpus_per_worker` GPUs each, and Ray Train runs
    one training process per GPU; locally it counts training processes."""
    from components.train import TrainConfig, train

    ctx = RunContext.from_json(ctx_json)
    data = _read_pointer(dataset)
    on_cluster = resolve_launcher(launcher) == "rayjob"
    processes = num_workers * gpus_per_worker if on_cluster and gpus_per_worker > 0 else num_workers
    cfg = TrainConfig(model=model_config, steps=steps, batch_size=batch_size, lr=learning_rate,
                      warmup_steps=max(1, min(steps // 10, 2000)), num_workers=processes,
                      use_gpu=gpus_per_worker > 0)
    out = ctx.uri("model")
    if on_cluster:
        from pipelines.rayjob import RayJobSpec, run_training_rayjob

        spec = RayJobSpec(image=image, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                          cpus_per_worker=cpus_per_worker or None, memory_per_worker=memory_per_worker or None)
        result = run_training_rayjob(data["uri"], out, cfg, ctx, spec)
    else:
        result = train(data["uri"], out, cfg, ctx.tracking)
    tag_run(ctx.tracking, ctx.parent_run_id, {"lineage.training_run_id": result["run_id"],
                                               "lineage.model_uri": result["model_uri"]})
    payload = {**result, "uri": result["model_uri"], "dataset_content_hash": data["content_hash"],
               "tokenizer": data["tokenizer"], "manifest_uri": data["uri"]}
    _write_pointer(model, payload)
    return payload


def resolve_launcher(launcher: str) -> str:
    """'auto' means a RayJob inside Kubernetes and a local Ray elsewhere."""
    if launcher == "auto":
        return "rayjob" if os.environ.get("KUBERNETES_SERVICE_HOST") else "local"
    if launcher not in ("local", "rayjob"):
        raise ValueError(f"launcher must be 'auto', 'local' or 'rayjob', got {launcher!r}")
    return launcher


def evaluate_step(ctx_json: str, dataset: Any, model: Any, eval_data_uri: str, templates: str,
                  synthetic_per_class: int, metrics: Any, classification: Any, report: Any) -> dict:
    """Zero-shot, retrieval and linear-probe evaluation; fills the KFP metrics artifacts."""
    from components.evaluate import EvalConfig, evaluate, to_kfp_artifacts

    ctx = RunContext.from_json(ctx_json)
    data, trained = _read_pointer(dataset), _read_pointer(model)
    if eval_data_uri == SYNTHETIC:
        eval_data_uri = _generate_synthetic_eval(ctx, synthetic_per_class)
        templates = templates or SYNTHETIC
    cfg = EvalConfig(templates=templates or "simple")
    result = evaluate(trained["uri"], data["uri"], eval_data_uri, ctx.uri("eval"), cfg, ctx.tracking)
    to_kfp_artifacts(result, metrics, classification)
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(markdown_report(result))
    return result


def export_step(ctx_json: str, dataset: Any, model: Any, registered_model_name: str, onnx_model: Any) -> dict:
    """Export ONNX encoders, check parity, register the model; tags close the lineage chain."""
    from components.export import ExportConfig, export

    ctx = RunContext.from_json(ctx_json)
    data, trained = _read_pointer(dataset), _read_pointer(model)
    cfg = ExportConfig(registered_model_name=registered_model_name)
    result = export(trained["uri"], data["tokenizer"], ctx.uri("export"), cfg, ctx.tracking,
                    dataset_content_hash=data["content_hash"], training_run_id=trained["run_id"])
    tag_run(ctx.tracking, ctx.parent_run_id, {
        "lineage.registered_model": f"{result.get('registered_model_name')}/{result.get('registered_model_version')}",
        "lineage.export_uri": result.get("bundle_uri", ctx.uri("export"))})
    _write_pointer(onnx_model, {**result, "uri": result.get("bundle_uri", ctx.uri("export"))})
    return result


# ---------------------------------------------------------------------------------------------
def _generate_synthetic_corpus(ctx: RunContext, n: int) -> str:
    from components.synthetic import generate_corpus

    return _generated(ctx, "raw-synthetic", lambda d: generate_corpus(d, n=n, seed=0))


def _generate_synthetic_eval(ctx: RunContext, per_class: int) -> str:
    from components.synthetic import generate_eval_split

    return _generated(ctx, "eval-synthetic", lambda d: generate_eval_split(d, per_class=per_class, seed=1))


def _generated(ctx: RunContext, name: str, make) -> str:
    """Generate locally, then upload when the run's work area is on S3."""
    import tempfile

    target = ctx.uri(name)
    if not storage.is_s3(target):
        make(target)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        make(tmp)
        storage.upload_dir(tmp, target)
    return target


def _log_output_file(uri: str, artifact_path: str | None) -> None:
    """Log an output file of a stage as an MLflow artifact (downloading it first from S3)."""
    import tempfile

    from components.tracking import log_file

    if not storage.exists(uri):
        return
    if not storage.is_s3(uri):
        log_file(uri, artifact_path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, uri.rsplit("/", 1)[-1])
        storage.download_file(uri, local)
        log_file(local, artifact_path)


def markdown_report(result: dict) -> str:
    lines = ["# CLIP evaluation", "", "| metric | value |", "|---|---|"]
    for key, value in sorted(result.get("metrics", result).items()):
        if isinstance(value, (int, float)):
            lines.append(f"| {key} | {value:.4f} |")
    return "\n".join(lines) + "\n"
