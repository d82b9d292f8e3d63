"""The pipeline's parameters, each the field of one config under the same name.

`CONFIGS` lists the config of every component of the DAG; `describe(signature)` finds, for each
pipeline parameter, the config field it sets (the run form's meaning and the CLI's help come from that
field's comment; `docstring(func)` writes them as the pipeline's `Args:`, which KFP compiles into the
run form's descriptions). The test suite checks that every parameter reaches a field of the same name. The
DAG's own parameters are read from its signature in `pipelines.arguments` (the pipeline imports this module).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any

from components.common.config import SETTINGS_SUFFIX, ConfigError, field_doc, resolve_key
from components.common.context import RunConfig
from components.evaluate.config import EvalConfig
from components.export.config import ExportConfig
from components.filter.config import FilterConfig
from components.shard.config import ShardConfig
from components.train.config import TrainConfig
from pipelines.stage_settings import settings_doc, stage_components



@dataclass
class TaskResources:
    """CPU and memory of the KFP tasks' own pods (a RayJob's workers are sized by the stage's settings). kfp.local
    ignores them."""

    task_cpu_request: str = "500m"  # CPU request of the light tasks' pods: start-run, finish-run and the filter, shard
                                    # and train launchers (with launcher local they do the work: raise it)
    task_cpu_limit: str = "2"  # CPU limit of the light tasks' pods
    task_memory_request: str = "1Gi"  # memory request of the light tasks' pods
    task_memory_limit: str = "4Gi"  # memory limit of the light tasks' pods
    eval_cpu_request: str = "4"  # CPU request of the evaluate and export pods (they run the model)
    eval_cpu_limit: str = "8"  # CPU limit of the evaluate and export pods
    eval_memory_request: str = "16Gi"  # memory request of the evaluate and export pods
    eval_memory_limit: str = "32Gi"  # memory limit of the evaluate and export pods


CONFIGS: dict[str, type] = {"run": RunConfig, "filter": FilterConfig, "shard": ShardConfig, "train": TrainConfig,
                            "evaluate": EvalConfig, "export": ExportConfig, "pipeline": TaskResources}


# One default per setting: its config field's. Where the run form on a cluster (the pipeline's defaults) or
# `clipflow run` on this machine (`local_defaults()`) uses another value, it is listed here, and only here;
# CONFIG_DEFAULT means the config's value, AS_PIPELINE the pipeline's. A test holds the pipeline's signature
# to this table.
CONFIG_DEFAULT, AS_PIPELINE = "<config default>", "<as the pipeline>"
OVERRIDES: dict[str, tuple[Any, Any]] = {  # parameter: (the pipeline on a cluster, `clipflow run` on this machine)
    "model_config": ("ViT-B-32", CONFIG_DEFAULT),   # tiny on a laptop's CPUs
    "epochs": (32.0, CONFIG_DEFAULT),               # the paper's budget; locally a fixed number of steps instead
    "steps": (CONFIG_DEFAULT, 300),
    "batch_size": (512, 32),
    "lr": (CONFIG_DEFAULT, 1e-3),
    "num_workers": (1, CONFIG_DEFAULT),             # one GPU pod; locally 2 CPU processes
    "gpus_per_worker": (1, CONFIG_DEFAULT),
    "samples_per_shard": (CONFIG_DEFAULT, 128),     # LAION's 10,000 on a cluster, small local shards
    "vocab_size": (CONFIG_DEFAULT, 4096),
    "launcher": (CONFIG_DEFAULT, "local"),
    "registered_model_name": (CONFIG_DEFAULT, "clip-local"),
    "image": ("the component image", AS_PIPELINE),  # kfp_component.IMAGE (not used by a local run)
    "eval_suite": ("synthetic", AS_PIPELINE),
    "data_root": ("s3://<bucket>/runs", "<workdir>/data"),  # the names k8s/ creates (components/common/platform.py)
    "s3_endpoint": ("the object store k8s/ deploys", "$AWS_ENDPOINT_URL"),
    "mlflow_tracking_uri": ("the MLflow server k8s/ deploys", "sqlite in the workdir"),
}
# what pipelines/local.py sets from the machine (the workdir, the environment) rather than from this table
FROM_THE_MACHINE = ("data_root", "s3_endpoint", "mlflow_tracking_uri")


def config_default(name: str) -> Any:
    """The default of the config field pipeline parameter `name` sets (of the last stage that takes it)."""
    from components.common.config import to_dict

    stage, path = owners(name)[-1]
    if not path:  # `<stage>_settings`: no other setting given
        return ""
    value: Any = to_dict(CONFIGS[stage]())
    for part in path.split("."):
        value = value[part]
    return value


def local_defaults() -> dict[str, Any]:
    """The values `clipflow run` uses where they differ from the pipeline's (the local column of OVERRIDES)."""
    return {name: config_default(name) if local == CONFIG_DEFAULT else local
            for name, (_cluster, local) in OVERRIDES.items() if name not in FROM_THE_MACHINE and local != AS_PIPELINE}


