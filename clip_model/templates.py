"""Prompt templates and class names for zero-shot classification.

Templates are strings with a ``{}`` placeholder for the class name (see `fill_template`).

- `IMAGENET_TEMPLATES`: the 80 templates of OpenAI's ImageNet prompt-engineering notebook.
- `CIFAR_TEMPLATES`: the 18 templates the CLIP paper used for CIFAR-10 and CIFAR-100.
- `SIMPLE_TEMPLATES`: a few generic ones, for datasets without their own.
- `IMAGENET_CLASSNAMES`: OpenAI's cleaned ImageNet-1k names in class-index order
  (``data/imagenet_classnames.txt``). OpenAI's list repeats two names; here index 744 ("projectile,
  missile" in WordNet) is "projectile" (657 stays "missile") and index 836 ("sunglass") is
  "sunglass" (837 stays "sunglasses"), so that all 1000 names are distinct.
- `CIFAR10_CLASSNAMES`, `CIFAR100_CLASSNAMES`: in label order, with spaces instead of underscores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

Template = str | Callable[[str], str]

_DATA = Path(__file__).parent / "data"

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

CIFAR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

SIMPLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
)

CIFAR10_CLASSNAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

CIFAR100_CLASSNAMES: tuple[str, ...] = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
)


def _read_lines(name: str) -> tuple[str, ...]:
    lines = (_DATA / name).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


IMAGENET_CLASSNAMES: tuple[str, ...] = _read_lines("imagenet_classnames.txt")

_TEMPLATE_SETS = {
    "imagenet": IMAGENET_TEMPLATES,
    "cifar": CIFAR_TEMPLATES,
    "cifar10": CIFAR_TEMPLATES,
    "cifar100": CIFAR_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
}

_CLASSNAME_SETS = {
    "imagenet": IMAGENET_CLASSNAMES,
    "cifar10": CIFAR10_CLASSNAMES,
    "cifar100": CIFAR100_CLASSNAMES,
}


def get_templates(name: str) -> list[str]:
    """Templates by name: "imagenet" (80), "cifar" / "cifar10" / "cifar100" (18), "simple"."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in _TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; choose one of {sorted(_TEMPLATE_SETS)}")
    return list(_TEMPLATE_SETS[key])


def get_classnames(name: str) -> list[str]:
    """Class names by dataset: "imagenet" (1000), "cifar10", "cifar100"."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in _CLASSNAME_SETS:
        raise ValueError(f"unknown class-name set {name!r}; choose one of {sorted(_CLASSNAME_SETS)}")
    return list(_CLASSNAME_SETS[key])


def fill_template(template: Template, classname: str) -> str:
    """``"a photo of a {}."`` -> ``"a photo of a dog."``; callables are called with the class name."""
    if callable(template):
        return template(classname)
    if "{}" in template:
        return template.replace("{}", classname)
    if "{c}" in template:
        return template.replace("{c}", classname)
    raise ValueError(f"prompt template {template!r}: needs a '{{}}' placeholder for the class name")
