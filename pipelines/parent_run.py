"""The two pipeline-level KFP components around the stages: open and close the parent MLflow run.

Thin wrappers of `components.common.context.start_run` / `finish_run`; their settings are the
`RunConfig` fields (data_root, s3_endpoint, mlflow_tracking_uri, mlflow_experiment). Like the stages, each
runs inside `run_stage` (quietly: only a failure reaches the console, with its cause).
"""

from kfp import dsl

from components.common.kfp_component import component


@component
def start_run(data_root: str, s3_endpoint: str, mlflow_tracking_uri: str, mlflow_experiment: str,
              pipeline_run_id: str, filter_settings: str, shard_settings: str, train_settings: str,
              evaluate_settings: str, export_settings: str) -> str:
    """Check every stage's `<stage>_settings`, then open the pipeline's parent MLflow run; returns the run
    context every stage receives."""
    settings = dict(locals())
    from components.common.console import run_stage
    from pipelines.stage_settings import start_checked
    return run_stage("start-run", start_checked, settings, announce=False)


@component
def finish_run(mlflow_tracking_uri: str, mlflow_experiment: str, pipeline_run_id: str,
               status: dsl.PipelineTaskFinalStatus) -> str:
    """Close the parent MLflow run with the pipeline's final state (the exit handler)."""
    settings = dict(locals())
    from components.common.console import run_stage
    from components.common.context import finish_task
    return run_stage("finish-run", finish_task, {**settings, "status": settings["status"].state}, announce=False)
