"""What the train stage shows when it ends: the training curves (loss, learning rate, logit scale,
throughput; KFP Markdown and a PNG in the MLflow run), a summary table and its key figures (the console's
end line)."""

from __future__ import annotations

from typing import Any

from components.common.publish import Figure, markdown_table, png_bytes, publish

CURVES = (("train/loss", "contrastive loss (rank 0)"), ("train/lr", "learning rate"),
          ("train/logit_scale", "logit scale (exp)"), ("train/samples_per_s", "samples/s"))


def metric_by_step(client: Any, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric of the run (a step logged twice after a restart: the latest value)."""
    by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key),
                                               key=lambda m: (m.step, m.timestamp))}
    return list(by_step), list(by_step.values())


def curves(run_id: str) -> dict[str, tuple[list[int], list[float]]]:
    """The run's training metrics by step (`metric_by_step` of each of `CURVES`)."""
    import mlflow

    client = mlflow.MlflowClient()
    return {key: metric_by_step(client, run_id, key) for key, _ in CURVES}


def curves_figure(history: dict[str, tuple[list[int], list[float]]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 5.5), sharex=True)
    for ax, (key, label) in zip(axes.flat, CURVES):
        steps, values = history.get(key, ([], []))
        ax.plot(steps, values, marker="." if len(steps) < 60 else None, lw=1.2)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "train/lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle("CLIP training")
    fig.tight_layout()
    return fig


def _number(result: dict, key: str, fmt: str) -> str:
    return format(result[key], fmt) if isinstance(result.get(key), (int, float)) else "-"


def headline(result: dict) -> str:
    resumed = f", resumed at step {result['resumed_from_step']}" if result.get("resumed_from_step") else ""
    return (f"{result.get('steps', '-')} steps, final loss {_number(result, 'final_loss', '.3f')}, "
            f"{_number(result, 'samples_per_s', '.1f')} samples/s{resumed}")


def markdown(result: dict) -> str:
    rows = [["optimizer steps", result.get("steps", "-")], ["final loss (rank 0)", _number(result, "final_loss", ".4f")],
            ["throughput (samples/s, steady state)", _number(result, "samples_per_s", ".1f")],
            ["samples seen", result.get("samples_seen", "-")], ["wall time (s)", _number(result, "wall_s", ".0f")],
            ["resumed from step", result.get("resumed_from_step", 0)]]
    if result.get("metrics_dropped"):  # the tracking server was down longer than the queue could hold
        rows.append(["training metrics that never reached MLflow", result["metrics_dropped"]])
    lines = ["# Train", "", f"- model: `{result['model_uri']}`", f"- last checkpoint: `{result.get('checkpoint_uri')}`",
             f"- dataset: `{result.get('manifest_uri')}`", ""]
    if result.get("lineage.init_checkpoint"):
        lines.insert(3, f"- started from: `{result['lineage.init_checkpoint']}`")
    return "\n".join(lines + markdown_table(["quantity", "value"], rows))


def show(artifact: Any, pointer: dict, tracking: Any = None) -> dict:
    """Publish the finished train stage (the curves read back from its MLflow run); returns `pointer`."""
    from mlflow.exceptions import MlflowException

    figures = []
    if tracking is not None:
        tracking.apply()
        try:
            figures = [Figure("Training curves", "plots/training_curves.png",
                              png_bytes(curves_figure(curves(pointer["run_id"]))))]
        except MlflowException as exc:  # the run is not in this tracking store: no curves to draw
            print(f"[train] no training curves: {exc}", flush=True)
    publish("train", artifact, markdown(pointer), headline(pointer), tracking, pointer.get("run_id"), figures)
    return pointer
