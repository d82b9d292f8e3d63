"""Upload the compiled package to a KFP host and start a run: `python -m pipelines.submit --host URL`.

Example (KFP UI port-forwarded to localhost:8080):
    python -m pipelines.submit --host http://localhost:8080 --arg model_config=ViT-B-32 --arg num_workers=4
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipelines import platform as pf
from pipelines.compile import PACKAGE, is_stale

PIPELINE_NAME = "clip-pretraining"


def parse_arguments(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values parse as JSON when they can (numbers), else stay strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--arg expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def submit(host: str, arguments: dict[str, Any], experiment: str = "clip-pretraining", run_name: str | None = None,
           namespace: str | None = None, upload: bool = True, wait: bool = False, client: Any = None) -> str:
    """Upload (or add a version of) the pipeline, then run it with the pipeline service account."""
    import kfp

    if is_stale():
        raise RuntimeError(f"{PACKAGE} is stale: run `python -m pipelines.compile` first")
    client = client or kfp.Client(host=host, namespace=namespace or "kubeflow")
    if upload:
        pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
        if pipeline_id is None:
            client.upload_pipeline(str(PACKAGE), pipeline_name=PIPELINE_NAME, namespace=namespace)
        else:
            import time

            client.upload_pipeline_version(str(PACKAGE), pipeline_version_name=f"{PIPELINE_NAME}-{int(time.time())}",
                                           pipeline_id=pipeline_id)
    run = client.create_run_from_pipeline_package(str(PACKAGE), arguments=arguments, run_name=run_name,
                                                  experiment_name=experiment, namespace=namespace,
                                                  service_account=pf.SERVICE_ACCOUNT)
    print(f"started KFP run {run.run_id} on {host}")
    if wait:
        result = run.wait_for_run_completion()
        print(f"run {run.run_id} finished: {getattr(result, 'state', result)}")
    return run.run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    parser.add_argument("--arg", action="append", default=[], help="pipeline parameter key=value (repeatable)")
    parser.add_argument("--experiment", default="clip-pretraining")
    parser.add_argument("--run-name")
    parser.add_argument("--namespace", help="KFP profile namespace (multi-user installs)")
    parser.add_argument("--no-upload", action="store_true", help="run the package without uploading it")
    parser.add_argument("--wait", action="store_true")
    args = parser.parse_args(argv)
    submit(args.host, parse_arguments(args.arg), args.experiment, args.run_name, args.namespace,
           upload=not args.no_upload, wait=args.wait)


if __name__ == "__main__":
    main()
