"""Evaluation stage: a suite of datasets in one stage, the way the CLIP paper reports a model.

``evaluate(model_uri, manifest_uri, output_uri, cfg, tracking) -> report``
(the report dict written to report.json; its "metrics" entry is the flat metrics dict)

- ``cfg.eval_suite`` names the datasets (`components.evaluate.suite`): "" = none, "synthetic" = the built-in
  synthetic suite (generated under ``<output_uri>/data``), a suite file, or one dataset's URI. Every dataset
  is opened and checked before any image is encoded (`components.evaluate.plan`);
- each dataset's images are encoded once (`components.evaluate.encode`) for all its tasks: zero-shot top-1/
  top-5 with a prompt ensemble, a linear probe at 1, 2, 4, 8, 16 shots and full (and where zero-shot meets
  that curve), retrieval recall@K for caption sets;
- the manifest's validation split is the dataset "validation": retrieval on its image-caption pairs;
- datasets tagged ``shift_of: <reference>`` get the robustness report (`components.evaluate.robustness`):
  zero-shot against a linear probe fitted on the reference, on the reference and on every shifted set.

Outputs: ``<output_uri>/report.json``, PNGs under ``<output_uri>/plots/``, and an MLflow run "evaluate" with
the same metrics (`components.evaluate.metrics`), figures, report, the Markdown report and the results as
MLflow tables. ``report.to_kfp_artifacts`` / ``report.markdown_report`` feed the KFP component's artifacts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from clip_model.checkpoint import load_model
from components.common import config, storage
from components.common import tracking as mltrack
from components.common.dataset import load_manifest, load_tokenizer
from components.common.inputs import log_eval_sets
from components.common.tracking import TrackingConfig
from components.evaluate.config import EvalConfig
from components.evaluate.datasets import manifest_set
from components.evaluate.encode import Encoded, encode_set, encode_texts
from components.evaluate.metrics import flat_metrics
from components.evaluate.plan import Planned, plan_suite
from components.evaluate.probe import FittedProbe, ProbeConfig, linear_probe
from components.evaluate.report import log_outputs
from components.evaluate.robustness import Scored, robustness
from components.evaluate.suite import DatasetSpec, generate_synthetic, load_suite
from components.evaluate.tasks import caption_retrieval, shots_matching_zero_shot, zero_shot

VALIDATION = "validation"  # the manifest's validation split, as a dataset of the report


# --------------------------------------------------------------------------- inputs

def _model_file(model_uri: str) -> str:
    return model_uri if model_uri.endswith((".pt", ".pth", ".bin")) else storage.join(model_uri, "model.pt")


def load_eval_model(model_uri: str, device: str = "cpu"):
    uri = _model_file(model_uri)
    with storage.local_copy(uri) as path:
        return load_model(path, map_location=device)


def _tokenizer_uri(cfg: EvalConfig, manifest: dict | None, model_uri: str) -> str:
    if cfg.tokenizer_uri:
        return cfg.tokenizer_uri
    if manifest and manifest.get("tokenizer"):
        return manifest["tokenizer"]
    sibling = storage.join(os.path.dirname(_model_file(model_uri)) if not storage.is_s3(model_uri)
                           else _model_file(model_uri).rsplit("/", 1)[0], "tokenizer.json")
    if storage.exists(sibling):
        return sibling
    raise ValueError(f"evaluate: no tokenizer: give cfg.tokenizer_uri or a manifest (none beside {model_uri})")


# --------------------------------------------------------------------------- one dataset, every task

@dataclass
class Outcome:
    """What the suite's evaluation produced: the report entries and what the figures need."""

    datasets: dict[str, dict] = field(default_factory=dict)
    robustness: dict[str, dict] = field(default_factory=dict)
    examples: dict | None = None  # the retrieval-examples figure's input (the validation split)


