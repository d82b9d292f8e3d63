"""The CLIP pretraining DAG:  filter -> shard -> train -> evaluate -> export, one MLflow parent run around it.

Compile with `clipflow compile` (writes pipelines/clip_pipeline.yaml, the package users upload in the
KFP UI); run locally with `clipflow run`.

Every pipeline parameter is a field of a stage's config, under the same name (FilterConfig.preset,
TrainConfig.steps, ...), and reaches it by keyword: `settings_for(stage, params)` hands a component the
parameters it declares. Adding a setting to the run form is one config field, one parameter below and
the same name in the stage's component signature. The run form's descriptions are those fields' comments:
the pipeline's docstring (its `Args:`) is written from them (`pipelines.parameters.docstring`).
"""

from typing import Any

from kfp import dsl, kubernetes

from components.common.kfp_component import IMAGE
from components.evaluate.component import evaluate
from components.export.component import export
from components.filter.component import filter_pairs
from components.shard.component import shard
from components.train.component import train
from components.common import platform as pf
from pipelines.parameters import TaskResources, docstring
from pipelines.parent_run import finish_run, start_run

DESCRIPTION = ("Filter image-text pairs, shard them to S3 as webdataset, pretrain CLIP with Ray Train, "
               "evaluate zero-shot / retrieval / linear probe, export ONNX to the MLflow registry.")
# The task names in the KFP UI's graph (the task keys stay the stage names: folder = task = MLflow run).
DISPLAY_NAMES = {"start-run": "Open the MLflow run", "filter": "Filter image-text pairs",
                 "shard": "Shard to webdataset", "train": "Train CLIP (Ray Train)",
                 "evaluate": "Evaluate: zero-shot, probe, retrieval", "export": "Export ONNX + register",
                 "finish-run": "Close the MLflow run"}


def settings_for(op: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline parameters that component `op` declares as inputs, by name."""
    return {name: value for name, value in params.items() if name in op.component_spec.inputs}


HEAVY_TASKS = ("evaluate", "export")  # they run the model in their own pod; the others are light (or launch RayJobs)
R = TaskResources()


def on_cluster(task: dsl.PipelineTask, params: dict[str, Any], retries: int = 0,
               cache: bool = False) -> dsl.PipelineTask:
    """The KFP UI's name of the task, its CPU/memory requests and limits (`TaskResources` parameters), credentials
    from Secrets, NetworkPolicy labels, retries and caching (kfp.local ignores all but the retries, which it runs
    with the same backoff)."""
    task.set_display_name(DISPLAY_NAMES[task.name])
    group = "eval" if task.name in HEAVY_TASKS else "task"
    task.set_cpu_request(params[f"{group}_cpu_request"]).set_cpu_limit(params[f"{group}_cpu_limit"])
    task.set_memory_request(params[f"{group}_memory_request"]).set_memory_limit(params[f"{group}_memory_limit"])
    kubernetes.use_secret_as_env(task, pf.S3_SECRET, {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                      "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    kubernetes.use_secret_as_env(task, pf.MLFLOW_SECRET, {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                                          "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"},
                                 optional=True)
    kubernetes.add_pod_label(task, *pf.STORAGE_ACCESS_LABEL)  # k8s/ NetworkPolicies admit only labelled pods
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="30s")
    task.set_caching_options(cache)
    return task


def clip_pipeline(
    # filter (FilterConfig)
    source_uri: str = "synthetic",
    synthetic_samples: int = 600,
    preset: str = "datacomp_basic",
    filter_settings: str = "",
    # shard (ShardConfig)
    samples_per_shard: int = 10_000,
    vocab_size: int = 49408,
    val_fraction: float = 0.05,
    tokenizer: str = "",
    # filter and shard on the cluster (DataCluster), and every RayJob (RayJobPolicy)
    data_workers: int = 4,
    data_cpus_per_worker: str = "8",
    data_memory_per_worker: str = "32Gi",
    rayjob_deadline_s: int = 0,
    rayjob_backoff_limit: int = 0,
    rayjob_ttl_s: int = 600,
    shard_settings: str = "",
    # train (TrainConfig)
    model_config: str = "ViT-B-32",
    steps: int = 0,
    epochs: float = 32.0,
    batch_size: int = 512,
    lr: float = 5e-4,
    num_workers: int = 1,
    gpus_per_worker: int = 1,
    cpus_per_worker: str = "",
    memory_per_worker: str = "",
    launcher: str = "auto",
    image: str = IMAGE,
    init_checkpoint: str = "",
    lock_image: bool = False,
    lock_image_unlocked_groups: int = 0,
    lock_text: bool = False,
    lock_text_unlocked_layers: int = 0,
    finetune_lr: float = 1e-5,
    resume_from: str = "",
    train_settings: str = "",
    # evaluate (EvalConfig)
    eval_suite: str = "synthetic",
    templates: str = "",
    synthetic_per_class: int = 20,
    evaluate_settings: str = "",
    # export (ExportConfig)
    registered_model_name: str = "clip",
    promotion_metric: str = "mean/zeroshot_top1",
    promotion_min_delta: float = 0.0,
    export_settings: str = "",
    # the run (RunConfig)
    data_root: str = f"s3://{pf.BUCKET}/runs",
    s3_endpoint: str = pf.S3_ENDPOINT,
    mlflow_tracking_uri: str = pf.MLFLOW_TRACKING_URI,
    mlflow_experiment: str = pf.PIPELINE_NAME,
    # the KFP tasks' pods (TaskResources)
    task_cpu_request: str = R.task_cpu_request,
    task_cpu_limit: str = R.task_cpu_limit,
    task_memory_request: str = R.task_memory_request,
    task_memory_limit: str = R.task_memory_limit,
    eval_cpu_request: str = R.eval_cpu_request,
    eval_cpu_limit: str = R.eval_cpu_limit,
    eval_memory_request: str = R.eval_memory_request,
    eval_memory_limit: str = R.eval_memory_limit,
):
    params = dict(locals())
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    closing = on_cluster(finish_run(pipeline_run_id=run_id, **settings_for(finish_run, params)), params)
    with dsl.ExitHandler(closing, name="pipeline-run"):
        ctx = on_cluster(start_run(pipeline_run_id=run_id, **settings_for(start_run, params)), params).output

        filtered = on_cluster(filter_pairs(ctx=ctx, **settings_for(filter_pairs, params)), params, retries=2, cache=True)
        dataset = on_cluster(shard(ctx=ctx, filtered=filtered.outputs["filtered"], **settings_for(shard, params)),
                             params, retries=2, cache=True)
        trained = on_cluster(train(ctx=ctx, dataset=dataset.outputs["dataset"], **settings_for(train, params)),
                             params)
        evaluated = on_cluster(evaluate(ctx=ctx, dataset=dataset.outputs["dataset"], model=trained.outputs["model"],
                                        **settings_for(evaluate, params)), params)
        on_cluster(export(ctx=ctx, dataset=dataset.outputs["dataset"], model=trained.outputs["model"],
                          **settings_for(export, params)).after(evaluated), params)


clip_pipeline.__doc__ = docstring(clip_pipeline, DESCRIPTION)
clip_pipeline = dsl.pipeline(name=pf.PIPELINE_NAME, description=DESCRIPTION)(clip_pipeline)
