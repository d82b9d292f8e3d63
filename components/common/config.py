"""One strict loader for every config dataclass: from plain values (JSON, KFP parameters, `--set`).

    cfg = from_dict(TrainConfig, {"steps": "300", "lr": 1e-3})   # coerced to the fields' types
    to_dict(cfg)                                                 # JSON-ready; from_dict(cls, to_dict(cfg)) == cfg

A key names a field (`steps`), a field of a nested config by its path (`optim.lr`) or, where that
name is unique in the config tree, by its own name (`lr`); a nested config may also be given as a
dict. An unknown key is an error that names it and lists the known ones. Values given as strings
(command lines, KFP) are converted to the field's type: `"300"` to an int, `"a,b"` or `'["a","b"]'`
to a tuple, `"none"` to None where the field is optional, `"true"`/`"false"` to a bool.

A config class with a `preset` field and a `presets()` classmethod ({name: {field: value}}) starts
from the named preset's values; the other keys override them.

`describe(cls)` lists every setting with its type, default and meaning; the meaning is the comment
written after the field in the class body, so a setting is documented in exactly one place.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from functools import lru_cache
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting that does not fit its config: an unknown key or a value of the wrong type."""


# --------------------------------------------------------------------------- introspection

@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _nested(tp: Any) -> type | None:
    """The dataclass a field holds (also through `X | None`), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def field_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """{dotted path: type} of every leaf setting of `cls`, nested configs included."""
    out: dict[str, Any] = {}
    for name in _fields(cls):
        tp = _hints(cls)[name]
        sub = _nested(tp)
        if sub is not None:
            out.update(field_paths(sub, f"{prefix}{name}."))
        else:
            out[prefix + name] = tp
    return out


def resolve_key(cls: type, key: str) -> str:
    """The dotted path a settings key stands for (see the module docstring)."""
    paths = field_paths(cls)
    nested = {p.split(".", 1)[0] for p in paths if "." in p}
    if key in paths or key in nested:
        return key
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"{cls.__name__}: setting {key!r} is ambiguous: use one of {matches}")
    raise ConfigError(f"{cls.__name__}: unknown setting {key!r}; known: {', '.join(paths)}")


# --------------------------------------------------------------------------- coercion

# pydantic (which mlflow brings) converts and checks the values (lax mode: "300" -> 300, "yes" -> True, 5 -> "5");
# what it does not read is brought to it first: a list written as text ("a,b" or '["a","b"]'), "none" for an
# optional field, JSON text for a mapping, and a nested config (keys by leaf name, presets) goes to from_dict.
_LAX = ConfigDict(coerce_numbers_to_str=True)
_NONE = ("none", "null")


@lru_cache(maxsize=None)
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp, config=_LAX)


_WHAT = {int: "an int", float: "a number", bool: "a bool (true/false)", str: "a string"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _what(tp: Any) -> str:
    return _WHAT.get(tp) or f"a {_type_name(tp)}"


def _inner(tp: Any) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _from_text(value: Any, tp: Any, where: str) -> Any:
    """What a command line or a KFP parameter writes as text, in the form pydantic reads."""
    inner, optional = _inner(tp)
    if not isinstance(value, str):
        return value
    if optional and value.strip().lower() in _NONE:
        return None
    origin = typing.get_origin(inner)
    if origin in (tuple, list):
        return _sequence(value, where)
    if origin is dict or inner is dict:
        return _json(value, where)
    return value


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` converted to the annotation `tp`; ConfigError naming `where` when it cannot be."""
    if tp is Any:
        return value
    value = _from_text(value, tp, where)
    sub = _nested(tp)
    if sub is not None and value is not None and not isinstance(value, sub):
        if isinstance(value, str):
            value = _json(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected the settings of {sub.__name__}, got {value!r}")
        return from_dict(sub, value)
    inner = _inner(tp)[0]
    if isinstance(value, bool) and inner in (int, float):  # pydantic would take True for 1
        raise ConfigError(f"{where}: {value!r} is not {_what(inner)}")
    sizes = typing.get_args(inner)
    if typing.get_origin(inner) is tuple and Ellipsis not in sizes and isinstance(value, (list, tuple)) \
            and len(value) != len(sizes):
        raise ConfigError(f"{where}: expected {len(sizes)} values, got {len(value)}: {value!r}")
    try:
        return _adapter(tp).validate_python(value)
    except ValidationError as e:
        why = "" if inner in _WHAT else " (" + "; ".join(err["msg"] for err in e.errors()[:2]) + ")"
        raise ConfigError(f"{where}: {value!r} is not {_what(inner)}{why}") from None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: {text[:80]!r} is not valid JSON ({e})") from None


def _sequence(value: Any, where: str) -> list:
    text = value.strip()
    if text.startswith("["):
        items = _json(text, where)
        if isinstance(items, list):
            return items
    return [part.strip() for part in text.split(",") if part.strip()]


# --------------------------------------------------------------------------- the loader

def _tree(cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """Settings keyed by (possibly dotted or leaf) names -> a tree of top-level fields."""
    tree: dict[str, Any] = {}
    for key, value in settings.items():
        path = resolve_key(cls, str(key)).split(".")
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # a nested config given whole, then a field of it
                child = node[part] = to_dict(child) if dataclasses.is_dataclass(child) else dict(child)
            node = child
        if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
            node[path[-1]].update(value)
        else:
            node[path[-1]] = value
    return tree


def from_dict(cls: type[T], settings: dict[str, Any] | None = None, **overrides: Any) -> T:
    """`cls` built from `settings` (and keyword overrides) with every value checked and coerced."""
    merged = {**(settings or {}), **overrides}
    tree = _tree(cls, merged)
    if "preset" in _fields(cls) and hasattr(cls, "presets"):
        name = coerce(tree.get("preset", _fields(cls)["preset"].default), str, f"{cls.__name__}.preset")
        presets = cls.presets()  # type: ignore[attr-defined]
        key = name.strip().lower().replace("-", "_")
        if key not in presets:
            raise ConfigError(f"{cls.__name__}.preset: unknown preset {name!r}; known: {', '.join(presets)}")
        tree = {**_tree(cls, presets[key]), **tree, "preset": key}
    kwargs: dict[str, Any] = {}
    for name, value in tree.items():
        tp = _hints(cls)[name]
        sub = _nested(tp)
        if sub is not None and isinstance(value, dict):
            kwargs[name] = from_dict(sub, value)
        else:
            kwargs[name] = coerce(value, tp, f"{cls.__name__}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # the class's own checks (__post_init__)
        raise ConfigError(str(e)) from None


SETTINGS_SUFFIX = "_settings"  # `<stage>_settings`: a stage's other settings as one YAML/JSON object


def settings_object(text: str, cls: type, where: str, own: Any = (), check_types: bool = True) -> dict[str, Any]:
    """A `<stage>_settings` value, checked strictly: a YAML or JSON object whose every key is a setting of
    `cls` (by name or dotted path) that has no parameter of its own (`own`), and whose values have the
    settings' types. "" (or an empty object) is {}. Any error names `where` and the key."""
    import yaml

    try:  # JSON first: YAML 1.1 reads JSON's 1e-06 as a string
        values = json.loads(text) if text and text.strip() else None
    except json.JSONDecodeError:
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not a YAML or JSON object ({e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: a YAML or JSON object of {cls.__name__} settings expected, got "
                          f"{type(values).__name__} {values!r}")
    for key in values:
        try:
            path = resolve_key(cls, str(key))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if str(key) in own or path.rsplit(".", 1)[-1] in own:
            raise ConfigError(f"{where}: {key!r} is a parameter of its own: set it there, not here")
    if check_types:  # (a caller that builds the config from these values right after has them checked there)
        try:
            from_dict(cls, values)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return {str(k): v for k, v in values.items()}


def stage_config(cls: type[T], settings: dict[str, Any], stage: str) -> T:
    """A stage's config from its KFP component's inputs: the settings it takes by name, plus the object in
    `<stage>_settings` (`settings_object`) for any other setting of `cls`."""
    settings = dict(settings)
    text = settings.pop(stage + SETTINGS_SUFFIX, "")
    extra = settings_object(text, cls, stage + SETTINGS_SUFFIX, own=settings, check_types=False)
    return from_dict(cls, {**settings, **extra})


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples as lists, nested configs as dicts)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def from_json(cls: type[T], text_or_path: str) -> T:
    """A config from a JSON string (starting with '{') or the path of a JSON file."""
    text = text_or_path if text_or_path.lstrip().startswith("{") else open(text_or_path).read()
    data = _json(text, cls.__name__)
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    return from_dict(cls, data)


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """`["key=value", ...]` (the CLI's `--set`) -> {key: value}; values stay strings for from_dict."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value
    return out


# --------------------------------------------------------------------------- documentation

@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field: its comment} (the one place a setting is explained): the comment after the field, with
    the comment-only lines below it that start in the same column."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    body = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef)).body
    docs = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        end = node.end_lineno or node.lineno
        own = [comments[ln] for ln in range(node.lineno, end + 1) if ln in comments]
        if not own:
            continue
        column, parts = own[-1][0], [c[1] for c in own]
        line = end + 1
        while line in comments and comments[line][2] and comments[line][0] == column:
            parts.append(comments[line][1])
            line += 1
        docs[node.target.id] = " ".join(parts)
    return docs


def field_doc(cls: type, path: str) -> str:
    """The comment of the field at dotted `path` (nested configs followed)."""
    *parents, leaf = path.split(".")
    for part in parents:
        cls = _nested(_hints(cls)[part])
    return field_docs(cls).get(leaf, "")


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(path, type, default, meaning) of every setting of `cls`, nested configs included."""
    rows = []
    docs = field_docs(cls)
    for name, f in _fields(cls).items():
        tp = _hints(cls)[name]
        sub = _nested(tp)
        if sub is not None:
            rows += describe(sub, f"{prefix}{name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        rows.append((prefix + name, _type_name(tp), to_dict(default) if isinstance(default, tuple) else default,
                     docs.get(name, "")))
    return rows