def _examples(enc: Encoded, texts: list[str], owner: np.ndarray, txt: torch.Tensor, cfg: EvalConfig) -> dict:
    n_q = min(cfg.retrieval_examples, len(texts))
    queries = np.linspace(0, len(texts) - 1, n_q).round().astype(int).tolist() if n_q else []
    k = min(cfg.retrieval_top_k, len(enc))
    ranked = (txt[queries] @ enc.features.T).topk(k, dim=1).indices.tolist() if queries else []
    return {"captions": [texts[q] for q in queries], "ranked": ranked, "targets": [int(owner[q]) for q in queries],
            "thumbnails": enc.thumbnails or []}


def evaluate_dataset(model, tokenizer, p: Planned, cfg: EvalConfig) -> tuple[dict, Encoded, dict]:
    """Encode `p`'s images once and run each of its tasks on those features. Returns (the report entry,
    the features, {"zeroshot_pred", "probe", "examples"} for the robustness report and the figures)."""
    keep_thumbs = p.name == VALIDATION and cfg.retrieval_examples > 0
    enc = encode_set(model, p.data, cfg.eval_batch_size, cfg.device, label=f"evaluate/{p.name}", thumbnails=keep_thumbs)
    names = p.data.classnames
    entry: dict[str, Any] = {"source": p.source, "location": p.data.location, "kind": p.data.kind,
                             "tasks": list(p.tasks), "n": len(enc), "num_classes": len(names) if names else None,
                             "shift_of": p.spec.shift_of or None, "bad_records": p.data.bad_count, "bad": p.data.bad}
    extra: dict[str, Any] = {"zeroshot_pred": None, "probe": None, "examples": None}
    if "zeroshot" in p.tasks:
        entry["zeroshot"], extra["zeroshot_pred"] = zero_shot(model, tokenizer, enc.features, enc.labels, names,
                                                              p.templates, cfg.device)
        entry["templates_from"] = p.templates_from
    if "linear_probe" in p.tasks:
        summary, extra["probe"] = linear_probe(enc.features.numpy(), enc.labels, ProbeConfig(
            shots=cfg.probe_shots, test_fraction=cfg.probe_test_fraction, c_grid=cfg.probe_c_grid, seed=cfg.seed))
        entry["linear_probe"] = {**summary, "chance": 1.0 / len(names)}
        if "zeroshot" in entry:
            entry["few_shot"] = shots_matching_zero_shot(summary["settings"], entry["zeroshot"]["top1"], len(names))
    if "retrieval" in p.tasks:
        texts = [c for caps in enc.captions for c in caps]
        owner = np.repeat(np.arange(len(enc)), [len(caps) for caps in enc.captions])
        txt = encode_texts(model, tokenizer, texts, cfg.eval_batch_size, cfg.device)
        entry["retrieval"] = {**caption_retrieval(enc.features, txt, owner), "n": len(enc), "captions": len(texts)}
        if keep_thumbs:
            extra["examples"] = _examples(enc, texts, owner, txt, cfg)
    return entry, enc, extra


def evaluate_planned(model, tokenizer, planned: list[Planned], cfg: EvalConfig) -> Outcome:
    """Every planned dataset (each encoded once), then the robustness report of each reference that has
    shifted sets."""
    out = Outcome()
    scored: dict[str, Scored] = {}
    probes: dict[str, FittedProbe | None] = {}
    for p in planned:
        entry, enc, extra = evaluate_dataset(model, tokenizer, p, cfg)
        out.datasets[p.name] = entry
        out.examples = extra["examples"] or out.examples
        if extra["zeroshot_pred"] is not None:
            scored[p.name] = Scored(p.name, p.data.classnames, enc.labels, enc.features.numpy(), extra["zeroshot_pred"])
        probes[p.name] = extra["probe"]
    for p in planned:
        shifts = [q.name for q in planned if q.spec.shift_of == p.name]
        if shifts:
            out.robustness[p.name] = robustness(scored[p.name], [scored[s] for s in shifts], probes[p.name])
    return out


