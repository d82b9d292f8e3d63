"""The CLIP pretraining DAG:  filter → shard → train → evaluate → export, one MLflow parent run around it.

Compile with `python -m pipelines.compile` (writes pipelines/clip_pipeline.yaml, the package users
upload in the KFP UI); run locally with `python -m pipelines.local`.
"""

import json

from kfp import dsl, kubernetes

from pipelines import ops
from pipelines import platform as pf


def _on_cluster(task: dsl.PipelineTask, retries: int = 0, cache: bool = False) -> dsl.PipelineTask:
    """Credentials from Secrets, NetworkPolicy labels, retries and caching (all ignored by kfp.local)."""
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


@dsl.pipeline(name="clip-pretraining",
              description="Filter image-text pairs, shard them to S3 as webdataset, pretrain CLIP with Ray Train, "
                          "evaluate zero-shot / retrieval / linear probe, export ONNX to the MLflow registry.")
def clip_pipeline(
    source_uri: str = "synthetic",           # folder / table / webdataset tars, local or s3://; "synthetic" = bundled
    synthetic_samples: int = 600,
    data_root: str = f"s3://{pf.BUCKET}/runs",
    s3_endpoint: str = pf.S3_ENDPOINT,
    filter_preset: str = "datacomp_basic",
    samples_per_shard: int = 1000,
    vocab_size: int = 49408,
    model_config: str = "ViT-B-32",
    train_steps: int = 2000,
    batch_size: int = 256,                   # per worker
    learning_rate: float = 5e-4,
    num_workers: int = 1,                    # Ray worker pods on the cluster (one train process per GPU)
    gpus_per_worker: int = 1,
    cpus_per_worker: str = "",               # RayJob worker resources; "" keeps the k8s/ template's
    memory_per_worker: str = "",
    launcher: str = "auto",                  # auto: a KubeRay RayJob in Kubernetes, a local Ray elsewhere
    image: str = ops.IMAGE,                   # the RayJob image; CLIPFLOW_IMAGE at compile time sets both
    eval_data_uri: str = "synthetic",        # ImageFolder dir or labelled webdataset; "synthetic" = bundled split
    eval_templates: str = "",                # imagenet | cifar | simple | synthetic | a file; "" = by dataset
    synthetic_eval_per_class: int = 20,
    mlflow_tracking_uri: str = pf.MLFLOW_TRACKING_URI,
    mlflow_experiment: str = "clip-pretraining",
    registered_model_name: str = "clip",
):
    exit_task = _on_cluster(ops.finish_tracking(
        tracking_uri=mlflow_tracking_uri, experiment=mlflow_experiment, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER))
    with dsl.ExitHandler(exit_task, name="pipeline-run"):
        start = _on_cluster(ops.start_tracking(
            data_root=data_root, tracking_uri=mlflow_tracking_uri, experiment=mlflow_experiment,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, s3_endpoint=s3_endpoint,
            params_json=json.dumps({"pipeline": "clip-pretraining"})))
        ctx = start.output

        filtered = _on_cluster(ops.filter_pairs(
            ctx=ctx, source_uri=source_uri, preset=filter_preset, synthetic_samples=synthetic_samples),
            retries=2, cache=True)
        dataset = _on_cluster(ops.shard_pairs(
            ctx=ctx, filtered=filtered.outputs["filtered"], samples_per_shard=samples_per_shard,
            vocab_size=vocab_size), retries=2, cache=True)
        trained = _on_cluster(ops.train_clip(
            ctx=ctx, dataset=dataset.outputs["dataset"], model_config=model_config, steps=train_steps,
            batch_size=batch_size, learning_rate=learning_rate, num_workers=num_workers,
            gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, memory_per_worker=memory_per_worker,
            launcher=launcher, image=image))
        evaluated = _on_cluster(ops.evaluate_clip(
            ctx=ctx, dataset=dataset.outputs["dataset"], model=trained.outputs["model"],
            eval_data_uri=eval_data_uri, templates=eval_templates, synthetic_per_class=synthetic_eval_per_class))
        _on_cluster(ops.export_onnx(
            ctx=ctx, dataset=dataset.outputs["dataset"], model=trained.outputs["model"],
            registered_model_name=registered_model_name).after(evaluated))
