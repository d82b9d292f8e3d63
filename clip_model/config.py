"""Model configuration: one dataclass per tower plus the CLIP config that joins them.

Configs live as JSON data in ``clip_model/configs/<name>.json``. The JSON layout is exactly
``CLIPConfig.to_dict()``::

    {"embed_dim": 512, "quick_gelu": true,
     "vision": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
     "text": {"context_length": 77, "vocab_size": 49408, "width": 512, "layers": 12}}

A vision tower whose ``layers`` is a list of four stage depths is CLIP's modified ResNet; an
integer ``layers`` (with a ``patch_size``) is a Vision Transformer. Attention heads default to
OpenAI's convention (64 channels per head; the ResNet attention pool works on ``width * 32``
channels), which is also what ``checkpoint.config_from_state_dict`` infers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

HEAD_WIDTH = 64  # channels per attention head, as in OpenAI's CLIP
# pydantic (which mlflow brings) validates the dicts: values coerced to the fields' types, an unknown key
# an error (`__pydantic_config__` on each dataclass; it is not a field)
_NO_EXTRA = ConfigDict(extra="forbid")


@dataclass
class VisionConfig:
    __pydantic_config__ = _NO_EXTRA

    image_size: int = 224
    layers: int | tuple[int, ...] = 12  # int: ViT depth; 4-tuple: ResNet stage depths
    width: int = 768  # ViT: token width; ResNet: stem width (the pooled features have width * 32)
    patch_size: int | None = 32  # ViT only; None for a ResNet
    heads: int | None = None  # None: width // 64 (ViT) or width * 32 // 64 (ResNet)
    mlp_ratio: float = 4.0  # ViT only

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if self.is_resnet:
            if len(self.layers) != 4 or any(int(n) < 1 for n in self.layers):
                raise ValueError(f"vision.layers: a ResNet needs 4 stage depths >= 1, got {self.layers}")
            self.patch_size = None
            if self.image_size % 32:
                raise ValueError(f"vision.image_size={self.image_size}: a ResNet needs a multiple of 32")
        else:
            if not self.patch_size or self.image_size % self.patch_size:
                raise ValueError(
                    f"vision.image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.heads is None:
            self.heads = max(1, self.pooled_width // HEAD_WIDTH)
        if self.pooled_width % self.heads:
            raise ValueError(f"vision: width {self.pooled_width} is not divisible by heads={self.heads}")

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def pooled_width(self) -> int:
        """Width of the features the tower's attention works on (ResNet: after the last stage)."""
        return self.width * 32 if self.is_resnet else self.width


@dataclass
class TextConfig:
    __pydantic_config__ = _NO_EXTRA

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int | None = None  # None: width // 64
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.heads is None:
            self.heads = max(1, self.width // HEAD_WIDTH)
        if self.width % self.heads:
            raise ValueError(f"text: width {self.width} is not divisible by heads={self.heads}")


@dataclass
class CLIPConfig:
    __pydantic_config__ = _NO_EXTRA

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False  # OpenAI's models use x * sigmoid(1.702 x)
    grad_checkpointing: bool = False  # a runtime switch; it does not change the weights

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["vision"]["layers"], tuple):
            d["vision"]["layers"] = list(d["vision"]["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        """Strict: a wrong type or an unknown key (also inside `vision` / `text`) is an error naming its path."""
        try:
            return _adapter().validate_python(d)
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"model config {'.'.join(map(str, err['loc']))}: {err['msg']}") from None

    def replace(self, **changes: Any) -> "CLIPConfig":
        return replace(self, **changes)


@lru_cache(maxsize=1)
def _adapter() -> TypeAdapter:
    return TypeAdapter(CLIPConfig)


def _config_dir():
    return resources.files("clip_model") / "configs"


def list_configs() -> list[str]:
    """Names of the bundled model configs (``tiny``, ``RN50``, ``ViT-B-32``, ...)."""
    return sorted(p.name[: -len(".json")] for p in _config_dir().iterdir() if p.name.endswith(".json"))


def load_config(name_or_path: str | Path) -> CLIPConfig:
    """A bundled config by name (``"ViT-B-32"``; ``"ViT-B/32"`` also works) or a JSON file path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text()
        source = str(path)
    else:
        name = str(name_or_path).replace("/", "-")
        res = _config_dir() / f"{name}.json"
        if not res.is_file():
            raise ValueError(f"unknown model config {name_or_path!r}: not a JSON file and not one of {list_configs()}")
        text = res.read_text()
        source = name
    try:
        return CLIPConfig.from_dict(json.loads(text))
    except (ValueError, TypeError) as e:
        raise ValueError(f"model config {source}: {e}") from e
