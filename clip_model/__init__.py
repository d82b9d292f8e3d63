"""clip_model: a small, readable CLIP (model, configs, checkpoints, tokenizer, loss, transforms,
zero-shot evaluation). Usable on its own, without the pipeline.

Names are imported lazily on first use, so ``import clip_model`` stays cheap and one submodule's
heavy dependencies are only paid for when it is used.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    # config.py
    "VisionConfig": "config", "TextConfig": "config", "CLIPConfig": "config",
    "load_config": "config", "list_configs": "config",
    # model.py
    "CLIP": "model", "build_model": "model",
    # checkpoint.py
    "save_model": "checkpoint", "load_model": "checkpoint", "read_weights": "checkpoint",
    "config_from_state_dict": "checkpoint",
    # tokenizer.py
    "ClipTokenizer": "tokenizer",
    # loss.py
    "ClipLoss": "loss",
    # transforms.py
    "image_transform": "transforms", "OPENAI_DATASET_MEAN": "transforms", "OPENAI_DATASET_STD": "transforms",
    # zeroshot.py
    "zeroshot_classifier": "zeroshot", "accuracy": "zeroshot", "retrieval_metrics": "zeroshot",
    # templates.py
    "get_templates": "templates", "IMAGENET_TEMPLATES": "templates", "CIFAR_TEMPLATES": "templates",
    "SIMPLE_TEMPLATES": "templates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clip_model' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
