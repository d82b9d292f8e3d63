"""The pipeline's parent MLflow run as a row people compare: the headline figures as its metrics, the
settings that describe the data and the model as its params.

`record_headline(...)` (the finish-run task calls it, before the run is closed) reads each stage's latest
run under the parent (`publish.stage_attempts`) and copies to the parent what it finds there; a stage that
did not run contributes nothing. The metric names are the stage runs' own (a chart of `final_loss` shows
the parent and the train runs alike), plus two the stages leave spread out: `kept_fraction` (filter: kept /
total) and `onnx_parity_max_abs` (export: the worst of its parity checks). The dataset the model was trained
on (the train run's MLflow dataset input, the shard manifest) becomes an input of the parent too, so the runs
table's Dataset column shows it on the pipeline's row.
"""

from __future__ import annotations

from typing import Any

# (stage, metric of its run) copied to the parent under the same name
STAGE_METRICS = (("train", "final_loss"), ("train", "samples_per_s"),
                 ("evaluate", "mean/zeroshot_top1"), ("evaluate", "mean/linear_probe_top1_full"),
                 ("evaluate", "validation/retrieval_image_to_text_R_at_1"),
                 ("evaluate", "validation/retrieval_text_to_image_R_at_1"))
# (parent param, stage, where it is on the stage run: "params.<key>" or "tags.<key>")
STAGE_PARAMS = (("model_config", "train", "params.model_config"), ("steps", "train", "params.steps"),
                ("batch_size", "train", "params.batch_size"), ("global_batch", "train", "params.global_batch"),
                ("train_samples", "train", "params.train_samples"),
                ("dataset_content_hash", "shard", "tags.dataset.content_hash"),
                ("eval_suite", "evaluate", "tags.eval_suite"))


def headline_metrics(by_stage: dict[str, Any]) -> dict[str, float]:
    """{metric: value} of the parent run from the stage runs ({stage: its latest run})."""
    def metrics(stage: str) -> dict[str, float]:
        return dict(by_stage[stage].data.metrics) if stage in by_stage else {}

    out = {key: metrics(stage)[key] for stage, key in STAGE_METRICS if key in metrics(stage)}
    filtered = metrics("filter")
    if filtered.get("total"):
        out["kept_fraction"] = filtered.get("kept", 0.0) / filtered["total"]
    parity = [v for k, v in metrics("export").items() if k.startswith("parity_") and k.endswith("_max_abs")]
    if parity:
        out["onnx_parity_max_abs"] = max(parity)
    return out


def headline_params(by_stage: dict[str, Any]) -> dict[str, str]:
    """{param: value} of the parent run from the stage runs: the model, its training budget, the data."""
    out = {}
    for name, stage, where in STAGE_PARAMS:
        if stage in by_stage:
            kind, key = where.split(".", 1)
            value = getattr(by_stage[stage].data, kind).get(key)
            if value not in (None, ""):
                out[name] = str(value)
    return out


def record_headline(tracking_uri: str, experiment: str, pipeline_run_id: str) -> dict[str, Any]:
    """Log the headline metrics and params on the parent run of KFP run `pipeline_run_id` (found by its
    `kfp.run_id` tag). A param the parent already holds with another value (a retried finish-run after a
    retried stage) is left as it was and said. Returns {"metrics", "params", "datasets"} as logged."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.common.publish import stage_attempts
    from components.common.tracking import TrackingConfig

    TrackingConfig(tracking_uri or None, experiment).apply()
    parents = mlflow.search_runs(filter_string=f"tags.`kfp.run_id` = '{pipeline_run_id}' and tags.stage = 'pipeline'",
                                 output_format="list")
    client = mlflow.MlflowClient()
    logged: dict[str, Any] = {"metrics": {}, "params": {}, "datasets": []}
    for parent in parents:
        children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        by_stage = {stage: runs[-1] for stage, runs in stage_attempts(children).items()}
        metrics, params = headline_metrics(by_stage), headline_params(by_stage)
        for key, value in metrics.items():
            client.log_metric(parent.info.run_id, key, value)
        for key, value in params.items():
            held = parent.data.params.get(key)
            if held is not None and held != value:
                print(f"[finish-run] param {key}={value!r} not logged: the parent run holds {held!r}", flush=True)
                continue
            try:
                client.log_param(parent.info.run_id, key, value)
            except MlflowException as exc:
                print(f"[finish-run] param {key} not logged: {exc}", flush=True)
                continue
            logged["params"][key] = value
        logged["metrics"].update(metrics)
        if "train" in by_stage:
            trained_on = client.get_run(by_stage["train"].info.run_id).inputs.dataset_inputs
            client.log_inputs(parent.info.run_id, datasets=list(trained_on))
            logged["datasets"] = [(d.dataset.name, d.dataset.digest) for d in trained_on]
    return logged
