"""What the export stage shows when it ends: the parity check and the registered models (KFP Markdown,
MLflow description) and its key figures (the console's end line)."""

from __future__ import annotations

from typing import Any

from components.common.publish import human_bytes, markdown_table, publish

CHECKS = (("image", "image encoder, batch"), ("image_batch1", "image encoder, batch of 1"),
          ("text", "text encoder"), ("image_pipeline", "images: numpy preprocessing + onnxruntime"),
          ("text_pipeline", "texts: tokenizer + onnxruntime"))


def headline(result: dict) -> str:
    parity = result["parity"]
    worst = max(parity[name]["max_abs"] for name, _ in CHECKS)
    cosine = min(parity[name]["min_cosine"] for name, _ in CHECKS)
    registered = ", ".join(f"{m['registered_model_name']} v{m['version']}" for m in result["models"].values()
                           if m.get("version"))
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
    lines += ["", "## Registered models", ""]
    lines += markdown_table(["encoder", "registered model", "version", "model URI"],
                            [[encoder, m.get("registered_model_name") or "-", m.get("version") or "-",
                              f"`{m['model_uri']}`"] for encoder, m in result["models"].items()])
    lines += ["", "## Bundle files", ""]
    lines += markdown_table(["file", "bytes"], [[f, human_bytes(n)] for f, n in result["bytes"].items()])
    return "\n".join(lines)


def show(artifact: Any, result: dict, tracking: Any = None) -> dict:
    """Publish the finished export stage; returns `result` unchanged."""
    publish("export", artifact, markdown(result), headline(result), tracking, result.get("run_id"))
    return result
