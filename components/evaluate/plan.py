"""From a suite to what the stage runs: every dataset opened, its class names, templates and tasks settled,
and the whole suite checked before any image is encoded (a mistake in the last dataset costs nothing)."""

from __future__ import annotations

from dataclasses import dataclass

from components.common.config import ConfigError
from components.evaluate.config import EvalConfig
from components.evaluate.datasets import open_set
from components.evaluate.evalset import EvalSet, norm_classname, read_lines
from components.evaluate.suite import DatasetSpec, Suite
from components.inference.prompts import CLASSNAME_PRESETS, check_templates, preset_classnames, resolve_templates


@dataclass
class Planned:
    """One dataset of the suite, ready to encode."""

    spec: DatasetSpec
    data: EvalSet
    tasks: tuple[str, ...]
    templates: list[str] | None  # zero-shot prompts (None without the zeroshot task)
    templates_from: str  # where they came from, for the report
    source: str  # how the report names the data

    @property
    def name(self) -> str:
        return self.spec.name


def _classnames(spec: DatasetSpec) -> list[str] | None:
    value = spec.classnames
    if value is None or isinstance(value, list):
        return value
    return preset_classnames(value) or read_lines(value)


def _templates(spec: DatasetSpec, data: EvalSet, cfg: EvalConfig, synthetic: bool) -> tuple[list[str], str]:
    """Precedence: the dataset's own `templates`, the stage's `templates`, the data's shipped file, the
    class-name preset's set, the synthetic set for generated data, else "simple"."""
    if isinstance(spec.templates, list):
        return check_templates(spec.templates, f"of dataset {spec.name!r}"), "the suite (a list)"
    if spec.templates:
        return resolve_templates(spec.templates), f"the suite: {spec.templates}"
    if cfg.templates:
        return resolve_templates(cfg.templates), f"the stage's templates: {cfg.templates}"
    if data.templates:
        return check_templates(data.templates, f"file of {data.root}"), "zeroshot_classification_templates.txt"
    preset = spec.classnames.strip().lower() if isinstance(spec.classnames, str) else ""
    name = CLASSNAME_PRESETS.get(preset) or ("synthetic" if synthetic else "simple")
    return resolve_templates(name), f"default: {name}"


def _tasks(spec: DatasetSpec, data: EvalSet, cfg: EvalConfig, skipped: dict[str, str]) -> tuple[str, ...]:
    tasks = spec.tasks or tuple(t for t, ok in (("zeroshot", data.has_labels), ("linear_probe", data.has_labels),
                                                ("retrieval", data.has_captions)) if ok)
    for task, ok, what in (("zeroshot", data.has_labels, "labels"), ("linear_probe", data.has_labels, "labels"),
                           ("retrieval", data.has_captions, "captions")):
        if task in tasks and not ok:
            raise ConfigError(f"suite dataset {spec.name!r}: task {task} needs {what}, and {data.location} has none")
    if "linear_probe" in tasks and not cfg.linear_probe:
        skipped[f"{spec.name}/linear_probe"] = "linear_probe is off"
        tasks = tuple(t for t in tasks if t != "linear_probe")
    return tasks


def plan_suite(suite: Suite, cfg: EvalConfig, described: dict[str, str],
               skipped: dict[str, str]) -> list[Planned]:
    """Open every dataset of `suite` and settle its tasks and templates (what was turned off goes into
    `skipped`). A shifted set needs the zeroshot task, as does its reference, and class names that are all
    among the reference's."""
    planned: dict[str, Planned] = {}
    for spec in suite.datasets:
        try:
            data = open_set(spec.uri, spec.format, spec.split, _classnames(spec), spec.max_images or cfg.max_images,
                            spec.columns)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"suite dataset {spec.name!r}: {exc}") from None
        tasks = _tasks(spec, data, cfg, skipped)
        synthetic = spec.name in described
        templates, origin = _templates(spec, data, cfg, synthetic) if "zeroshot" in tasks else (None, "")
        planned[spec.name] = Planned(spec, data, tasks, templates, origin,
                                     described.get(spec.name, f"{data.kind} at {data.location}"))
    for p in planned.values():
        if not p.spec.shift_of:
            continue
        ref = planned[p.spec.shift_of]
        if "zeroshot" not in p.tasks or "zeroshot" not in ref.tasks:
            raise ConfigError(f"suite dataset {p.name!r}: a shifted set and its reference ({ref.name!r}) both need "
                              "the zeroshot task (the robustness report compares zero-shot accuracy)")
        known = {norm_classname(n) for n in ref.data.classnames or []}
        foreign = [n for n in p.data.classnames or [] if norm_classname(n) not in known]
        if foreign:
            raise ConfigError(f"suite dataset {p.name!r}: shift_of {ref.name!r}, but its classes {foreign[:5]} are "
                              f"not classes of {ref.name!r}")
    return list(planned.values())
