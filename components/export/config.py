"""The export stage's settings."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PARITY_TEXTS = (
    "a photo of a red circle on a white background",
    "two small blue squares in the top left corner",
    "a picture of a dog playing in the snow",
    "an image showing three green triangles on the right",
    "Ein Foto von einer Katze.",  # non-English and mixed case still tokenize
    "a very long caption " + "that keeps going " * 30,  # longer than the context: truncated
)


@dataclass
class ExportConfig:
    opset: int = 17  # ONNX opset (>= 17 for LayerNormalization)
    registered_model_name: str = "clip"  # MLflow registry name of the CLIP (one pyfunc: both encoders, tokenizer, preprocessing)
    register: bool = True  # register the model in the MLflow model registry
    promotion_metric: str = "mean/zeroshot_top1"  # the evaluate run's metric (higher is better) that gates alias `champion`
    promotion_min_delta: float = 0.0  # a new version takes `champion` when its promotion_metric >= the champion's + this
    parity_max_abs: float | None = 1e-4  # max |PyTorch - ONNX| on L2-normalised embeddings; None = not checked
    parity_min_cosine: float = 0.9999  # min cosine between PyTorch and ONNX embeddings
    parity_images_uri: str | None = None  # folder of images for the parity check; None = synthetic scenes
    parity_num_images: int = 8  # images in the parity check (>= 2: a batch > 1 is checked)
    parity_texts: tuple[str, ...] = DEFAULT_PARITY_TEXTS  # captions in the parity check
    num_threads: int | None = None  # torch intra-op threads; None = torch's default

    def __post_init__(self) -> None:
        self.parity_texts = tuple(self.parity_texts)
        if self.opset < 17:
            raise ValueError(f"opset={self.opset}: the bundle needs opset >= 17 (LayerNormalization)")
        if self.parity_num_images < 2:
            raise ValueError(f"parity_num_images={self.parity_num_images}: need >= 2 (checks a batch > 1)")
