"""Run the whole pipeline on this machine (the embedded default): `python -m pipelines.local`.

The same DAG as on the cluster, executed by `kfp.local`'s SubprocessRunner on this interpreter, with
a local Ray (started by the stages), a local MLflow store and a local directory as the object store.
Nothing outside this machine is needed; everything lands under `--workdir` (default `.demo/`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.tracking import TrackingConfig

@dataclass
class LocalRunConfig:
    workdir: str = ".demo"
    source_uri: str = "synthetic"        # or a folder / table / webdataset tars, local or s3://
    synthetic_samples: int = 600
    filter_preset: str = "datacomp_basic"
    samples_per_shard: int = 128
    vocab_size: int = 4096
    model_config: str = "tiny"
    train_steps: int = 300
    batch_size: int = 32                 # per worker
    learning_rate: float = 1e-3
    num_workers: int = 2
    eval_data_uri: str = "synthetic"
    synthetic_eval_per_class: int = 20
    experiment: str = "clip-pretraining"
    registered_model_name: str = "clip-local"
    tracking_uri: str = ""               # default: sqlite store in the workdir

    def pipeline_arguments(self, data_root: str, tracking_uri: str) -> dict[str, Any]:
        return dict(source_uri=self.source_uri, synthetic_samples=self.synthetic_samples, data_root=data_root,
                    s3_endpoint=os.environ.get("AWS_ENDPOINT_URL", ""), filter_preset=self.filter_preset,
                    samples_per_shard=self.samples_per_shard, vocab_size=self.vocab_size,
                    model_config=self.model_config, train_steps=self.train_steps, batch_size=self.batch_size,
                    learning_rate=self.learning_rate, num_workers=self.num_workers, gpus_per_worker=0,
                    launcher="local", eval_data_uri=self.eval_data_uri,
                    synthetic_eval_per_class=self.synthetic_eval_per_class, mlflow_tracking_uri=tracking_uri,
                    mlflow_experiment=self.experiment, registered_model_name=self.registered_model_name)


def prepare_tracking(workdir: Path, experiment: str, tracking_uri: str = "") -> str:
    """A local MLflow store in the workdir (artifacts beside it), unless a tracking URI is given."""
    uri = tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    TrackingConfig(uri, experiment).apply()
    return uri


def run_local(cfg: LocalRunConfig) -> dict[str, Any]:
    """Run the DAG through kfp.local; returns the parent MLflow run's id, tags and the stage runs."""
    from kfp import local

    from pipelines.clip_pipeline import clip_pipeline

    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = prepare_tracking(workdir, cfg.experiment, cfg.tracking_uri)
    data_root = os.environ.get("CLIPFLOW_DATA_ROOT", str(workdir / "data"))
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"))
    started = time.time()
    clip_pipeline(**cfg.pipeline_arguments(data_root, tracking_uri))
    return summarize(tracking_uri, cfg.experiment, started)


def summarize(tracking_uri: str, experiment: str, since: float) -> dict[str, Any]:
    """The newest pipeline run in the experiment with its stage runs (for the printout and tests)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    parents = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.stage = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not parents or parents[0].info.start_time < since * 1000 - 5000:
        raise RuntimeError(f"no pipeline run found in MLflow experiment {experiment!r} at {tracking_uri}")
    parent = parents[0]
    children = mlflow.search_runs(experiment_names=[experiment],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  output_format="list")
    return {"tracking_uri": tracking_uri, "experiment": experiment, "parent_run_id": parent.info.run_id,
            "status": parent.info.status, "tags": dict(parent.data.tags),
            "stages": {run.data.tags.get("stage", run.info.run_name): run for run in children}}


def print_summary(summary: dict[str, Any], seconds: float) -> None:
    tags, stages = summary["tags"], summary["stages"]
    evaluate = stages.get("evaluate")
    print("\n" + "=" * 78)
    print(f"Pipeline finished in {seconds / 60:.1f} min  (parent MLflow run {summary['parent_run_id']}, "
          f"status {summary['status']})")
    print(f"  stages          : {', '.join(sorted(stages))}")
    print(f"  dataset         : {tags.get('lineage.manifest_uri')}  (hash {tags.get('lineage.dataset_content_hash', '')[:12]})")
    print(f"  training run    : {tags.get('lineage.training_run_id')}  model {tags.get('lineage.model_uri')}")
    if evaluate is not None:
        shown = {k: v for k, v in evaluate.data.metrics.items() if "top1" in k or "R_at_1" in k}
        print("  evaluation      : " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(shown.items())))
    print(f"  exported model  : {tags.get('lineage.export_uri')}  registered {tags.get('lineage.registered_model')}")
    print(f"  try the model   : {Path(sys.executable).parent / 'clip-zeroshot'} --bundle {tags.get('lineage.export_uri')} "
          "--classes red,green,blue,yellow,purple,orange --templates synthetic IMAGE...")
    print(f"  MLflow UI       : {sys.executable} -m mlflow ui --backend-store-uri {summary['tracking_uri']} --port 5000")
    print("=" * 78)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(LocalRunConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    cfg = LocalRunConfig(**vars(parser.parse_args(argv)))
    started = time.time()
    summary = run_local(cfg)
    print_summary(summary, time.time() - started)
    if summary["status"] != "FINISHED":
        sys.exit(1)


if __name__ == "__main__":
    main()
