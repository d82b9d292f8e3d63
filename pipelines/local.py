"""Run the whole pipeline on this machine (the embedded default): `clipflow run`.

The committed package `pipelines/clip_pipeline.yaml` (the file users upload in the KFP UI) executed
by `kfp.local`'s SubprocessRunner on this interpreter, with a local Ray (started by the stages), a local
MLflow store and a local directory as the object store. Nothing outside this machine is needed;
everything lands under the workdir (default `.demo/`). Before it starts, runs that an earlier, killed
`clipflow run` left RUNNING are closed as FAILED (`components.common.run_state.sweep`); this process is the
parent run's driver (`CLIPFLOW_DRIVER`), and Ctrl-C closes its runs as KILLED.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

def local_arguments(workdir: Path, **overrides: Any) -> dict[str, Any]:
    """The pipeline's arguments for a run on this machine: the DAG's defaults, the local column of
    `pipelines.parameters.OVERRIDES`, data and
    MLflow store in the workdir (data under CLIPFLOW_DATA_ROOT when set), then `overrides`."""
    from pipelines.arguments import pipeline_defaults, typed_arguments, with_budget
    from pipelines.parameters import local_defaults

    args = {**pipeline_defaults(), **typed_arguments(local_defaults()),
            "data_root": os.environ.get("CLIPFLOW_DATA_ROOT", str(workdir / "data")),
            "s3_endpoint": os.environ.get("AWS_ENDPOINT_URL", ""),
            "mlflow_tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"}
    unknown = sorted(set(overrides) - set(args))
    if unknown:
        raise ValueError(f"unknown pipeline parameters {unknown}; known: {', '.join(args)}")
    return {**args, **with_budget(overrides)}


def run_local(workdir: str | Path = ".demo", **overrides: Any) -> dict[str, Any]:
    """Run the committed pipeline package through kfp.local; returns `summarize`'s view of the run."""
    from kfp import components, local

    from components.common import run_state
    from components.common.tracking import TrackingConfig
    from pipelines.compile import PACKAGE, is_stale

    if is_stale():
        raise RuntimeError(f"{PACKAGE} does not match the pipeline's code: run `clipflow compile` first")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args = local_arguments(workdir, **overrides)
    uri, experiment = args["mlflow_tracking_uri"], args["mlflow_experiment"]
    TrackingConfig(uri, experiment).apply()
    try:
        run_state.sweep(uri, experiment)  # what an earlier, killed `clipflow run` left RUNNING
    except Exception as exc:  # noqa: BLE001 - the preflight (start-run) names an unusable store
        print(f"[runs] could not check for runs left RUNNING: {type(exc).__name__}: {exc}", flush=True)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"))
    started = time.time()
    previous = os.environ.get(run_state.DRIVER_ENV)
    os.environ[run_state.DRIVER_ENV] = run_state.driver_id()  # the tasks tag the parent run with it
    try:
        components.load_component_from_file(str(PACKAGE))(**args)
    except KeyboardInterrupt:  # the exit handler did not run: close this driver's runs as KILLED
        run_state.close_driver_runs(uri, experiment, "KILLED", "interrupted (Ctrl-C) before the pipeline ended")
        raise
    finally:
        if previous is None:
            os.environ.pop(run_state.DRIVER_ENV, None)
        else:
            os.environ[run_state.DRIVER_ENV] = previous
    return summarize(uri, experiment, started)


def summarize(tracking_uri: str, experiment: str, since: float) -> dict[str, Any]:
    """The newest pipeline run in the experiment with its stage runs (for the printout and tests):
    `stages` maps each stage to its latest run, `attempts` to all its runs, oldest first (a stage KFP
    retried has several)."""
    import mlflow

    from components.common.publish import stage_attempts

    mlflow.set_tracking_uri(tracking_uri)
    parents = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.stage = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not parents or parents[0].info.start_time < since * 1000 - 5000:
        raise RuntimeError(f"no pipeline run found in MLflow experiment {experiment!r} at {tracking_uri}")
    parent = parents[0]
    children = mlflow.search_runs(experiment_names=[experiment],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  output_format="list")
    attempts = stage_attempts(children)
    return {"tracking_uri": tracking_uri, "experiment": experiment, "experiment_id": parent.info.experiment_id,
            "parent_run_id": parent.info.run_id, "status": parent.info.status, "tags": dict(parent.data.tags),
            "params": dict(parent.data.params), "stages": {stage: runs[-1] for stage, runs in attempts.items()},
            "attempts": attempts}


def _stage_list(attempts: dict[str, list]) -> str:
    out = []
    for stage, runs in sorted(attempts.items()):
        failed = sum(r.info.status != "FINISHED" for r in runs[:-1])
        out.append(stage if len(runs) == 1 else f"{stage} ({len(runs)} attempts: retried after {failed} failed)")
    return ", ".join(out)