# --------------------------------------------------------------------------- the stage

def plan(cfg: EvalConfig, manifest: dict | None, manifest_uri: str | None, output_uri: str,
         report: dict) -> list[Planned]:
    """The suite's datasets (synthetic ones generated) and the manifest's validation split, checked; what
    is not evaluated goes into ``report["skipped"]``."""
    suite = load_suite(cfg.eval_suite)
    planned: list[Planned] = []
    if suite is None:
        report["suite"] = {"name": "", "source": "none: eval_suite is empty", "datasets": []}
        report["skipped"]["suite"] = "eval_suite is empty: no zero-shot and no linear probe"
    else:
        suite, described = generate_synthetic(suite, storage.join(output_uri, "data"), cfg.synthetic_per_class)
        planned = plan_suite(suite, cfg, described, report["skipped"])
        report["suite"] = {"name": suite.name, "source": suite.source, "description": suite.description,
                           "datasets": [config.to_dict(d) for d in suite.datasets]}
    if manifest is not None:
        data = manifest_set(manifest, manifest_uri or "", cfg.retrieval_max_samples)
        planned.append(Planned(DatasetSpec(VALIDATION, manifest_uri or "-", tasks=("retrieval",)), data, ("retrieval",),
                               None, "", f"the dataset's validation split ({manifest_uri})"))
    else:
        report["skipped"][f"{VALIDATION}/retrieval"] = "no dataset manifest"
    if not planned:
        raise ValueError("evaluate: nothing to evaluate: give a manifest (retrieval) and/or an eval_suite")
    return planned


def evaluate(model_uri: str, manifest_uri: str | None, output_uri: str, cfg: EvalConfig,
             tracking: TrackingConfig | None = None) -> dict[str, Any]:
    """Run the suite and the validation-split retrieval; write ``<output_uri>/report.json`` and log an MLflow
    run. Returns the report: "metrics" (flat), "suite", "datasets" ({name: entry}), "robustness"
    ({reference: table}), "skipped" ({what: why}), "report_uri", "mlflow_run_id", ... (docs/interfaces.md)."""
    tcfg = tracking or TrackingConfig()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    start = time.perf_counter()
    manifest = load_manifest(manifest_uri) if manifest_uri else None
    model = load_eval_model(model_uri, cfg.device)
    tokenizer = load_tokenizer(_tokenizer_uri(cfg, manifest, model_uri), model.vocab_size)
    report: dict[str, Any] = {"model_uri": model_uri, "manifest_uri": manifest_uri, "config": config.to_dict(cfg),
                              "dataset_content_hash": (manifest or {}).get("content_hash", ""), "skipped": {},
                              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with mltrack.stage_run("evaluate", tcfg, params=cfg, tags={"dataset_content_hash": report["dataset_content_hash"],
                                                               "model_uri": model_uri}) as run:
        planned = plan(cfg, manifest, manifest_uri, output_uri, report)
        log_eval_sets(planned, manifest)  # each dataset as the run's MLflow dataset input
        outcome = evaluate_planned(model, tokenizer, planned, cfg)
        report.update(datasets=outcome.datasets, robustness=outcome.robustness)
        report["metrics"] = flat_metrics(report)
        report["mlflow_run_id"] = run.info.run_id
        report["seconds"] = round(time.perf_counter() - start, 2)
        report["report_uri"] = storage.join(output_uri, "report.json")
        log_outputs(report, outcome.examples, output_uri)
        storage.write_json(report["report_uri"], report)
        mltrack.log_json(report, "report.json")
    skipped = "; ".join(f"{k} skipped ({v})" for k, v in report["skipped"].items())
    print(f"[evaluate] suite {report['suite']['name'] or '-'}: {len(outcome.datasets)} datasets in "
          f"{report['seconds']:.1f} s  " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(report["metrics"].items())
                                                    if k.startswith("mean/"))
          + (f"  [{skipped}]" if skipped else ""), flush=True)
    return report
