"""Upload the compiled package to a KFP host and start a run: `clipflow submit --host URL`.

Example (KFP UI port-forwarded to localhost:8080):
    clipflow submit --host http://localhost:8080 --set model_config=ViT-B-32 --set num_workers=4
"""

from __future__ import annotations

from typing import Any

from components.common import platform as pf
from pipelines.compile import PACKAGE, is_stale


def submit(host: str, arguments: dict[str, Any], experiment: str = pf.PIPELINE_NAME, run_name: str | None = None,
           namespace: str | None = None, upload: bool = True, wait: bool = False, client: Any = None) -> str:
    """Upload (or add a version of) the pipeline, then run it with the pipeline service account."""
    import kfp

    if is_stale():
        raise RuntimeError(f"{PACKAGE} is stale: run `clipflow compile` first")
    client = client or kfp.Client(host=host, namespace=namespace or "kubeflow")
    if upload:
        pipeline_id = client.get_pipeline_id(pf.PIPELINE_NAME)
        if pipeline_id is None:
            client.upload_pipeline(str(PACKAGE), pipeline_name=pf.PIPELINE_NAME, namespace=namespace)
        else:
            import time

            client.upload_pipeline_version(str(PACKAGE), pipeline_version_name=f"{pf.PIPELINE_NAME}-{int(time.time())}",
                                           pipeline_id=pipeline_id)
    run = client.create_run_from_pipeline_package(str(PACKAGE), arguments=arguments, run_name=run_name,
                                                  experiment_name=experiment, namespace=namespace,
                                                  service_account=pf.SERVICE_ACCOUNT)
    print(f"started KFP run {run.run_id} on {host}")
    if wait:
        result = run.wait_for_run_completion()
        print(f"run {run.run_id} finished: {getattr(result, 'state', result)}")
    return run.run_id
