"""The compiled KFP package: fresh, five stages in order, the parameters users set in the KFP UI, and every
parameter reaching the config field of the same name."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from components.common import config
from components.common.context import RunContext
from components.common import platform as pf
from pipelines.compile import PACKAGE, is_stale
from pipelines.arguments import parameter_fields, pipeline_defaults
from pipelines.parameters import CONFIGS

STAGES = ["filter", "shard", "train", "evaluate", "export"]  # folder, KFP task, MLflow stage tag: one name
UI_PARAMETERS = {"source_uri", "data_root", "preset", "model_config", "steps", "batch_size", "lr",
                 "num_workers", "gpus_per_worker", "mlflow_experiment", "registered_model_name",
                 "mlflow_tracking_uri", "s3_endpoint", "image", "eval_suite", "synthetic_samples",
                 "synthetic_per_class"}


def _documents():
    return list(yaml.safe_load_all(PACKAGE.read_text()))


def test_committed_package_is_not_stale():
    assert not is_stale(), "pipelines/clip_pipeline.yaml is stale: run `clipflow compile`"


def test_dag_has_the_five_stages_in_order():
    spec = _documents()[0]
    body = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(STAGES) <= set(body)

    def upstream(task):  # every task this one waits for, by data or by `.after`
        deps = set(body[task].get("dependentTasks", []))
        for art in body[task].get("inputs", {}).get("artifacts", {}).values():
            deps.add(art["taskOutputArtifact"]["producerTask"])
        return deps

    for before, after in zip(STAGES, STAGES[1:]):
        assert before in upstream(after), f"{after} must run after {before}"
    assert "start-run" in upstream("filter")
    # the exit handler closes the MLflow parent run whatever happened
    root = spec["root"]["dag"]["tasks"]
    assert root["finish-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def test_pipeline_parameters_and_cluster_defaults():
    spec = _documents()[0]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert UI_PARAMETERS <= set(params)
    assert params["mlflow_tracking_uri"]["defaultValue"] == pf.MLFLOW_TRACKING_URI
    assert params["s3_endpoint"]["defaultValue"] == pf.S3_ENDPOINT
    assert params["data_root"]["defaultValue"].startswith(f"s3://{pf.BUCKET}/")
    assert params["source_uri"]["defaultValue"] == "synthetic"


def test_components_run_on_the_project_image_without_runtime_installs():
    spec = _documents()[0]
    for name, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] == pf.COMPONENT_IMAGE, name
        assert "pip install" not in " ".join(container["command"]), name


def test_platform_spec_sets_secrets_labels_retries():
    docs = _documents()
    assert len(docs) == 2, "kfp-kubernetes settings compile to a second (platform) document"
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage in STAGES:
        cfg = executors[f"exec-{stage}"]
        secrets = {s["secretName"] if "secretName" in s else s["secretNameParameter"]["runtimeValue"]["constant"]
                   for s in cfg["secretAsEnv"]}
        assert pf.S3_SECRET in secrets, stage
        assert cfg["podMetadata"]["labels"]["clipflow/access-storage"] == "true"
    tasks = docs[0]["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    for stage in ("filter", "shard"):
        assert tasks[stage]["retryPolicy"]["maxRetryCount"] == 2
        assert tasks[stage]["cachingOptions"]["enableCache"] is True


def _tasks(spec: dict) -> dict:
    return {**spec["root"]["dag"]["tasks"], **spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]}


def test_every_parameter_is_one_config_field_fed_by_name():
    """In the committed package every pipeline parameter feeds a component input of the same name, and
    every setting a component takes is a pipeline parameter of the same name (no renames on the way)."""
    spec = _documents()[0]
    params = set(spec["root"]["inputDefinitions"]["parameters"])
    assert params == set(pipeline_defaults())
    fed: dict[str, set[str]] = {p: set() for p in params}
    for task, body in _tasks(spec).items():
        for name, source in body.get("inputs", {}).get("parameters", {}).items():
            upstream = source.get("componentInputParameter", "").removeprefix("pipelinechannel--")
            if name.startswith("pipelinechannel--"):  # a value kfp passes on for the task's settings (pod resources)
                if upstream in {f.name for f in dataclasses.fields(CONFIGS["pipeline"])}:
                    fed[upstream].add("pipeline")
            elif upstream in params and task != "exit-handler-1":
                assert upstream == name, f"task {task}: input {name!r} is fed by parameter {upstream!r}"
                fed[name].add(task)
    assert all(fed.values()), {p: t for p, t in fed.items() if not t}
    stage_of = {"start-run": "run", "finish-run": "run", "pipeline": "pipeline", **{s: s for s in STAGES}}
    for p in parameter_fields():
        assert {stage_of[t] for t in fed[p.name]} == set(p.stages), p
        whole_config = p.name == f"{p.stages[-1]}_settings" and p.path == ""  # a stage's other settings, one object
        assert (p.path.rsplit(".", 1)[-1] == p.name or whole_config) and p.doc, p


def test_every_task_gets_cpu_and_memory_from_parameters():
    """Each KFP task's pod has CPU and memory requests and limits, set from the TaskResources parameters: the
    model-running tasks (evaluate, export) from eval_*, the others (the RayJob launchers among them) from task_*."""
    spec = _documents()[0]
    params = spec["root"]["inputDefinitions"]["parameters"]
    executors = spec["deploymentSpec"]["executors"]
    tasks = _tasks(spec)
    for task in ("start-run", "finish-run", *STAGES):
        group = "eval" if task in ("evaluate", "export") else "task"
        resources = executors[tasks[task]["componentRef"]["name"].replace("comp-", "exec-")]["container"]["resources"]
        for key, field in (("resourceCpuRequest", "cpu_request"), ("resourceCpuLimit", "cpu_limit"),
                           ("resourceMemoryRequest", "memory_request"), ("resourceMemoryLimit", "memory_limit")):
            assert resources[key] == f"{{{{$.inputs.parameters['pipelinechannel--{group}_{field}']}}}}", (task, key)
            assert params[f"{group}_{field}"]["defaultValue"], (group, field)
    assert params["eval_memory_limit"]["defaultValue"] == "32Gi"
    assert params["task_cpu_request"]["defaultValue"] == "500m"


# Values the config accepts that differ from every default; strings with a fixed set of values are named
# here, the rest are derived from the parameter's default by type.
CHOICES = {"preset": "basic_only", "model_config": "RN50", "launcher": "rayjob", "templates": "cifar",
           "epochs": 0.0,  # epochs: the budget is steps (set by the test) or epochs, never both
           # each stage's other settings: one of them, through the object
           "filter_settings": '{"min_side": 123}', "shard_settings": '{"max_shard_bytes": 12345678}',
           "train_settings": "seed: 11", "evaluate_settings": '{"tokenizer_uri": "t.json"}',
           "export_settings": '{"opset": 18}'}


def sentinel(name: str, default):
    if name in CHOICES:
        return CHOICES[name]
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 3
    if isinstance(default, float):
        return default * 0.5 if default else 0.25
    return f"{default}-set-by-test"


class _Built(Exception):
    """Raised by the patched loader: the step built its config, nothing more needs to run."""


def test_every_parameter_reaches_its_config_field_at_run_time(monkeypatch, tmp_path):
    """Each stage's `run`, called as the KFP component calls it, builds its config with every parameter
    it takes in the field of the same name."""
    import importlib

    defaults = pipeline_defaults()
    values = {k: sentinel(k, v) for k, v in defaults.items()}
    assert all(values[k] != v for k, v in defaults.items())
    built = {}
    real = config.from_dict
    expect: list[type] = []  # the config the call under test builds (start-run checks the stages' on the way)

    def capture(cls, settings=None, **kw):
        if cls is not expect[0]:  # a nested config (TrainConfig.optim) or a check built on the way
            return real(cls, settings, **kw)
        built[cls] = real(cls, settings, **kw)
        raise _Built

    monkeypatch.setattr(config, "from_dict", capture)
    ctx = RunContext(str(tmp_path), "", "exp", "").to_json()
    artifact = SimpleNamespace(path=str(tmp_path / "in.json"), metadata={})
    Path(artifact.path).write_text(json.dumps({"uri": "x"}))
    spec = _documents()[0]
    for stage in STAGES:
        inputs = spec["components"][f"comp-{stage}"]["inputDefinitions"]
        settings = {k: values[k] for k in inputs["parameters"] if k != "ctx"}
        artifacts = {k: artifact for k in list(inputs.get("artifacts", {})) +
                     list(spec["components"][f"comp-{stage}"].get("outputDefinitions", {}).get("artifacts", {}))}
        expect[:] = [CONFIGS[stage]]
        with pytest.raises(_Built):
            importlib.import_module(f"components.{stage}.task").run(ctx=ctx, **artifacts, **settings)
        _check(built[CONFIGS[stage]], settings)
    from pipelines.parent_run import finish_run, start_run

    for op in (start_run, finish_run):
        settings = {k: values[k] for k in op.component_spec.inputs if k in values}
        extra = {"status": SimpleNamespace(state="SUCCEEDED")} if op is finish_run else {}
        expect[:] = [CONFIGS["run"]]
        with pytest.raises(_Built):
            op.python_func(pipeline_run_id="run-1", **extra, **settings)
        _check(built[CONFIGS["run"]], settings)


def _check(cfg, settings: dict) -> None:
    for name, value in settings.items():
        if name.endswith(config.SETTINGS_SUFFIX):  # the stage's object: each of its settings reached its field
            from pipelines.stage_settings import STAGE_CONFIGS

            if type(cfg) is STAGE_CONFIGS[name.removesuffix(config.SETTINGS_SUFFIX)]:
                _check(cfg, config.settings_object(value, type(cfg), name, check_types=False))
            continue
        got = cfg
        for part in config.resolve_key(type(cfg), name).split("."):
            got = getattr(got, part)
        assert got == value, (type(cfg).__name__, name, got)


def test_every_run_form_parameter_is_described_by_its_config_field():
    """The KFP run form explains each parameter: its description (compiled from the pipeline docstring's
    Args:, which is written from the config comments) is the comment of the config field it sets."""
    params = _documents()[0]["root"]["inputDefinitions"]["parameters"]
    docs = {p.name: p.doc for p in parameter_fields()}
    assert set(params) == set(docs)
    for name, spec in params.items():
        assert spec.get("description"), f"pipeline parameter {name} has no description in the package"
        assert spec["description"] == docs[name], name


def test_enumerated_parameters_name_their_allowed_values():
    from clip_model.config import list_configs
    from components.evaluate.suite import BUILTIN_SUITES
    from components.inference.prompts import TEMPLATE_SETS
    from components.filter.config import FilterConfig
    from components.common.rayjob import LAUNCHERS

    docs = {p.name: p.doc for p in parameter_fields()}
    presets = FilterConfig.presets()
    distinct = [n for i, n in enumerate(presets) if presets[n] not in list(presets.values())[:i]]  # no aliases
    for name, allowed in (("launcher", LAUNCHERS), ("model_config", list_configs()), ("preset", distinct),
                          ("templates", TEMPLATE_SETS), ("eval_suite", list(BUILTIN_SUITES))):
        missing = [value for value in allowed if value not in docs[name]]
        assert not missing, f"the meaning of {name} does not name {missing}: {docs[name]}"


def test_tasks_have_readable_names_in_the_kfp_ui():
    tasks = _tasks(_documents()[0])
    for key in [*STAGES, "start-run", "finish-run"]:
        shown = tasks[key]["taskInfo"]["name"]
        assert shown != key and " " in shown, (key, shown)


def test_every_stage_writes_a_markdown_visualisation():
    spec = _documents()[0]
    for stage in STAGES:
        outputs = spec["components"][f"comp-{stage}"]["outputDefinitions"]["artifacts"]
        assert any(o["artifactType"]["schemaTitle"] == "system.Markdown" for o in outputs.values()), stage


def test_each_setting_has_one_default_and_the_overrides_one_table():
    """A pipeline parameter's default is its config field's, unless OVERRIDES names the cluster's value; the
    local run's values are OVERRIDES' local column."""
    from components.common import platform as pf
    from components.common.kfp_component import IMAGE
    from pipelines.local import local_arguments
    from pipelines.parameters import AS_PIPELINE, CONFIG_DEFAULT, OVERRIDES, config_default, local_defaults

    named = {"image": IMAGE, "data_root": f"s3://{pf.BUCKET}/runs", "s3_endpoint": pf.S3_ENDPOINT,
             "mlflow_tracking_uri": pf.MLFLOW_TRACKING_URI}  # the table describes these in words
    for p in parameter_fields():
        cluster = OVERRIDES.get(p.name, (CONFIG_DEFAULT, AS_PIPELINE))[0]
        expected = config_default(p.name) if cluster == CONFIG_DEFAULT else named.get(p.name, cluster)
        assert p.default == expected, f"{p.name}: the pipeline says {p.default!r}, the table {expected!r}"
    assert set(OVERRIDES) <= set(pipeline_defaults())
    local = local_arguments(Path("/tmp/w"))
    assert local["model_config"] == config_default("model_config") == "tiny" and local["steps"] == 300
    assert local["epochs"] == 0.0 and isinstance(local["epochs"], float)  # typed as the parameter
    assert local["eval_suite"] == pipeline_defaults()["eval_suite"] and "eval_suite" not in local_defaults()


def test_every_input_a_task_reads_is_defined_where_it_runs():
    """Inside the exit handler's DAG, each task input fed by `componentInputParameter` names an input of that
    DAG, fed by the root's parameter (kfp 2.17 leaves out the ones only pod resources read:
    `pipelines.compile.pass_channels_down`); otherwise kfp.local and the KFP backend fail to resolve them."""
    spec = _documents()[0]
    root = spec["root"]
    for ref, comp in spec["components"].items():
        if "dag" not in comp:
            continue
        defined = set(comp["inputDefinitions"]["parameters"])
        feeders = [t for t in root["dag"]["tasks"].values() if t["componentRef"]["name"] == ref]
        for name, task in comp["dag"]["tasks"].items():
            for src in task.get("inputs", {}).get("parameters", {}).values():
                wanted = src.get("componentInputParameter")
                if wanted:
                    assert wanted in defined, f"{ref} task {name} reads {wanted}, which {ref} does not define"
                    for feeder in feeders:
                        fed = feeder["inputs"]["parameters"][wanted]["componentInputParameter"]
                        assert fed in root["inputDefinitions"]["parameters"], (ref, wanted, fed)
