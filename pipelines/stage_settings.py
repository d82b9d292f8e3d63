"""`<stage>_settings`: every setting of a stage that has no pipeline parameter of its own reaches the KFP run
form as one YAML or JSON object per stage (`filter_settings`, `shard_settings`, ...), described with every
setting it can set and checked strictly by start-run before any stage works (`config.settings_object`);
each stage merges it into its config (`config.stage_config`). Adding a setting to a stage's config is all it
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


def own_parameters(stage: str) -> set[str]:
    """The settings of `stage` that its KFP component takes as parameters of their own."""
    import importlib

    op = getattr(importlib.import_module(f"components.{stage}.component"), stage)
    return set(op.component_spec.inputs)


def settings_doc(stage: str) -> str:
    """The run form's description of `<stage>_settings`: what it takes, and every setting it can set."""
    cls, own = STAGE_CONFIGS[stage], own_parameters(stage)
    other = [f"{path} (default {default!r}): {doc}" for path, _tp, default, doc in describe_fields(cls)
             if path.rsplit(".", 1)[-1] not in own]
    return (f"any other {cls.__name__} setting, as a YAML or JSON object (e.g. {{\"{other[0].split(' ')[0]}\": ...}}), "
            f"checked strictly by start-run before any stage works: an unknown setting, a wrong type or a setting that "
            f"has a parameter of its own is an error. Its settings: " + "; ".join(other))


def check_stage_settings(values: dict[str, Any]) -> None:
    """Every `<stage>_settings` object in `values` checked strictly (`config.settings_object`)."""
    for name, text in values.items():
        stage = name.removesuffix(SETTINGS_SUFFIX)
        settings_object(text, STAGE_CONFIGS[stage], name, own=own_parameters(stage))


def start_checked(**settings: Any) -> str:
    """The start-run task: the stages' `<stage>_settings` checked before any work, then the parent run opened
    (`components.common.context.start_task`)."""
    from components.common.context import start_task

    check_stage_settings({k: settings.pop(k) for k in list(settings) if k.endswith(SETTINGS_SUFFIX)})
    return start_task(**settings)
