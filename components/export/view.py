"""What the export stage shows when it ends: the parity check and the registered model (KFP Markdown,
MLflow description) and its key figures (the console's end line)."""

from __future__ import annotations

from typing import Any

from components.common.publish import human_bytes, markdown_table, publish
from components.export.registry import promotion_text
from components.export.stage import PARITY_CHECKS

LABELS = {"image": "image encoder, batch", "image_batch1": "image encoder, batch of 1", "text": "text encoder",
          "image_pipeline": "images: numpy preprocessing + onnxruntime", "text_pipeline": "texts: tokenizer + onnxruntime"}
CHECKS = tuple((name, LABELS[name]) for name in PARITY_CHECKS)


def headline(result: dict) -> str:
    parity = result["parity"]
    worst = max(parity[name]["max_abs"] for name, _ in CHECKS)
    cosine = min(parity[name]["min_cosine"] for name, _ in CHECKS)
    promotion = result.get("promotion") or {}
    registered = (f"{result['registered_model_name']} v{result['registered_model_version']}"
                  + (f" @{promotion['alias']}" if promotion else "") if result.get("registered_model_version") else "")
    return (f"ONNX parity max |diff| {worst:.1e}, min cosine {cosine:.6f}; "
            f"{human_bytes(sum(result['bytes'].values()))}; " + (f"registered {registered}" if registered
                                                                   else "not registered"))


def markdown(result: dict) -> str:
    parity = result["parity"]
    limits = parity.get("thresholds") or {}
    lines = ["# Export", "", f"- bundle: `{result['bundle_uri']}`",
             f"- parity on {parity.get('num_images')} images and {parity.get('num_texts')} texts: "
             + ("passed" if parity.get("passed", True) else "FAILED")
             + f" (limits: max |diff| {limits.get('max_abs')}, min cosine {limits.get('min_cosine')})", "",
             "## PyTorch against onnxruntime", ""]
    lines += markdown_table(["check", "max abs diff", "min cosine"],
                            [[label, f"{parity[name]['max_abs']:.2e}", f"{parity[name]['min_cosine']:.7f}"]
                             for name, label in CHECKS])
    lines += ["", "## Registered model", "",
              "One MLflow pyfunc: both ONNX encoders, the tokenizer and the preprocessing; input `image` (encoded "
              "bytes) and/or `text`, output L2-normalised embeddings.", ""]
    name, version = result.get("registered_model_name"), result.get("registered_model_version")
    promotion = result.get("promotion")
    alias = promotion["alias"] if promotion else version
    lines += markdown_table(["registered model", "version", "model URI", "serve"],
                            [[name or "-", version or "-", f"`{result['model_uri']}`",
                              f"`mlflow models serve -m models:/{name}{'@' if promotion else '/'}{alias}`"
                              if version else "-"]])
    if promotion:
        lines += ["", "## Promotion", "", promotion_text(promotion), ""]
        lines += markdown_table(["", promotion["metric"], "version"],
                                [["this version", _figure(promotion["value"]), version],
                                 ["champion before", _figure(promotion["champion_value"]),
                                  promotion["champion_version"] or "-"],
                                 ["min Δ to take champion", f"{promotion['min_delta']:+.4f}", ""]])
    lines += ["", "## Bundle files", ""]
    lines += markdown_table(["file", "bytes"], [[f, human_bytes(n)] for f, n in result["bytes"].items()])
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def show(artifact: Any, result: dict, tracking: Any = None) -> dict:
    """Publish the finished export stage; returns `result` unchanged."""
    publish("export", artifact, markdown(result), headline(result), tracking, result.get("run_id"))
    return result
