"""The DAG's arguments, read from `clip_pipeline`'s signature: each parameter's default and type, and the
config field it sets (`pipelines.parameters`, which the pipeline itself uses to write its docstring)."""

from __future__ import annotations

import inspect
from typing import Any

from components.common.config import ConfigError, coerce
from pipelines.clip_pipeline import clip_pipeline
from pipelines.parameters import Parameter, describe


BUDGET = {"steps": 0, "epochs": 0.0}  # the training budget's parameters and their "not given" (TrainConfig: one of them)


def _signature() -> inspect.Signature:
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


def parameter_fields() -> list[Parameter]:
    """The Parameter (config field, meaning) of every argument of the DAG."""
    return describe(_signature())


def with_budget(arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` where a training budget the user names replaces the defaults' (`--steps 500` on top of the
    pipeline's `epochs=32`): the other budget parameters are set to "not given". Naming two is left to
    TrainConfig, which refuses a budget given twice."""
    named = [k for k in BUDGET if arguments.get(k)]
    return {**BUDGET, **arguments} if len(named) == 1 else dict(arguments)
