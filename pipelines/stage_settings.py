"""`<stage>_settings`: every setting of a stage that has no pipeline parameter of its own reaches the KFP run
form as one YAML or JSON object per stage (`filter_settings`, `shard_settings`, ...), described with every
setting it can set, checked strictly by `clipflow run` / `clipflow submit` before they start and by start-run
before any stage works (`config.settings_object`); each stage merges it into its config (`config.stage_config`),
refusing a setting that has a parameter of its own. Adding a setting to a stage's config is all it
takes to reach it from the run form.
"""

from __future__ import annotations

from typing import Any

from components.common.config import SETTINGS_SUFFIX, describe as describe_fields, settings_object
from components.evaluate.config import EvalConfig
from components.export.config import ExportConfig
from components.filter.config import FilterConfig
from components.shard.config import ShardConfig
from components.train.config import TrainConfig

STAGE_CONFIGS: dict[str, type] = {"filter": FilterConfig, "shard": ShardConfig, "train": TrainConfig,
                                  "evaluate": EvalConfig, "export": ExportConfig}


def stage_components() -> dict[str, Any]:
    """Each stage's KFP component: the parameters a component declares are the ones it takes."""
    from components.evaluate.component import evaluate
    from components.export.component import export
    from components.filter.component import filter_pairs
    from components.shard.component import shard
    from components.train.component import train

    return {"filter": filter_pairs, "shard": shard, "train": train, "evaluate": evaluate, "export": export}


def own_parameters(stage: str) -> set[str]:
    """The settings of `stage` that its KFP component takes as parameters of their own."""
    return set(stage_components()[stage].component_spec.inputs)


def settings_doc(stage: str) -> str:
    """The run form's description of `<stage>_settings`: what it takes, and every setting it can set."""
    cls, own = STAGE_CONFIGS[stage], own_parameters(stage)
    other = [f"{path} (default {default!r}): {doc}" for path, _tp, default, doc in describe_fields(cls)
             if path.rsplit(".", 1)[-1] not in own]
    return (f"any other {cls.__name__} setting, as a YAML or JSON object (e.g. {{\"{other[0].split(' ')[0]}\": ...}}), "
            f"checked strictly before any stage works (by start-run; the stage refuses a setting that has a parameter "
            f"of its own): an unknown setting or a wrong type fails the run. Its settings: " + "; ".join(other))


def check_stage_settings(values: dict[str, Any], own: bool = True) -> None:
    """Every `<stage>_settings` object in `values` checked strictly (`config.settings_object`); with `own`, a
    setting that has a parameter of its own is refused too (that needs the KFP components, whose decorators a
    task's process does not have: there the stage itself refuses it, `config.stage_config`)."""
    for name, text in values.items():
        stage = name.removesuffix(SETTINGS_SUFFIX)
        settings_object(text, STAGE_CONFIGS[stage], name, own=own_parameters(stage) if own else ())


def start_checked(**settings: Any) -> str:
    """The start-run task: the stages' `<stage>_settings` checked before any work, then the parent run opened
    (`components.common.context.start_task`)."""
    from components.common.context import start_task

    check_stage_settings({k: settings.pop(k) for k in list(settings) if k.endswith(SETTINGS_SUFFIX)}, own=False)
    return start_task(**settings)
