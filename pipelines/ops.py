"""Thin KFP wrappers: each component imports inside its body and makes one call into pipelines.steps.

Components run on the project's image (the code is baked in, so nothing is pip-installed at run time);
`kfp.local` runs the same functions on this interpreter.
"""

import functools
import os

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from pipelines.platform import COMPONENT_IMAGE

IMAGE = os.environ.get("CLIPFLOW_IMAGE", COMPONENT_IMAGE)
component = functools.partial(dsl.component, base_image=IMAGE, install_kfp_package=False)


@component
def start_tracking(data_root: str, tracking_uri: str, experiment: str, pipeline_run_id: str,
                   s3_endpoint: str, params_json: str) -> str:
    import json

    from pipelines.steps import start_tracking as run
    return run(data_root, tracking_uri, experiment, pipeline_run_id, s3_endpoint, json.loads(params_json))


@component
def finish_tracking(tracking_uri: str, experiment: str, pipeline_run_id: str,
                    status: dsl.PipelineTaskFinalStatus) -> str:
    from pipelines.steps import finish_tracking as run
    return run(tracking_uri, experiment, pipeline_run_id, status.state)


@component
def filter_pairs(ctx: str, source_uri: str, preset: str, synthetic_samples: int, filtered: Output[Dataset]):
    from pipelines.steps import filter_step
    filter_step(ctx, source_uri, preset, synthetic_samples, filtered)


@component
def shard_pairs(ctx: str, filtered: Input[Dataset], samples_per_shard: int, vocab_size: int,
                dataset: Output[Dataset]):
    from pipelines.steps import shard_step
    shard_step(ctx, filtered, samples_per_shard, vocab_size, dataset)


@component
def train_clip(ctx: str, dataset: Input[Dataset], model_config: str, steps: int, batch_size: int,
               learning_rate: float, num_workers: int, gpus_per_worker: int, cpus_per_worker: str,
               memory_per_worker: str, launcher: str, image: str, model: Output[Model]):
    from pipelines.steps import train_step
    train_step(ctx, dataset, model_config, steps, batch_size, learning_rate, num_workers, gpus_per_worker,
               cpus_per_worker, memory_per_worker, launcher, image, model)


@component
def evaluate_clip(ctx: str, dataset: Input[Dataset], model: Input[Model], eval_data_uri: str, templates: str,
                  synthetic_per_class: int, metrics: Output[Metrics], classification: Output[ClassificationMetrics],
                  report: Output[Markdown]):
    from pipelines.steps import evaluate_step
    evaluate_step(ctx, dataset, model, eval_data_uri, templates, synthetic_per_class, metrics, classification,
                  report)


@component
def export_onnx(ctx: str, dataset: Input[Dataset], model: Input[Model], registered_model_name: str,
                onnx_model: Output[Model]):
    from pipelines.steps import export_step
    export_step(ctx, dataset, model, registered_model_name, onnx_model)
