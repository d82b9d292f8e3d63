"""Progress lines for long work: done/total, rate and ETA, printed at most every `every_s` seconds."""

from __future__ import annotations

import sys
import time


def _fmt_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:d}:{sec:02d}"


class Progress:
    """`p = Progress(total, "records"); p.update(n, loss=0.3)` prints e.g.
    `[filter] 1200/5000 records  310.2 records/s  ETA 0:12  loss=0.3`."""

    def __init__(self, total: int | None, what: str = "items", every_s: float = 5.0,
                 label: str = "", stream=None) -> None:
        self.total, self.what, self.every_s, self.label = total, what, every_s, label
        self.stream = stream or sys.stdout
        self.done = 0
        self.start = time.perf_counter()
        self._last = self.start

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
            parts.append(f"ETA {_fmt_seconds(eta)}")
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()]
        prefix = f"[{self.label}] " if self.label else ""
        return prefix + "  ".join(parts)

    def update(self, n: int = 1, force: bool = False, **extra: object) -> None:
        self.done += n
        now = time.perf_counter()
        if force or now - self._last >= self.every_s or (self.total and self.done >= self.total):
            self._last = now
            print(self.line(**extra), file=self.stream, flush=True)

    def close(self, **extra: object) -> None:
        elapsed = time.perf_counter() - self.start
        print(self.line(**extra) + f"  done in {_fmt_seconds(elapsed)}", file=self.stream, flush=True)
