"""The filter stage's KFP component: a thin wrapper of `components.filter.task.run`."""

from kfp.dsl import Dataset, Markdown, Output

from components.common.kfp_component import component


@component(name="filter")
def filter_pairs(ctx: str, source_uri: str, synthetic_samples: int, preset: str, launcher: str,
                 data_workers: int, data_cpus_per_worker: str, data_memory_per_worker: str, rayjob_deadline_s: int,
                 rayjob_backoff_limit: int, rayjob_ttl_s: int, filter_settings: str, filtered: Output[Dataset], report: Output[Markdown]):
    """Filter raw image-text pairs: decode, size, aspect, language, privacy, duplicates (Ray), on a local Ray
    or as a KubeRay RayJob."""
    settings = dict(locals())
    from components.common.console import run_stage
    from components.filter.task import run
    run_stage("filter", run, settings)
