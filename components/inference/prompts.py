"""Prompt templates and class-name presets of zero-shot evaluation.

Torch-free and boto3-free (an s3:// templates file imports storage on demand): the serving command
`clipflow zeroshot` uses this module too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clip_model.templates import get_classnames, get_templates

TEMPLATE_SETS = ("imagenet", "cifar", "synthetic", "simple")
CLASSNAME_PRESETS = {"cifar10": "cifar", "cifar100": "cifar", "imagenet": "imagenet"}  # preset -> its templates


def _read_text(uri: str) -> str:
    if uri.startswith("s3://"):
        from components.common import storage

        return storage.read_text(uri)
    path = Path(uri)
    if not path.is_file():
        raise ValueError(f"templates {uri!r}: neither a template set {list(TEMPLATE_SETS)} nor an existing file")
    return path.read_text(encoding="utf-8")


def check_templates(templates: Sequence[str], where: str) -> list[str]:
    """`templates` as a list; each needs a ``{}`` (or CLIP_benchmark's ``{c}``) class-name placeholder."""
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if not templates or bad:
        raise ValueError(f"templates {where}: needs one template per line, each with a '{{}}' (or '{{c}}') "
                         f"placeholder for the class name (bad: {bad[:3]})")
    return list(templates)


def resolve_templates(name_or_uri: str) -> list[str]:
    """Prompt templates by name (imagenet: 80, cifar: 18, synthetic, simple) or from a file / URI with
    one template per line containing ``{}`` or ``{c}`` (lines starting with '#' are comments)."""
    key = name_or_uri.strip().lower()
    if key == "synthetic":
        from components.synthetic.vocab import SYNTHETIC_TEMPLATES

        return list(SYNTHETIC_TEMPLATES)
    if key in ("imagenet", "cifar", "simple"):
        return get_templates(key)
    lines = [ln.strip() for ln in _read_text(name_or_uri).splitlines()]
    return check_templates([ln for ln in lines if ln and not ln.startswith("#")], name_or_uri)


def preset_classnames(name: str) -> list[str] | None:
    """The class names of a preset (cifar10, cifar100, imagenet), or None for any other string."""
    return get_classnames(name) if name.strip().lower() in CLASSNAME_PRESETS else None
