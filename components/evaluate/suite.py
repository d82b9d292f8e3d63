"""Evaluation suites: the datasets one evaluate stage runs, from a YAML / JSON file or a built-in name.

    load_suite("")                             # None: no labelled evaluation
    load_suite("synthetic")                    # built-in: components/evaluate/suites/synthetic.yaml
    load_suite("/data/robustness.yaml")        # a suite file, local or s3:// (.yaml, .yml or .json)
    load_suite("/data/wds_cifar10")            # one dataset (any other URI): a suite of one named after it

A suite file:

    name: robustness                           # optional; default: the file's name
    defaults: {tasks: [zeroshot, linear_probe]} # optional: fields every dataset takes unless it sets them
    datasets:
      - name: imagenet
        uri: /data/wds_imagenet1k              # CLIP_benchmark layout, read as it is
      - name: imagenet-sketch
        uri: wds_imagenet_sketch               # relative URIs are relative to the suite file
        shift_of: imagenet                     # a shifted version of `imagenet`: the robustness report
        tasks: [zeroshot]

Each dataset's fields are `DatasetSpec`'s; an unknown key is an error naming the dataset. ``synthetic:<set>``
URIs name the bundled synthetic sets, which the stage generates (`generate_synthetic`): ``synthetic:reference``
(the evaluation split) and ``synthetic:<shift>`` for each shift of `components.synthetic.shifts.SHIFTS`.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from components.common import config, storage
from components.common.config import ConfigError
from components.inference.prompts import CLASSNAME_PRESETS, TEMPLATE_SETS

TASKS = ("zeroshot", "linear_probe", "retrieval")
FORMATS = ("auto", "folder", "wds", "csv")
RESERVED_NAMES = ("mean", "validation", "robustness")  # metric prefixes of the stage itself
SUITE_DIR = Path(__file__).resolve().parent / "suites"
BUILTIN_SUITES = {p.stem: p for p in sorted(SUITE_DIR.glob("*.yaml"))}
SUITE_FILE_EXTS = (".yaml", ".yml", ".json")
SYNTHETIC_SCHEME = "synthetic:"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class DatasetSpec:
    name: str  # names the dataset's rows, metrics (<name>/zeroshot_top1) and plots: letters, digits, _ - .
    uri: str  # ImageFolder dir, labelled or caption tars (CLIP_benchmark layout), or a .csv/.tsv; local or s3://;
              # synthetic:<set> = a bundled synthetic set the stage generates
    format: str = "auto"  # auto | folder | wds | csv
    split: str | None = None  # None = <uri>/test where it exists, else <uri>; "" = <uri>; else <uri>/<split>
    tasks: tuple[str, ...] = ()  # zeroshot | linear_probe | retrieval; () = by the data: zeroshot + linear_probe
                                 # with labels, retrieval with captions
    classnames: str | list[str] | None = None  # cifar10 | cifar100 | imagenet | a file | a list; None = the
                                               # set's classnames.txt, its folders or its CSV labels
    templates: str | list[str] | None = None  # a template set, a file or a list; None = the stage's templates,
                                              # else the set's zeroshot_classification_templates.txt, else
                                              # its class-name preset's, else simple
    shift_of: str = ""  # name of the reference dataset this set is a shifted version of ("" = none)
    max_images: int | None = None  # cap on this set (class-balanced for folders and CSVs); None = the stage's
    columns: dict[str, str] = field(default_factory=dict)  # a CSV's image / label / caption column names

    def __post_init__(self) -> None:
        where = f"suite dataset {self.name!r}"
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"{where}: a name is letters, digits, '_', '-' and '.' (starting with a letter or digit)")
        if not self.uri:
            raise ValueError(f"{where}: needs a uri")
        if self.format not in FORMATS:
            raise ValueError(f"{where}: format {self.format!r}: choose one of {list(FORMATS)}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"{where}: unknown tasks {unknown}; choose from {list(TASKS)}")
        bad = sorted(set(self.columns) - {"image", "label", "caption"})
        if bad:
            raise ValueError(f"{where}: columns {bad}: a CSV's columns are image, label and caption")


@dataclass
class Suite:
    name: str
    source: str  # what the setting named: "built-in synthetic", a file, or "one dataset: URI"
    datasets: list[DatasetSpec]
    description: str = ""

    def __post_init__(self) -> None:
        names = [d.name for d in self.datasets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if not self.datasets or twice:
            raise ValueError(f"suite {self.source}: " + (f"dataset names {twice} appear twice" if twice
                                                          else "lists no datasets"))
        reserved = [n for n in names if n in RESERVED_NAMES]
        if reserved:
            raise ValueError(f"suite {self.source}: dataset names {reserved} are taken by the stage's own "
                             f"metrics ({list(RESERVED_NAMES)}); rename them")
        by_name = {d.name: d for d in self.datasets}
        for d in self.datasets:
            if not d.shift_of:
                continue
            ref = by_name.get(d.shift_of)
            if ref is None or ref is d or ref.shift_of:
                raise ValueError(f"suite {self.source}: dataset {d.name!r}: shift_of {d.shift_of!r} must name another "
                                 f"dataset of the suite that is not itself a shift; datasets: {names}")

    def shifts_of(self, name: str) -> list[DatasetSpec]:
        return [d for d in self.datasets if d.shift_of == name]


def _relative_to(base: str, value: str) -> str:
    """`value` resolved against the suite file's folder, unless it is absolute, s3:// or synthetic:."""
    if not base or value.startswith(("/", "s3://", SYNTHETIC_SCHEME)) or re.match(r"^[A-Za-z]:[\\/]", value):
        return value
    return storage.join(base, value) if storage.is_s3(base) else posixpath.normpath(posixpath.join(base, value))


