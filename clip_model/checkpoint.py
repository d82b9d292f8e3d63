"""Saving and loading CLIP weights.

Our files are ``torch.save({"format": "clip_model/1", "config": cfg.to_dict(), "state_dict": sd})``.
``load_model`` also takes, without any config:
  * a plain OpenAI-layout state dict (OpenAI's files add ``input_resolution``, ``context_length``
    and ``vocab_size`` entries: they are dropped),
  * an OpenCLIP training checkpoint (``{"state_dict": ..., "epoch": ...}``, keys possibly prefixed
    ``module.`` by DistributedDataParallel),
and infers the architecture with ``config_from_state_dict``, as OpenAI's ``build_model`` does.

Files are always read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never arbitrary pickled objects. Paths are local (or file objects); fetching from S3 is the caller's
job (``components/common/storage.py``). OpenAI's released ``.pt`` files are TorchScript archives, which
``weights_only`` refuses: convert them once with ``torch.jit.load(f).state_dict()``.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import torch

from .config import CLIPConfig, TextConfig, VisionConfig
from .model import CLIP

FORMAT = "clip_model/1"
# non-weight entries found in OpenAI files (and a causal mask some exports carry)
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def save_model(path: str | os.PathLike | BinaryIO, model: CLIP) -> None:
    """Write the weights and the config (so loading needs no inference). Atomic for paths."""
    payload = {"format": FORMAT, "config": model.config.to_dict(), "state_dict": model.state_dict()}
    if not isinstance(path, (str, os.PathLike)):
        torch.save(payload, path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_weights(path_or_state_dict: str | os.PathLike | BinaryIO | bytes | Mapping[str, Any],
                 map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], CLIPConfig | None]:
    """The cleaned state dict of any accepted file (ours, OpenAI's, OpenCLIP's) and the config stored
    with it (ours only; None for OpenAI / OpenCLIP state dicts)."""
    obj = path_or_state_dict
    if not isinstance(obj, Mapping):
        obj = _torch_load(obj, map_location)
    if not isinstance(obj, Mapping):
        raise ValueError(f"load_model: expected a dict of tensors, got {type(obj).__name__}")
    config = obj.get("config") if "state_dict" in obj else None
    state_dict = clean_state_dict(obj["state_dict"] if "state_dict" in obj else obj)
    return state_dict, CLIPConfig.from_dict(config) if config is not None else None


def load_model(path_or_state_dict: str | os.PathLike | BinaryIO | bytes | Mapping[str, Any],
               map_location: str | torch.device = "cpu", quick_gelu: bool = True) -> CLIP:
    """A CLIP with the given weights loaded strictly, in eval mode.

    ``quick_gelu`` is only used when the config has to be inferred (it is not visible in the
    weights): OpenAI's models use QuickGELU, so it defaults to True.
    """
    state_dict, cfg = read_weights(path_or_state_dict, map_location)
    cfg = cfg or config_from_state_dict(state_dict, quick_gelu)
    model = CLIP(cfg)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"load_model: the weights do not match the architecture {cfg}: {e}") from e
    return model.to(map_location).eval()


def _torch_load(source: str | os.PathLike | BinaryIO | bytes, map_location) -> Any:
    name = str(source) if isinstance(source, (str, os.PathLike)) else "<stream>"
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise FileNotFoundError(f"load_model: no checkpoint file at {name}")
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError for TorchScript archives
        raise ValueError(
            f"load_model: {name} is not a plain weights file (weights_only=True refuses it; only tensors "
            f"and plain containers are accepted; a TorchScript archive must be converted with "
            f"torch.jit.load(f).state_dict() first): {e}") from e


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Drop OpenAI's non-weight entries and a DistributedDataParallel ``module.`` prefix."""
    sd = {k: v for k, v in state_dict.items() if k not in OPENAI_EXTRA_KEYS}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state dict entries that are not tensors: {bad[:5]}")
    return sd


def _count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


def config_from_state_dict(state_dict: Mapping[str, Any], quick_gelu: bool = True) -> CLIPConfig:
    """Infer the architecture from the weights' names and shapes (as OpenAI's ``build_model``).

    Heads follow OpenAI's 64-channels-per-head convention; ``quick_gelu`` cannot be seen in the
    weights and is taken from the argument.
    """
    sd = clean_state_dict(state_dict)
    required = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"config_from_state_dict: not a CLIP state dict, missing {missing}")

    if "visual.proj" in sd:  # Vision Transformer
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        mlp_width = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        vision = VisionConfig(image_size=patch * grid, layers=_count_blocks(sd, "visual.transformer.resblocks."),
                              width=width, patch_size=patch, mlp_ratio=mlp_width / width)
    elif "visual.attnpool.positional_embedding" in sd:  # modified ResNet
        layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(image_size=grid * 32, layers=layers, width=width, patch_size=None)
    else:
        raise ValueError("config_from_state_dict: found neither visual.proj (ViT) nor visual.attnpool.* (ResNet)")

    text_width = sd["ln_final.weight"].shape[0]
    text = TextConfig(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=text_width,
        layers=_count_blocks(sd, "transformer.resblocks."),
        mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
    )
    return CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text, quick_gelu=quick_gelu)
