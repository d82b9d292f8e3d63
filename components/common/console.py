"""What a stage says to the person running the pipeline: the console channel.

A stage's process (and the Ray workers it starts) cannot write to the user's terminal directly: kfp.local
runs each task in a subprocess and streams its output, and Ray, MLflow and KFP print a lot beside it.
`clipflow run` (pipelines/run_console.py) therefore sends all of that output to a log file and names an
events file in `CLIPFLOW_CONSOLE`; what a stage wants the user to see goes there as JSON lines:

    {"kind": "stage", "stage": "filter", "state": "started" | "finished" | "failed", "text": ...}
    {"kind": "note", "stage": "train", "text": "restarted from step 500 (attempt 2) after: ..."}
    {"kind": "progress", "id": ..., "label": ..., "what": ..., "done": n, "total": n | null, "postfix": ...}
    {"kind": "progress", "id": ..., "closed": true}

and `clipflow run` draws them (start and end lines, live progress bars). Without `CLIPFLOW_CONSOLE` (a
cluster pod, `clipflow run --verbose`, a stage command) the same calls print plain lines to stdout.
Every call also prints its line to stdout, so the log file holds everything.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

CHANNEL_ENV = "CLIPFLOW_CONSOLE"


def channel() -> str | None:
    """The events file of the console drawing this run, or None (plain lines only)."""
    return os.environ.get(CHANNEL_ENV) or None


def emit(event: dict[str, Any]) -> bool:
    """Append one event to the channel (one `write`, so lines from several processes never interleave);
    False when there is no channel."""
    path = channel()
    if not path:
        return False
    data = (json.dumps({"t": time.time(), "pid": os.getpid(), **event}, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return True


def _print(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


def stage_event(stage: str, state: str, text: str = "") -> None:
    """`state` started | finished (text = the stage's key figures) | failed (text = the error)."""
    emit({"kind": "stage", "stage": stage, "state": state, "text": text})
    _print(f"[{stage}] {state}" + (f": {text}" if text else ""))


def _first_line(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0].strip()}" if message else type(exc).__name__


def _inner(exc: BaseException) -> list[BaseException]:
    """The exceptions `exc` wraps: an exception group's members, Ray Train's per-worker failures and
    controller failure, Ray's task cause and user-code wrapper. A `raise ... from` chain is followed only
    from an exception without a message: one with a message said the cause in its own words (the
    project's StorageError names the URI and endpoint, where botocore's error it came from does not)."""
    found: list = list(getattr(exc, "exceptions", None) or [])  # ExceptionGroup
    failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: exception}
    if isinstance(failures, dict):
        found += [failures[rank] for rank in sorted(failures)]
    for attr in ("controller_failure", "_base_exc", "cause"):  # ControllerError, UserExceptionWithTraceback,
        found.append(getattr(exc, attr, None))                # RayTaskError
    if not str(exc).strip():
        found.append(exc.__cause__)
        if not exc.__suppress_context__:
            found.append(exc.__context__)
    return [e for e in found if isinstance(e, BaseException) and e is not exc]


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception `exc` stands for (first member of a group, first failed worker, cause of
    a cause, ...); `exc` itself when it wraps nothing."""
    seen = {id(exc)}
    while True:
        inner = [e for e in _inner(exc) if id(e) not in seen]
        if not inner:
            return exc
        exc = inner[0]
        seen.add(id(exc))


def error_line(exc: BaseException) -> str:
    """An exception as one line: its root cause's type and first message line (which names the endpoint,
    bucket or object it failed on), then the type that wrapped it, e.g. `BucketNotFound: bucket 'x' does
    not exist at endpoint http://... (via WorkerGroupError)`."""
    root = root_cause(exc)
    return _first_line(exc) if root is exc else f"{_first_line(root)} (via {type(exc).__name__})"


def run_stage(stage: str, run: Callable[..., Any], settings: dict[str, Any], announce: bool = True) -> Any:
    """What a stage's KFP component runs: `run(**settings)` between a start and an end event. The end
    line's figures come from the stage (`finished`, called by its view); a failure is said with the error's
    root cause (`error_line`) and re-raised (its traceback goes to the log). `announce=False` (the tasks
    around the stages: start-run, finish-run) says only a failure."""
    if announce:
        stage_event(stage, "started")
    try:
        return run(**settings)
    except BaseException as exc:
        stage_event(stage, "failed", error_line(exc))
        raise


def note(stage: str, text: str) -> None:
    """A line the user should see while the stage runs (a restart, metrics that could not be sent)."""
    emit({"kind": "note", "stage": stage, "text": text})
    _print(f"[{stage}] {text}")


def finished(stage: str, headline: str) -> None:
    """The stage's end line: its key figures."""
    stage_event(stage, "finished", headline)
