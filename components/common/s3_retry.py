"""How long an S3 call may take, and how it retries: one deadline per call, every retry logged.

botocore's own retries know attempt counts, not time: with a 120 s read timeout and 5 attempts a call to an
endpoint that accepts connections and never answers blocked for 10 minutes without a word. Here botocore
makes one attempt per try (``total_max_attempts=1``) and `RetryPolicy` decides about the next one:

- a failure is retried when botocore's standard rules call it transient (connection refused or reset,
  timeouts, HTTP 500/502/503/504, throttling), with exponential backoff (0.5 s doubling, capped at 10 s,
  jittered);
- no attempt starts unless it can end, connect and read timeouts included, before the call's deadline;
  so a call returns or raises within ``deadline_s`` (a trickling response aside, whose every read is
  bounded by ``read_timeout_s``);
- each retry and each give-up is logged (logger ``clipflow.storage``, WARNING) with the operation, the
  object, the endpoint, the cause and the time left.

The defaults keep the outages a pipeline survived before (an object store restarting for 20 s mid-shard)
survivable and can be tuned with ``CLIPFLOW_S3_DEADLINE_S``, ``CLIPFLOW_S3_CONNECT_TIMEOUT_S`` and
``CLIPFLOW_S3_READ_TIMEOUT_S``. A multipart transfer gets the deadline per request (per part), not for
the whole file.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

from botocore.retries.standard import RetryEventAdapter, StandardRetryConditions

log = logging.getLogger("clipflow.storage")

_T0, _WHAT = "clipflow_t0", "clipflow_what"  # keys in botocore's per-call request context


@dataclass(frozen=True)
class RetryPolicy:
    """Timeouts of one attempt and the deadline of a whole call (seconds)."""

    deadline_s: float = 120.0  # a call (all its attempts and waits) ends within this
    connect_timeout_s: float = 5.0  # one attempt's TCP connect
    read_timeout_s: float = 30.0  # one attempt's wait for the next bytes of the answer
    backoff_s: float = 0.5  # the first retry's wait; doubles per retry
    max_backoff_s: float = 10.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        def number(name: str, default: float) -> float:
            text = os.environ.get(name, "")
            try:
                value = float(text) if text else default
            except ValueError:
                raise ValueError(f"{name}={text!r}: expected a number of seconds") from None
            if value <= 0:
                raise ValueError(f"{name}={text!r}: must be > 0")
            return value

        d = cls()
        return cls(deadline_s=number("CLIPFLOW_S3_DEADLINE_S", d.deadline_s),
                   connect_timeout_s=number("CLIPFLOW_S3_CONNECT_TIMEOUT_S", d.connect_timeout_s),
                   read_timeout_s=number("CLIPFLOW_S3_READ_TIMEOUT_S", d.read_timeout_s))

    @property
    def attempt_s(self) -> float:
        """The longest one attempt waits on a silent endpoint."""
        return self.connect_timeout_s + self.read_timeout_s

    def backoff(self, retry: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1)) * random.uniform(0.75, 1.0)

    def install(self, client, endpoint: str) -> None:
        """Take over the retries of a boto3 client created with ``total_max_attempts=1``."""
        client.meta.events.register("before-parameter-build.s3", _start_clock)
        client.meta.events.register("needs-retry.s3", _Retrier(self, endpoint).needs_retry)


def _start_clock(params=None, context=None, model=None, **_) -> None:
    if context is None:
        return
    context.setdefault(_T0, time.monotonic())
    params = params or {}
    target = f"s3://{params.get('Bucket', '')}/{params.get('Key', '')}".rstrip("/")
    context.setdefault(_WHAT, f"{getattr(model, 'name', 'request')} {target}")


def _cause(kwargs) -> str:
    exc = kwargs.get("caught_exception")
    if exc is not None:
        return f"{type(exc).__name__}: {exc}"
    response = kwargs.get("response")
    if response:
        http, parsed = response
        err = (parsed or {}).get("Error", {})
        return f"HTTP {getattr(http, 'status_code', '?')} {err.get('Code', '')}".strip()
    return "unknown error"


class _Retrier:
    """The ``needs-retry`` handler: returns the seconds to wait before the next attempt, or None."""

    def __init__(self, policy: RetryPolicy, endpoint: str):
        self.policy, self.endpoint = policy, endpoint
        self.conditions = StandardRetryConditions(max_attempts=1_000_000)  # attempts are bounded by time
        self.adapter = RetryEventAdapter()

    def needs_retry(self, **kwargs):
        attempts = kwargs["attempts"]
        if kwargs.get("caught_exception") is None and not kwargs.get("response"):
            return None
        if not self.conditions.is_retryable(self.adapter.create_retry_context(**kwargs)):
            return None  # success, or an error another try will not fix (missing key, bad credentials)
        context = (kwargs.get("request_dict") or {}).get("context", {})
        elapsed = time.monotonic() - context.get(_T0, time.monotonic())
        what = context.get(_WHAT, getattr(kwargs.get("operation"), "name", "request"))
        delay = self.policy.backoff(attempts)
        left = self.policy.deadline_s - elapsed
        if delay + self.policy.attempt_s > left:
            log.warning("S3 %s at %s: attempt %d failed (%s); giving up after %.1f s (deadline %.0f s, "
                        "CLIPFLOW_S3_DEADLINE_S)", what, self.endpoint, attempts, _cause(kwargs), elapsed,
                        self.policy.deadline_s)
            return None
        log.warning("S3 %s at %s: attempt %d failed (%s); retrying in %.1f s (%.0f s left of the %.0f s "
                    "deadline)", what, self.endpoint, attempts, _cause(kwargs), delay, left,
                    self.policy.deadline_s)
        return delay
