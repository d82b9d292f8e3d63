"""The filter stage's KFP component: a thin wrapper of `components.filter.step.run`."""

from kfp.dsl import Dataset, Markdown, Output

from components.common.kfp_component import component


@component
def filter(ctx: str, source_uri: str, synthetic_samples: int, preset: str, filtered: Output[Dataset],
           report: Output[Markdown]):
    """Filter raw image-text pairs: decode, size, aspect, language, privacy, duplicates (Ray Data)."""
    settings = dict(locals())
    from components.common.console import run_stage
    from components.filter.step import run
    run_stage("filter", run, settings)
