"""Compile the DAG to the package users upload in the KFP UI: `clipflow compile [--check]`."""

import tempfile
from pathlib import Path

import yaml
from kfp import compiler

PACKAGE = Path(__file__).with_name("clip_pipeline.yaml")
CHANNEL = "pipelinechannel--"


def pass_channels_down(spec: dict) -> list[str]:
    """kfp 2.17 compiles a task setting that takes a pipeline parameter (`set_cpu_request(task_cpu_request)`)
    inside a sub-DAG (the exit handler's) without passing that parameter into the sub-DAG: the task's input
    `pipelinechannel--task_cpu_request` names a sub-DAG input that does not exist, and kfp.local (like the KFP
    backend) cannot resolve it. Add each such input to the sub-DAG and feed it from the root's parameter of
    that name, as kfp does for a parameter a component takes. Returns the inputs added."""
    root_params = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    added = []
    for ref, comp in spec["components"].items():
        if "dag" not in comp:
            continue
        have = comp.setdefault("inputDefinitions", {}).setdefault("parameters", {})
        wanted = {src["componentInputParameter"] for task in comp["dag"]["tasks"].values()
                  for src in task.get("inputs", {}).get("parameters", {}).values()
                  if src.get("componentInputParameter", "").startswith(CHANNEL)}
        for name in sorted(wanted - set(have)):
            param = name.removeprefix(CHANNEL)
            if param not in root_params:
                continue
            have[name] = {"parameterType": root_params[param]["parameterType"]}
            for task in spec["root"]["dag"]["tasks"].values():
                if task.get("componentRef", {}).get("name") == ref:
                    task.setdefault("inputs", {}).setdefault("parameters", {})[name] = {"componentInputParameter": param}
            added.append(name)
    return added


def compile_pipeline(path: Path = PACKAGE) -> Path:
    from pipelines.clip_pipeline import clip_pipeline

    compiler.Compiler().compile(clip_pipeline, str(path))
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    header = "".join(line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    documents = list(yaml.safe_load_all(text[len(header):]))
    if pass_channels_down(documents[0]):  # written as kfp writes it (kfp.compiler.pipeline_spec_builder)
        path.write_text(header + yaml.dump_all(documents, sort_keys=True))
    return path


def is_stale(path: Path = PACKAGE) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_pipeline(Path(tmp) / "p.yaml").read_text()
    return not path.exists() or path.read_text() != fresh
