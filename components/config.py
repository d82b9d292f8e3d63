"""Typed stage configs from plain dicts (JSON, KFP parameters): unknown keys are an error, not ignored."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """`cls(**d)` for a dataclass, refusing keys it does not have (a typo would otherwise vanish)."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown} (known: {sorted(known)})")
    return cls(**d)
