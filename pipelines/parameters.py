"""The pipeline's parameters, each the field of one config under the same name.

`CONFIGS` lists the config of every component of the DAG; `parameter_fields()` finds, for each
pipeline parameter, the config field it sets (the run form's meaning and the CLI's help come from that
field's comment). The test suite checks that every parameter reaches a field of the same name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from components.common.config import ConfigError, coerce, field_doc, resolve_key
from components.common.context import RunConfig
from components.evaluate.config import EvalConfig
from components.export.config import ExportConfig
from components.filter.config import FilterConfig
from components.shard.config import ShardConfig
from components.train.config import TrainConfig

CONFIGS: dict[str, type] = {"run": RunConfig, "filter": FilterConfig, "shard": ShardConfig, "train": TrainConfig,
                            "evaluate": EvalConfig, "export": ExportConfig}


@dataclass
class Parameter:
    name: str
    default: Any
    stage: str  # the key of its config in CONFIGS
    path: str  # the field's path in that config (e.g. "optim.lr" for lr)
    doc: str  # the field's comment


def _signature() -> inspect.Signature:
    from pipelines.clip_pipeline import clip_pipeline

    return inspect.signature(clip_pipeline.pipeline_func)


def pipeline_defaults() -> dict[str, Any]:
    """{parameter: default} of the DAG, in signature order."""
    return {name: p.default for name, p in _signature().parameters.items()}


def typed_arguments(values: dict[str, Any]) -> dict[str, Any]:
    """Pipeline arguments (e.g. `--set` strings) converted to the parameters' types; unknown names fail."""
    params = _signature().parameters
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise ConfigError(f"unknown pipeline parameters {unknown}; known: {', '.join(params)}")
    return {k: coerce(v, params[k].annotation, f"pipeline parameter {k}") for k, v in values.items()}


def owner(name: str) -> tuple[str, str]:
    """(stage, field path) of the one config that has a field called `name`."""
    found = []
    for stage, cls in CONFIGS.items():
        try:
            found.append((stage, resolve_key(cls, name)))
        except ConfigError:
            continue
    if len(found) != 1:
        raise ConfigError(f"pipeline parameter {name!r} must be a field of exactly one of "
                          f"{[c.__name__ for c in CONFIGS.values()]}; found {found or 'none'}")
    return found[0]


def parameter_fields() -> list[Parameter]:
    out = []
    for name, default in pipeline_defaults().items():
        stage, path = owner(name)
        out.append(Parameter(name, default, stage, path, field_doc(CONFIGS[stage], path)))
    return out
