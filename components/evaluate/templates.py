"""Prompt templates and the dataset presets of zero-shot evaluation.

Torch-free and boto3-free (an s3:// templates file imports storage on demand): the serving command
`clipflow zeroshot` uses this module too.
"""

from __future__ import annotations

from pathlib import Path

from clip_model.templates import get_templates

TEMPLATE_SETS = ("imagenet", "cifar", "synthetic", "simple")
DATASETS = ("synthetic", "cifar10", "cifar100", "imagenet", "custom")


def _read_text(uri: str) -> str:
    if uri.startswith("s3://"):
        from components.common import storage

        return storage.read_text(uri)
    path = Path(uri)
    if not path.is_file():
        raise ValueError(f"templates {uri!r}: neither a template set {list(TEMPLATE_SETS)} nor an existing file")
    return path.read_text(encoding="utf-8")


def resolve_templates(name_or_uri: str) -> list[str]:
    """Prompt templates by name (imagenet: 80, cifar: 18, synthetic, simple) or from a file / URI with
    one template per line containing ``{}``."""
    key = name_or_uri.strip().lower()
    if key == "synthetic":
        from components.synthetic.vocab import SYNTHETIC_TEMPLATES

        return list(SYNTHETIC_TEMPLATES)
    if key in ("imagenet", "cifar", "simple"):
        return get_templates(key)
    lines = [ln.strip() for ln in _read_text(name_or_uri).splitlines()]
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"templates file {name_or_uri}: needs one template per line, each with a '{{}}' "
                         f"placeholder for the class name (bad: {bad[:3]})")
    return templates


def dataset_defaults(dataset: str) -> tuple[list[str] | None, str]:
    """(class names or None = from the data, default template set) for a `dataset` option."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r}: choose one of {list(DATASETS)}")
    if dataset in ("cifar10", "cifar100", "imagenet"):
        from clip_model import templates as t

        names = {"cifar10": t.CIFAR10_CLASSNAMES, "cifar100": t.CIFAR100_CLASSNAMES,
                 "imagenet": t.IMAGENET_CLASSNAMES}[dataset]
        return list(names), ("imagenet" if dataset == "imagenet" else "cifar")
    if dataset == "synthetic":
        return None, "synthetic"
    return None, "simple"
