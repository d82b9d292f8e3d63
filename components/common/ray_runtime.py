"""The one place that starts or joins Ray: `with ray_session(num_cpus=4): ...`.

A Ray that is already initialised in this process is used as it is. Otherwise a running cluster is
joined: the one `RAY_ADDRESS` names (e.g. the RayJob's), else the one `ray start` last started on this
machine (Ray records its address), so that successive commands share one Ray instead of paying its
start-up each time (`ray start --head --num-cpus N` once, then every `clipflow filter` joins it).
Only when there is none is a local Ray started, with the resources asked for. A recorded address whose
cluster has gone (a crashed `ray start`) is reported and a local Ray is started instead. Workers get
this project on their PYTHONPATH, so they can import it even when it is not pip-installed (and, on a Ray
started here, no Ray Train preemption watcher: `LOCAL_ONLY_ENV`). Ray is
stopped on exit only when this session started it (a joined cluster is only disconnected from).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: the project importable (the same value every call, so Ray can
    reuse its worker processes)."""
    path = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


# For a Ray started here, on this one machine: Ray Train's preemption watcher (an actor per worker group that
# polls for node drains, which only a cluster's autoscaler or Kubernetes announces) would cost every run one
# more worker process to start and nothing to watch.
LOCAL_ONLY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

STORAGE_ENV = ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


def storage_env() -> dict[str, str]:
    """The object store's endpoint and credentials of this process, for tasks to set (a joined cluster's
    workers were started without them)."""
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


def running_cluster() -> str | None:
    """The address of a Ray cluster to join: RAY_ADDRESS, else the one `ray start` recorded here; None if neither."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:  # the file `ray start` writes (read through Ray's helper; None when absent)
        from ray._private.utils import read_ray_address

        return read_ray_address() or None
    except Exception:  # noqa: BLE001 - a Ray without the helper: nothing recorded
        return None


@contextmanager
def ray_session(num_cpus: float | None = None, num_gpus: float | None = None,
                log_to_driver: bool = True) -> Iterator[bool]:
    """Use, join or start Ray for the duration of the block; yields True when it started Ray here.

    `num_cpus` / `num_gpus` size a Ray started here (None = what the machine has); they are ignored
    when Ray is already up or a running cluster is joined. `log_to_driver=False` keeps the workers'
    output out of this process's console."""
    import ray

    started = connected = False
    if not ray.is_initialized():
        common: dict = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver,
                        "runtime_env": {"env_vars": worker_env()}}
        address = running_cluster()
        joined = False
        if address:
            try:
                ray.init(address=address, **common)
                joined = connected = True
            except ConnectionError as e:
                if os.environ.get("RAY_ADDRESS"):
                    raise ConnectionError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {e}") from e
                logging.getLogger(__name__).warning("the Ray recorded by `ray start` (%s) is gone (%s); "
                                                    "starting a local one", address, e)
        if not joined:
            sizes = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if v}
            unset = {k: v for k, v in LOCAL_ONLY_ENV.items() if k not in os.environ}  # a user's own setting wins
            local = {**common, "runtime_env": {"env_vars": {**worker_env(), **unset}}}
            ray.init(address="local", include_dashboard=False, **sizes, **local)
            started = connected = True
    try:
        yield started
    finally:
        if connected:  # stops a Ray started here; only disconnects from a joined cluster
            ray.shutdown()


def spread_tasks(fn: Callable, calls: Iterable[tuple]) -> Iterator[Any]:
    """`fn(*args)` for every args of `calls`, as Ray tasks of 1 CPU spread over the nodes (retried up to 3 times,
    on another node when theirs is lost), submitted in order with at most 2 per cluster CPU in flight; yields
    the results as they finish. Closed early (or failing), it cancels the tasks still in flight: use it
    under `contextlib.closing` where an error may stop the caller's loop."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=3, scheduling_strategy="SPREAD")(fn)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list = []
    try:
        for args in calls:
            pending.append(remote.remote(*args))
            if len(pending) >= window:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    except BaseException:  # an error, or the caller stopped: the rest is not wanted
        for ref in pending:
            ray.cancel(ref, force=True)
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=60)
        raise
