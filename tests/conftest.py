"""Shared pytest fixtures.

S3 on loopback (no network, no Docker):

- ``s3_server`` (session): starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1 with a free port,
  and for the whole session sets ``AWS_ENDPOINT_URL`` (and ``S3_ENDPOINT_URL``,
  ``MLFLOW_S3_ENDPOINT_URL``) to it, dummy credentials (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` = ``testing``) and ``AWS_DEFAULT_REGION=us-east-1``; removes
  ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``AWS_SECURITY_TOKEN``. Everything is restored
  when the session ends. Yields the endpoint URL, e.g. ``http://127.0.0.1:41234``.
- ``bucket`` (function): a fresh, empty bucket on that server; yields its name (use
  ``f"s3://{bucket}/some/key"``). Depends on ``s3_server``, so requesting ``bucket`` is enough.

These fixture names are used by several test modules: keep them stable.
"""

from __future__ import annotations

import logging
import os
import uuid

import pytest


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind():
    """Each module ends with no Ray for the next one to find: its connection closed, and the address a
    `ray.cluster_utils.Cluster` records for `ray start` users (which `ray_session` would join) removed. A module
    whose cluster fails to stop would otherwise hand its 1-CPU nodes to every later stage call."""
    yield
    import ray
    from ray._private.utils import get_ray_address_file

    if ray.is_initialized():
        ray.shutdown()
    try:
        os.remove(get_ray_address_file(None))
    except FileNotFoundError:
        pass


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    mp = pytest.MonkeyPatch()
    try:
        for var in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            mp.setenv(var, endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            mp.delenv(var, raising=False)
        yield endpoint
    finally:
        mp.undo()
        server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    from components.common import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(name)
    return name


@pytest.fixture(scope="session", autouse=True)
def mlflow_store_template(tmp_path_factory):
    """Every new sqlite MLflow store of the session is a copy of one store MLflow migrated once
    (tests/mlflow_template.py): the same schema, without ~70 migrations per store."""
    from tests import mlflow_template

    mlflow_template.install(tmp_path_factory.mktemp("mlflow-template") / "mlflow.db")
    yield
