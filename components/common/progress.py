"""Progress of long work: done/total, rate and ETA.

    progress = Progress(len(items), "records", label="filter")
    for batch in batches:
        progress.update(len(batch), loss=0.3)
    progress.close()

Where it shows:
- under `clipflow run` (a console channel is set, `components.common.console`): a live tqdm bar drawn by
  `clipflow run` on the user's terminal (events at most every `EVENT_EVERY_S`), and a plain line every
  `every_s` seconds in the run's log;
- on a terminal (a stage command run by hand): a live tqdm bar on `stream`;
- anywhere else (a pod's log, a pipe): a plain line every `every_s` seconds, e.g.
  `[filter] 1200/5000 records  310.2 records/s  ETA 0:12  loss=0.3`.
"""

from __future__ import annotations

import os
import sys
import time

from components.common import console

EVENT_EVERY_S = 0.5  # the console channel gets at most two updates a second per bar


def clock(seconds: float) -> str:
    """A duration as the console shows it: m:ss, or h:mm:ss from an hour on."""
    s = int(round(max(seconds, 0)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:d}:{sec:02d}"


def _fmt_extra(extra: dict[str, object]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """`p = Progress(total, "records"); p.update(n, loss=0.3)`; `total=None` when unknown (no ETA)."""

    def __init__(self, total: int | None, what: str = "items", every_s: float = 5.0,
                 label: str = "", stream=None) -> None:
        self.total, self.what, self.every_s, self.label = total, what, every_s, label
        self.stream = stream or sys.stdout
        self.done = 0
        self.start = time.perf_counter()
        self._last = self._sent = self.start
        self._id = f"{os.getpid()}-{id(self)}-{self.start}"
        self._channel = console.channel() is not None
        self._bar = None
        if not self._channel and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=f" {what}", desc=label or None, file=self.stream, mininterval=0.5,
                             dynamic_ncols=True, leave=True)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        if not self.total or self.rate <= 0:
            return None
        return (self.total - self.done) / self.rate

    def line(self, **extra: object) -> str:
        total = f"/{self.total}" if self.total else ""
        eta = self.eta_s()
        parts = [f"{self.done}{total} {self.what}", f"{self.rate:.1f} {self.what}/s"]
        if eta is not None:
            parts.append(f"ETA {clock(eta)}")
        if extra:
            parts.append(_fmt_extra(extra))
        prefix = f"[{self.label}] " if self.label else ""
        return prefix + "  ".join(parts)

    def _event(self, **fields: object) -> None:
        console.emit({"kind": "progress", "id": self._id, "label": self.label, "what": self.what,
                      "done": self.done, "total": self.total, **fields})

    def update(self, n: int = 1, force: bool = False, **extra: object) -> None:
        self.done += n
        now = time.perf_counter()
        complete = bool(self.total and self.done >= self.total)
        if self._bar is not None:
            if extra:
                self._bar.set_postfix_str(_fmt_extra(extra), refresh=False)
            self._bar.update(n)
            return
        if self._channel and (force or complete or now - self._sent >= EVENT_EVERY_S):
            self._sent = now
            self._event(postfix=_fmt_extra(extra))
        if force or now - self._last >= self.every_s or complete:
            self._last = now
            print(self.line(**extra), file=self.stream, flush=True)

    def close(self, **extra: object) -> None:
        elapsed = time.perf_counter() - self.start
        if self._bar is not None:
            if extra:
                self._bar.set_postfix_str(_fmt_extra(extra), refresh=False)
            self._bar.close()
            return
        if self._channel:
            self._event(postfix=_fmt_extra(extra), closed=True)
        print(self.line(**extra) + f"  done in {clock(elapsed)}", file=self.stream, flush=True)
