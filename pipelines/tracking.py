"""The two pipeline-level KFP components around the stages: open and close the parent MLflow run.

Thin wrappers of `components.common.context.start_run` / `finish_run`; their settings are the
`RunConfig` fields (data_root, s3_endpoint, mlflow_tracking_uri, mlflow_experiment).
"""

from kfp import dsl

from components.common.kfp_component import component


@component
def start_run(data_root: str, s3_endpoint: str, mlflow_tracking_uri: str, mlflow_experiment: str,
              pipeline_run_id: str) -> str:
    """Open the pipeline's parent MLflow run; returns the run context every stage receives."""
    settings = dict(locals())
    from components.common import config
    from components.common.context import RunConfig, start_run as start
    run_id = settings.pop("pipeline_run_id")
    return start(config.from_dict(RunConfig, settings), run_id).to_json()


@component
def finish_run(mlflow_tracking_uri: str, mlflow_experiment: str, pipeline_run_id: str,
               status: dsl.PipelineTaskFinalStatus) -> str:
    """Close the parent MLflow run with the pipeline's final state (the exit handler)."""
    settings = dict(locals())
    from components.common import config
    from components.common.context import RunConfig, finish_run as finish
    from components.common.headline import record_headline
    run_id, state = settings.pop("pipeline_run_id"), settings.pop("status").state
    cfg = config.from_dict(RunConfig, settings)
    record_headline(cfg.mlflow_tracking_uri, cfg.mlflow_experiment, run_id)  # the parent's metrics, to compare runs
    return finish(cfg, run_id, state)
