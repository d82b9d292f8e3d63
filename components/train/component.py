"""The train stage's KFP component `train`: a thin wrapper of `components.train.task.run`.

Locally the trainer runs on a local Ray; on a cluster (`launcher` rayjob, or auto inside Kubernetes) the
same trainer runs as a KubeRay RayJob (`components.common.rayjob`), one training process per GPU.
"""

from kfp.dsl import Dataset, Input, Markdown, Model, Output

from components.common.kfp_component import component


@component
def train(ctx: str, dataset: Input[Dataset], model_config: str, steps: int, epochs: float, batch_size: int, lr: float,
          num_workers: int, gpus_per_worker: int, cpus_per_worker: str, memory_per_worker: str, launcher: str,
          image: str, rayjob_deadline_s: int, rayjob_backoff_limit: int, rayjob_ttl_s: int, init_checkpoint: str,
          lock_image: bool, lock_image_unlocked_groups: int, lock_text: bool, lock_text_unlocked_layers: int,
          finetune_lr: float, resume_from: str, train_settings: str, model: Output[Model], report: Output[Markdown]):
    """Pretrain CLIP, or fine-tune it from init_checkpoint, with Ray Train (DDP, CLIP's AdamW recipe,
    checkpoints), locally or as a KubeRay RayJob."""
    settings = dict(locals())
    from components.common.console import run_stage
    from components.train.task import run
    run_stage("train", run, settings)