def _dataset(entry: object, defaults: dict, base: str, where: str) -> DatasetSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a dataset is a mapping with at least name and uri, got {entry!r}")
    label = f"{where} ({entry.get('name', '?')})"
    merged = {**defaults, **entry}
    try:
        spec = config.from_dict(DatasetSpec, merged)
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"{label}: {exc}") from None
    changes: dict = {"uri": _relative_to(base, spec.uri)}
    for key, names in (("classnames", CLASSNAME_PRESETS), ("templates", TEMPLATE_SETS)):
        value = getattr(spec, key)
        if isinstance(value, str) and value.strip().lower() not in names:
            changes[key] = _relative_to(base, value)
    return replace(spec, **changes)


def parse_suite(data: object, source: str, base: str = "", default_name: str = "suite") -> Suite:
    """A `Suite` from the parsed YAML / JSON of a suite file (`base`: the folder relative URIs start from)."""
    if not isinstance(data, dict):
        raise ConfigError(f"suite {source}: expected a mapping with a 'datasets' list, got {type(data).__name__}")
    unknown = sorted(set(data) - {"name", "description", "defaults", "datasets"})
    if unknown:
        raise ConfigError(f"suite {source}: unknown keys {unknown}; a suite has name, description, defaults and "
                          "datasets")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or {"name", "uri"} & set(defaults):
        raise ConfigError(f"suite {source}: defaults is a mapping of dataset fields other than name and uri")
    entries = data.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"suite {source}: 'datasets' must be a non-empty list")
    datasets = [_dataset(e, defaults, base, f"suite {source}: dataset {i}") for i, e in enumerate(entries)]
    try:
        return Suite(name=str(data.get("name") or default_name), source=source, datasets=datasets,
                     description=str(data.get("description") or ""))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _one_dataset_name(uri: str) -> str:
    stem = posixpath.basename(uri.rstrip("/")).rsplit(".", 1)[0] if uri.lower().endswith((".csv", ".tsv")) \
        else posixpath.basename(uri.rstrip("/"))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-._") or "dataset"
    return name if name not in RESERVED_NAMES else f"{name}-set"


def load_suite(setting: str) -> Suite | None:
    """The suite an `eval_suite` setting names (see the module docstring); None for ""."""
    setting = setting.strip()
    if not setting:
        return None
    if setting in BUILTIN_SUITES:
        path = BUILTIN_SUITES[setting]
        return parse_suite(yaml.safe_load(path.read_text(encoding="utf-8")), f"built-in {setting}",
                           default_name=setting)
    if setting.lower().endswith(SUITE_FILE_EXTS):
        text = storage.read_text(setting)
        try:
            data = json.loads(text) if setting.lower().endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"suite {setting}: not valid {'JSON' if setting.endswith('.json') else 'YAML'} "
                              f"({exc})") from None
        base = setting.rsplit("/", 1)[0] if "/" in setting else "."
        return parse_suite(data, setting, base, default_name=posixpath.basename(setting).rsplit(".", 1)[0])
    if setting.startswith(SYNTHETIC_SCHEME):
        raise ConfigError(f"eval_suite {setting!r}: synthetic sets are listed in a suite; the built-in suites are "
                          f"{sorted(BUILTIN_SUITES)}")
    return Suite(name=_one_dataset_name(setting), source=f"one dataset: {setting}",
                 datasets=[DatasetSpec(name=_one_dataset_name(setting), uri=setting)])


def generate_synthetic(suite: Suite, data_uri: str, per_class: int) -> tuple[Suite, dict[str, str]]:
    """Generate the suite's ``synthetic:<set>`` datasets under ``<data_uri>/<dataset name>`` (a fixed seed,
    never the training corpus's) and point the suite at them. Returns the suite and {dataset: how the
    report names it}."""
    from components.synthetic.corpus import EVAL_SEED, generate_eval_split, write_to
    from components.synthetic.shifts import SHIFTS, generate_shifted_split

    datasets, described = [], {}
    for spec in suite.datasets:
        if not spec.uri.startswith(SYNTHETIC_SCHEME):
            datasets.append(spec)
            continue
        kind = spec.uri[len(SYNTHETIC_SCHEME):]
        if kind != "reference" and kind not in SHIFTS:
            raise ConfigError(f"suite {suite.source}: dataset {spec.name!r}: {spec.uri!r}: the synthetic sets are "
                              f"{['synthetic:reference'] + [SYNTHETIC_SCHEME + s for s in SHIFTS]}")
        dest = storage.join(data_uri, spec.name)
        for stale in storage.list_files(dest):  # an earlier run's set (perhaps another size) is replaced whole
            storage.delete(stale)
        if kind == "reference":
            write_to(dest, lambda d: generate_eval_split(d, per_class=per_class, seed=EVAL_SEED))
            style = "the evaluation split"
        else:
            write_to(dest, lambda d, k=kind: generate_shifted_split(d, k, per_class=per_class, seed=EVAL_SEED))
            style = f"shift {kind}: {SHIFTS[kind]}"
        datasets.append(replace(spec, uri=dest, format="folder", split=""))
        described[spec.name] = f"synthetic, generated: {style}, {per_class} images per class, seed {EVAL_SEED}, at {dest}"
    return replace(suite, datasets=datasets), described
