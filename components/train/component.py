"""The train stage in the pipeline: `run` (plain, testable without KFP) and the KFP component `train`.

Locally the trainer runs on a local Ray; on a cluster (`launcher` rayjob, or auto inside Kubernetes) the
same trainer runs as a KubeRay RayJob (`pipelines.rayjob`), one training process per GPU.
"""

from typing import Any

from kfp.dsl import Dataset, Input, Model, Output

from components.common.kfp_component import component


def run(ctx: str, dataset: Any, model: Any, **settings: Any) -> dict:
    """Train CLIP on the dataset's train split; `settings` are TrainConfig fields by name."""
    from components.common import config
    from components.common.context import RunContext, read_pointer, write_pointer
    from components.common.tracking import tag_run
    from components.train.config import TrainConfig
    from components.train.stage import train

    run_ctx = RunContext.from_json(ctx)
    cfg = config.from_dict(TrainConfig, settings)
    data = read_pointer(dataset)
    out = run_ctx.uri("model")
    if cfg.resolved_launcher() == "rayjob":
        from pipelines.rayjob import run_training_rayjob

        result = run_training_rayjob(data["uri"], out, cfg, run_ctx)
    else:
        result = train(data["uri"], out, cfg, run_ctx.tracking)
    tag_run(run_ctx.tracking, run_ctx.parent_run_id, {"lineage.training_run_id": result["run_id"],
                                                      "lineage.model_uri": result["model_uri"]})
    return write_pointer(model, {**result, "uri": result["model_uri"], "dataset_content_hash": data["content_hash"],
                                 "tokenizer": data["tokenizer"], "manifest_uri": data["uri"]})


@component
def train(ctx: str, dataset: Input[Dataset], model_config: str, steps: int, batch_size: int, lr: float,
          num_workers: int, gpus_per_worker: int, cpus_per_worker: str, memory_per_worker: str, launcher: str,
          image: str, model: Output[Model]):
    """Pretrain CLIP with Ray Train (DDP, CLIP's AdamW recipe, checkpoints), locally or as a KubeRay RayJob."""
    settings = dict(locals())
    from components.train.component import run
    run(**settings)