@dataclass
class Parameter:
    name: str
    default: Any
    stages: tuple[str, ...]  # the keys in CONFIGS of the configs it sets (usually one)
    path: str  # the field's path in those configs (e.g. "optim.lr" for lr)
    doc: str  # the field's comment (of the last stage that takes it, the others' in brackets)


def config_components() -> dict[str, list[Any]]:
    """The KFP components of each config: the parameters a component declares are the ones it takes."""
    from pipelines.parent_run import finish_run, start_run

    return {"run": [start_run, finish_run], **{stage: [op] for stage, op in stage_components().items()},
            "pipeline": []}


def owners(name: str) -> list[tuple[str, str]]:
    """(stage, field path) of every config whose component takes parameter `name`; each must have a field
    of that very name. A parameter no component takes is a field of TaskResources (stage "pipeline"): the
    pipeline itself applies it."""
    if name.endswith(SETTINGS_SUFFIX) and name.removesuffix(SETTINGS_SUFFIX) in CONFIGS:  # a stage's other
        # settings as one object: its stage merges it, start-run checks it first (path "": the whole config)
        return [(stage, "") for stage, ops in config_components().items()
                if any(name in op.component_spec.inputs for op in ops)]
    found = []
    for stage, ops in config_components().items():
        if any(name in op.component_spec.inputs for op in ops):
            path = resolve_key(CONFIGS[stage], name)  # ConfigError when the config has no such field
            if path.rsplit(".", 1)[-1] != name:
                raise ConfigError(f"pipeline parameter {name!r} reaches {CONFIGS[stage].__name__}.{path}")
            found.append((stage, path))
    if not found and name in {f.name for f in fields(TaskResources)}:
        found.append(("pipeline", name))
    if not found:
        raise ConfigError(f"pipeline parameter {name!r} reaches no component")
    return found


def describe(signature: inspect.Signature) -> list[Parameter]:
    """The Parameter of every argument of a pipeline function with this signature."""
    out = []
    for name, default in ((n, p.default) for n, p in signature.parameters.items()):
        found = owners(name)
        docs = [field_doc(CONFIGS[stage], path) if path else settings_doc(name.removesuffix(SETTINGS_SUFFIX))
                for stage, path in found]
        doc = docs[-1] + "".join(f" [{stage}: {d}]" for (stage, _), d in zip(found[:-1], docs[:-1]) if d != docs[-1])
        out.append(Parameter(name, default, tuple(s for s, _ in found), found[-1][1], doc))
    return out


def docstring(func: Any, summary: str) -> str:
    """`summary`, then an `Args:` section with each parameter's meaning (its config field's comment): set as
    the pipeline function's docstring, KFP compiles it into the run form's parameter descriptions."""
    args = "".join(f"\n    {p.name}: {p.doc}" for p in describe(inspect.signature(func)))
    return f"{summary}\n\nArgs:{args}\n"