def commands(summary: dict[str, Any]) -> dict[str, str]:
    """The shell commands the summary prints, each runnable as printed (from any directory, this
    machine's environment plus what the command sets itself): `zeroshot` (the exported bundle, local or
    s3://), `serve` (the registered model) and `ui` (the MLflow UI: a URL for a tracking server)."""
    import shlex

    tags, params, uri = summary["tags"], summary.get("params", {}), summary["tracking_uri"]
    bindir = Path(sys.executable).parent
    out: dict[str, str] = {}
    bundle = tags.get("lineage.export_uri")
    if bundle:
        endpoint = params.get("s3_endpoint") if bundle.startswith("s3://") else ""
        prefix = f"AWS_ENDPOINT_URL={shlex.quote(endpoint)} " if endpoint else ""
        out["zeroshot"] = (f"{prefix}{bindir / 'clipflow'} zeroshot --bundle {shlex.quote(bundle)} "
                           "--classes red,green,blue,yellow,purple,orange --templates synthetic IMAGE...")
    registered = tags.get("lineage.registered_model", "")
    name, _, version = registered.partition("/")
    if name and version and version != "None":
        alias = tags.get("lineage.registered_model_alias")  # champion, or candidate when the gate kept it out
        model = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
        out["serve"] = (f"PATH={bindir}:$PATH MLFLOW_TRACKING_URI={shlex.quote(uri)} {bindir / 'mlflow'} models serve "
                        f"-m {model} --env-manager local --host 127.0.0.1 --port 5001")
    if uri.startswith(("http://", "https://")):
        out["ui"] = f"{uri.rstrip('/')}/#/experiments/{summary.get('experiment_id', '')}/runs/{summary['parent_run_id']}"
    else:
        # one server process: `mlflow ui` otherwise starts 4 uvicorn workers, each importing MLflow
        out["ui"] = f"{sys.executable} -m mlflow ui --backend-store-uri {shlex.quote(uri)} --workers 1 --port 5000"
    return out


def print_summary(summary: dict[str, Any], seconds: float) -> None:
    tags, stages = summary["tags"], summary["stages"]
    evaluate = stages.get("evaluate")
    shown = commands(summary)
    print("\n" + "=" * 78)
    print(f"Pipeline finished in {seconds / 60:.1f} min  (parent MLflow run {summary['parent_run_id']}, "
          f"status {summary['status']})")
    print(f"  stages          : {_stage_list(summary.get('attempts') or {s: [r] for s, r in stages.items()})}")
    print(f"  dataset         : {tags.get('lineage.manifest_uri')}  "
          f"(hash {tags.get('lineage.dataset_content_hash', '')[:12]})")
    print(f"  training run    : {tags.get('lineage.training_run_id')}  model {tags.get('lineage.model_uri')}")
    if evaluate is not None:
        figures = {k: v for k, v in evaluate.data.metrics.items() if k in
                   ("mean/zeroshot_top1", "mean/linear_probe_top1_full", "validation/retrieval_text_to_image_R_at_1")}
        datasets = [d for d in evaluate.data.tags.get("eval_datasets", "").split(",") if d]
        print(f"  evaluation      : suite {evaluate.data.tags.get('eval_suite') or '-'}, {len(datasets)} datasets  "
              + ", ".join(f"{k}={v:.3f}" for k, v in sorted(figures.items())))
    print(f"  exported model  : {tags.get('lineage.export_uri')}  registered {tags.get('lineage.registered_model')}"
          + (f" @{tags['lineage.registered_model_alias']}" if tags.get("lineage.registered_model_alias") else ""))
    if "zeroshot" in shown:
        print(f"  try the model   : {shown['zeroshot']}")
    if "serve" in shown:
        print(f"  serve the model : {shown['serve']}")
    ui = shown["ui"]
    print(f"  MLflow UI       : {'open ' if ui.startswith('http') else ''}{ui}")
    if evaluate is not None:
        print("\n".join(_robustness_lines(evaluate)))
    print("=" * 78)


def _robustness_lines(evaluate_run: Any) -> list[str]:
    """The evaluation's robustness tables (read from the evaluate run's report.json) as text."""
    import mlflow

    from components.evaluate.tables import robustness_text

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no progress bar
    try:
        report = mlflow.artifacts.load_dict(f"{evaluate_run.info.artifact_uri}/report.json")
    except Exception as exc:  # the summary still prints; the reason is said
        return [f"  robustness      : could not read the evaluate run's report.json ({exc})"]
    return robustness_text(report) or ["  robustness      : none (no dataset of the suite is a shift of another)"]
