"""`clipflow`: the platform's command line.

    clipflow run [--steps 1000 ...]           the whole pipeline on this machine (what `make demo` runs)
    clipflow submit --host URL [--set k=v]    the pipeline on a KFP cluster
    clipflow compile [--check]                write pipelines/clip_pipeline.yaml
    clipflow screenshots [--workdir .demo]    PNGs of a finished run's MLflow pages (headless Chromium)
    clipflow filter SRC OUT [--preset NAME]   one stage on its own inputs (also shard, train, evaluate, export)
    clipflow zeroshot --bundle DIR ...        classify images with an exported ONNX bundle (no torch)
    clipflow zeroshot --model models:/clip@champion ...   the same with the registered model

Every option of a stage command is generated from the stage's config dataclass (its default and the
comment beside the field), and `--set KEY=VALUE` sets any field, nested ones by path (`optim.lr`) or
by their own name where unique. Only the command that runs is imported, so `clipflow zeroshot`
stays as light as the serving module it calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any


# --------------------------------------------------------------------------- options from configs

def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help with %


def _flag(path: str, unique: bool) -> str:
    return "--" + (path.rsplit(".", 1)[-1] if unique else path).replace("_", "-")


def add_config_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One `--option` per setting of `cls` (help = the field's comment and default), `--set`, `--config`."""
    from components.common.config import describe

    rows = [r for r in describe(cls) if r[0] not in skip]
    leaves = [r[0].rsplit(".", 1)[-1] for r in describe(cls)]
    group = parser.add_argument_group(f"settings ({cls.__name__}; each may also be given as --set KEY=VALUE)")
    for path, tp, default, doc in rows:
        unique = leaves.count(path.rsplit(".", 1)[-1]) == 1
        shown = json.dumps(default) if isinstance(default, list) else repr(default)
        group.add_argument(_flag(path, unique), dest=f"cfg:{path}", default=argparse.SUPPRESS, metavar=tp.upper(),
                           help=_escape(f"{doc} (default: {shown})"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any setting by its name or path, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--config", default="", metavar="JSON",
                        help="settings as a JSON object or a JSON file; the options above override it")


def build_config(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """The config from --config, then the generated options, then --set, then `fixed` (positionals)."""
    from components.common import config

    settings: dict[str, Any] = {}
    if args.config:
        settings.update(config.to_dict(config.from_json(cls, args.config)))
    settings.update({k[len("cfg:"):]: v for k, v in vars(args).items() if k.startswith("cfg:")})
    settings.update(config.parse_sets(args.set))
    settings.update(fixed)
    return config.from_dict(cls, settings)


def _tracking(parser: argparse.ArgumentParser, parent: bool = False) -> None:
    from components.common.platform import PIPELINE_NAME

    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                        "else a local store)")
    parser.add_argument("--experiment", default=PIPELINE_NAME, help="MLflow experiment")
    if parent:
        parser.add_argument("--parent-run-id", default=None, help="nest the run under this MLflow run")


def _tracking_config(args: argparse.Namespace):
    from components.common.tracking import TrackingConfig

    return TrackingConfig(args.tracking_uri, args.experiment, getattr(args, "parent_run_id", None))


def _parser(command: str) -> argparse.ArgumentParser:
    help_text, _ = COMMANDS[command]
    return argparse.ArgumentParser(prog=f"clipflow {command}", description=help_text)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------- the pipeline

def _pipeline_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    from pipelines.arguments import parameter_fields

    group = parser.add_argument_group("pipeline parameters (each may also be given as --set NAME=VALUE)")
    for p in parameter_fields():
        group.add_argument("--" + p.name.replace("_", "-"), dest=f"param:{p.name}", default=argparse.SUPPRESS,
                           metavar=type(p.default).__name__.upper(),
                           help=_escape(f"{p.doc} (default: {defaults.get(p.name, p.default)!r})"))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a pipeline parameter")


def _pipeline_arguments(args: argparse.Namespace) -> dict[str, Any]:
    from components.common.config import parse_sets
    from components.common.config import SETTINGS_SUFFIX
    from pipelines.arguments import typed_arguments, with_budget
    from pipelines.stage_settings import check_stage_settings

    values = {k[len("param:"):]: v for k, v in vars(args).items() if k.startswith("param:")}
    arguments = with_budget(typed_arguments({**values, **parse_sets(args.set)}))
    check_stage_settings({k: v for k, v in arguments.items() if k.endswith(SETTINGS_SUFFIX)})  # before any work
    return arguments


def cmd_run(argv: Sequence[str]) -> int:
    import contextlib
    import io
    import time

    from pipelines.run_console import RunConsole
    from pipelines.local import print_summary, run_local
    from pipelines.parameters import local_defaults

    parser = _parser("run")
    parser.add_argument("--workdir", default=".demo", help="where data, MLflow store, KFP outputs and logs/ go")
    parser.add_argument("--verbose", action="store_true", help="print everything (KFP, Ray, MLflow, the stages) "
                        "instead of one line per stage start and end; the log file gets it all either way")
    _pipeline_options(parser, {**local_defaults(), "data_root": "<workdir>/data, or CLIPFLOW_DATA_ROOT",
                               "s3_endpoint": "$AWS_ENDPOINT_URL", "mlflow_tracking_uri": "sqlite in the workdir"})
    args = parser.parse_args(argv)
    arguments = _pipeline_arguments(args)
    started = time.time()
    error, closing = None, io.StringIO()
    with RunConsole(args.workdir, verbose=args.verbose) as console:
        console.write(f"clipflow run: the pipeline on this machine; full log {console.log_path}")
        try:
            summary = run_local(args.workdir, **arguments)
            with contextlib.redirect_stdout(closing):  # MLflow's own messages stay in the log
                print_summary(summary, time.time() - started)
        except Exception as exc:  # the traceback is in the log; the console gets one message
            import traceback

            traceback.print_exc()
            error = exc
        except KeyboardInterrupt as exc:
            error = exc
    if error is not None:  # said once the console has drawn every stage's events
        print(console.failure(error), file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else 1
    *lines, rule = closing.getvalue().rstrip("\n").split("\n")  # the summary ends with a rule: the log above it
    print("\n".join([*lines, f"  full log        : {console.log_path}", rule]))
    return 0 if summary["status"] == "FINISHED" else 1


def cmd_submit(argv: Sequence[str]) -> int:
    from components.common.platform import PIPELINE_NAME
    from pipelines.submit import submit

    parser = _parser("submit")
    parser.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    parser.add_argument("--experiment", default=PIPELINE_NAME, help="KFP experiment")
    parser.add_argument("--run-name")
    parser.add_argument("--namespace", help="KFP profile namespace (multi-user installs)")
    parser.add_argument("--no-upload", action="store_true", help="run the package without uploading it")
    parser.add_argument("--wait", action="store_true", help="wait for the run to finish")
    _pipeline_options(parser, {})
    args = parser.parse_args(argv)
    submit(args.host, _pipeline_arguments(args), args.experiment, args.run_name, args.namespace,
           upload=not args.no_upload, wait=args.wait)
    return 0


def cmd_screenshots(argv: Sequence[str]) -> int:
    from components.common.platform import PIPELINE_NAME
    from pipelines.screenshots import take_screenshots

    parser = _parser("screenshots")
    parser.add_argument("--workdir", default=".demo", help="the `clipflow run` workdir: its mlflow.db; the PNGs go "
                        "to WORKDIR/screenshots/")
    parser.add_argument("--tracking-uri", default=None, help="another MLflow store (default: the workdir's)")
    parser.add_argument("--experiment", default=PIPELINE_NAME, help="MLflow experiment of the pipeline run")
    parser.add_argument("--port", type=int, default=None, help="port of `mlflow ui` (default: a free one)")
    args = parser.parse_args(argv)
    take_screenshots(args.workdir, args.tracking_uri, args.experiment, args.port)
    return 0


def cmd_compile(argv: Sequence[str]) -> int:
    from pipelines.compile import PACKAGE, compile_pipeline, is_stale

    parser = _parser("compile")
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed package is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = is_stale()
        print(f"{PACKAGE}: {'STALE - run clipflow compile' if stale else 'up to date'}")
        return 1 if stale else 0
    print(f"wrote {compile_pipeline()}")
    return 0


# --------------------------------------------------------------------------- the stages on their own

OUT = ("output_uri", "OUT")
MODEL = ("model_uri", "MODEL", "model.pt (or the train stage's output folder)")


def _stage_args(argv: Sequence[str], command: str, cls: type, positionals: Sequence[tuple[str, str, str]],
                options: Sequence[tuple[str, dict]] = (), tracking: str = "", skip: Sequence[str] = ()):
    """Parse a stage command: its positionals and options, MLflow options ("run" or "nested"), and one
    option per setting of the stage's config."""
    parser = _parser(command)
    for dest, metavar, text in positionals:
        parser.add_argument(dest, metavar=metavar, help=text)
    for flag, kwargs in options:
        parser.add_argument(flag, **kwargs)
    if tracking:
        _tracking(parser, parent=tracking == "nested")
    add_config_options(parser, cls, skip)
    return parser.parse_args(argv)


def cmd_filter(argv: Sequence[str]) -> int:
    from components.common.storage import StorageError
    from components.filter.config import FilterConfig
    from components.filter.sources import SourceConfigError
    from components.filter.stage import filter_pairs

    args = _stage_args(argv, "filter", FilterConfig, [
        ("source_uri", "SRC", "raw pairs: a folder, a table, webdataset tars or img2dataset output, local or "
                              "s3:// ('synthetic' = generate the bundled corpus)"),
        (*OUT, "writes OUT/kept/*.parquet, OUT/decisions/part-*.parquet (one row per record), OUT/stats.json, "
               "OUT/rejects/, OUT/stats.png")], skip=("source_uri",))
    cfg = build_config(FilterConfig, args, source_uri=args.source_uri)
    try:  # bad records are decisions, not errors: only a run that cannot proceed exits non-zero
        filter_pairs(args.output_uri, cfg)
    except (FileNotFoundError, SourceConfigError, StorageError) as e:
        print(f"clipflow filter: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_shard(argv: Sequence[str]) -> int:
    from components.shard.config import ShardConfig
    from components.shard.stage import shard

    args = _stage_args(argv, "shard", ShardConfig, [
        ("filtered_uri", "FILTERED", "the filter stage's output folder"),
        (*OUT, "writes the shards, tokenizer.json and manifest.json")])
    manifest = shard(args.filtered_uri, args.output_uri, build_config(ShardConfig, args))
    _print_json({k: manifest[k] for k in ("content_hash", "tokenizer", "run")})
    return 0


def cmd_train(argv: Sequence[str]) -> int:
    from components.train.config import TrainConfig
    from components.train.stage import train

    args = _stage_args(argv, "train", TrainConfig, [
        ("manifest_uri", "MANIFEST", "the dataset's manifest.json (or its folder)"),
        (*OUT, "writes OUT/model.pt and OUT/train_result.json")], tracking="nested")
    _print_json(train(args.manifest_uri, args.output_uri, build_config(TrainConfig, args), _tracking_config(args)))
    return 0


def cmd_evaluate(argv: Sequence[str]) -> int:
    from components.evaluate.config import EvalConfig
    from components.evaluate.stage import evaluate

    args = _stage_args(argv, "evaluate", EvalConfig, [MODEL, (*OUT, "writes OUT/report.json and OUT/plots/")],
                       [("--manifest", {"default": None, "help": "dataset manifest: retrieval on its validation "
                                                                 "split"})], tracking="run")
    report = evaluate(args.model_uri, args.manifest, args.output_uri, build_config(EvalConfig, args),
                      _tracking_config(args))
    _print_json({"suite": report["suite"]["name"], "datasets": list(report["datasets"]),
                 **{k: report.get(k) for k in ("skipped", "metrics", "report_uri")}})
    return 0


def cmd_export(argv: Sequence[str]) -> int:
    from components.export.config import ExportConfig
    from components.export.stage import export

    args = _stage_args(argv, "export", ExportConfig, [MODEL, (*OUT, "writes the ONNX bundle there")], [
        ("--tokenizer", {"required": True, "help": "the tokenizer.json the model was trained with"}),
        ("--dataset-content-hash", {"default": "", "help": "lineage tag of the registered model"}),
        ("--training-run-id", {"default": "", "help": "lineage tag of the registered model"})], tracking="run")
    result = export(args.model_uri, args.tokenizer, args.output_uri, build_config(ExportConfig, args),
                    _tracking_config(args), args.dataset_content_hash, args.training_run_id)
    _print_json({k: result[k] for k in ("bundle_uri", "registered_model_name", "registered_model_version",
                                        "promotion")})
    return 0


def cmd_zeroshot(argv: Sequence[str]) -> int:
    from components.inference.onnx_clip import main as serve

    return serve(argv)


COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "run": ("Run the whole pipeline on this machine: kfp.local, a local Ray and MLflow, the bundled corpus "
            "by default.", cmd_run),
    "submit": ("Upload the compiled pipeline to a KFP host and start a run.", cmd_submit),
    "screenshots": ("Screenshot a finished run's MLflow pages with headless Chromium (mlflow ui on 127.0.0.1).",
                    cmd_screenshots),
    "compile": ("Compile the DAG to pipelines/clip_pipeline.yaml, the package users upload in the KFP UI.",
                cmd_compile),
    "filter": ("Filter raw image-text pairs (decode, size, aspect, language, privacy, duplicates).", cmd_filter),
    "shard": ("Write the filter stage's kept pairs as webdataset shards, a tokenizer and a manifest.", cmd_shard),
    "train": ("Pretrain CLIP on a dataset manifest with Ray Train (also the RayJob's entrypoint).", cmd_train),
    "evaluate": ("Evaluate a model on a suite of datasets: zero-shot, linear probe, retrieval, robustness.",
                 cmd_evaluate),
    "export": ("Export a model's encoders to ONNX, check parity and register them in MLflow.", cmd_export),
    "zeroshot": ("Zero-shot classify images with an exported ONNX bundle or a registered model (onnxruntime only, "
                 "no torch).",
                 cmd_zeroshot),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\ncommands:")
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:<11} {text}")
        print("\n`clipflow COMMAND --help` lists a command's options.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"clipflow: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from components.common.config import ConfigError

    try:
        return COMMANDS[command][1](rest)
    except ConfigError as e:
        print(f"clipflow {command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
