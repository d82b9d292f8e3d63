"""The registered CLIP: one MLflow pyfunc model holding both ONNX encoders, the tokenizer and the
preprocessing (the export bundle), so `mlflow models serve -m models:/<name>/<version>` serves a whole CLIP.

Input: a table with an ``image`` column (encoded image bytes: PNG, JPEG, ...; base64 in JSON requests) and a
``text`` column (a caption or prompt); either may be missing or null per row (in a served JSON request an
image cannot be null, MLflow's parser refuses it: leave the column out for texts only). Output: one row per input row
with ``image_embedding`` and ``text_embedding`` (L2-normalised float lists, null where that input was
absent); their dot product is the cosine similarity CLIP ranks by. A served request::

    curl -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_records": [{"image": "<base64 PNG>", "text": "a photo of a red circle"}]}'
    -> {"predictions": [{"image_embedding": [...], "text_embedding": [...]}]}

The model runs on onnxruntime, numpy, Pillow, `tokenizers` and `ftfy` (`components.inference.onnx_clip.OnnxClip`); the
project's torch-free code travels with the model (`code_paths`), so loading it needs neither torch nor an
installed clipflow.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

BUNDLE_ARTIFACT = "bundle"  # the artifact (a folder: the export bundle) the model loads
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_PACKAGES = ("clip_model", "components")  # copied into the model (code_paths): serving imports them


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return len(value) > 0 if isinstance(value, (bytes, bytearray, str)) else True


class ClipModel(mlflow.pyfunc.PythonModel):
    """CLIP embeddings of images and/or texts from the export bundle's ONNX encoders."""

    def load_context(self, context) -> None:
        from components.inference.onnx_clip import OnnxClip

        self.clip = OnnxClip(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context, model_input, params=None):
        import pandas as pd
        from PIL import Image

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        n = len(frame)
        images = list(frame["image"]) if "image" in frame else [None] * n
        texts = list(frame["text"]) if "text" in frame else [None] * n
        image_rows = [i for i, v in enumerate(images) if _present(v)]
        text_rows = [i for i, v in enumerate(texts) if _present(v)]
        decoded = []
        for i in image_rows:
            try:
                with Image.open(io.BytesIO(bytes(images[i]))) as im:
                    im.load()
                    decoded.append(im.copy())
            except (OSError, Image.DecompressionBombError) as e:
                raise ValueError(f"row {i}: 'image' is not a readable image ({type(e).__name__}: {e})") from e
        image_out: list = [None] * n
        text_out: list = [None] * n
        if image_rows:
            for i, emb in zip(image_rows, self.clip.encode_images(decoded)):
                image_out[i] = emb.astype(float).tolist()
        if text_rows:
            for i, emb in zip(text_rows, self.clip.encode_texts([str(texts[i]) for i in text_rows])):
                text_out[i] = emb.astype(float).tolist()
        return pd.DataFrame({"image_embedding": image_out, "text_embedding": text_out})


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image", required=False),
                       ColSpec(DataType.string, "text", required=False)]),
        outputs=Schema([ColSpec(Array(DataType.double), "image_embedding", required=False),
                        ColSpec(Array(DataType.double), "text_embedding", required=False)]))


def input_example(bundle: Path):
    """One row with an image and a caption, one with an image only. Every row has an image: MLflow's
    serving parser decodes a `binary` column from base64 row by row and fails on a null one (`bytes(None,
    "utf8")`: TypeError 'encoding without a string argument'), so a served request that has no image
    leaves the `image` column out; a null caption is fine."""
    import json

    import pandas as pd
    from PIL import Image

    size = int(json.loads((bundle / "preprocess.json").read_text())["image_size"])
    img = Image.new("RGB", (size, size), (250, 250, 250))
    img.paste((220, 30, 30), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue(), buf.getvalue()], "text": ["a photo of a red square", None]})


def log_clip_model(bundle: Path, registered_model_name: str | None, requirements: list[str]):
    """Log the bundle as the pyfunc `clip` of the active run (and register it); returns the ModelInfo."""
    with tempfile.TemporaryDirectory(prefix="clip-code-") as tmp:
        code = []
        for package in SHIPPED_PACKAGES:
            shutil.copytree(PROJECT_ROOT / package, Path(tmp) / package,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            code.append(str(Path(tmp) / package))
        return mlflow.pyfunc.log_model(name="clip", python_model=ClipModel(), artifacts={BUNDLE_ARTIFACT: str(bundle)},
                                       code_paths=code, signature=signature(), input_example=input_example(bundle),
                                       pip_requirements=requirements, registered_model_name=registered_model_name)
