"""The shard stage's KFP component: a thin wrapper of `components.shard.task.run`."""

from kfp.dsl import Dataset, Input, Markdown, Output

from components.common.kfp_component import component


@component
def shard(ctx: str, filtered: Input[Dataset], samples_per_shard: int, vocab_size: int, val_fraction: float,
          tokenizer: str, init_checkpoint: str, launcher: str, data_workers: int, data_cpus_per_worker: str,
          data_memory_per_worker: str, rayjob_deadline_s: int, rayjob_backoff_limit: int, rayjob_ttl_s: int,
          shard_settings: str, dataset: Output[Dataset], report: Output[Markdown]):
    """Write the kept pairs as webdataset tars (parallel Ray writers), the tokenizer (trained, or a checkpoint's)
    and manifest.json, on a local Ray or as a KubeRay RayJob."""
    settings = dict(locals())
    from components.common.console import run_stage
    from components.shard.task import run
    run_stage("shard", run, settings)
