"""The console of `clipflow run`: quiet by default, everything in a log file under the workdir.

    with RunConsole(workdir) as console:       # stdout and stderr (this process's and its children's)
        run_local(workdir, ...)                # go to <workdir>/logs/run-<time>.log
    console.write(...)                          # the terminal

Inside the block the process's file descriptors 1 and 2 point at the log file, so kfp.local's streamed task
output and executor-input dumps, Ray's and MLflow's messages and any warning end up there. The stages
speak to the user through the console channel (`components.common.console`): an events file named in
`CLIPFLOW_CONSOLE` that a thread here follows, drawing each stage's start and end line and live tqdm
progress bars (rate, ETA) on the terminal. `verbose=True` leaves no channel: everything reaches the
terminal as it is printed, and the log file still gets a copy.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from components.common.console import CHANNEL_ENV, error_line
from components.common.progress import clock

POLL_S = 0.2
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RunConsole:
    """Route this process's output to a log file and draw the stages' console events on `out`."""

    def __init__(self, workdir: str | Path, verbose: bool = False, out: TextIO | None = None) -> None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        logs = Path(workdir).resolve() / "logs"
        self.log_path = logs / f"run-{stamp}.log"
        self.events_path = logs / f"run-{stamp}.events.jsonl"
        self.verbose = verbose
        self._out_given = out
        self.out: TextIO = out or sys.stdout
        self.failed: dict[str, str] = {}  # stage -> error, from the stages' failure events
        self._started: dict[str, float] = {}
        self._attempts: dict[str, int] = {}  # kfp.local retries a failed task as a cluster would
        self._bars: dict[str, Any] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ entering and leaving

    def __enter__(self) -> "RunConsole":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._saved_fds = (os.dup(1), os.dup(2))
        if self._out_given is None:  # the terminal, kept on its own descriptor
            self.out = os.fdopen(os.dup(self._saved_fds[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        self._saved_streams = (sys.stdout, sys.stderr)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self.verbose:  # a pipe read by a thread that writes to the log and the terminal
            read_fd, write_fd = os.pipe()
            self._threads.append(threading.Thread(target=self._tee, args=(read_fd, log_fd), daemon=True))
            target = write_fd
        else:
            self.events_path.touch()
            os.environ[CHANNEL_ENV] = str(self.events_path)
            self._threads.append(threading.Thread(target=self._follow, daemon=True))
            target = log_fd
        os.dup2(target, 1)
        os.dup2(target, 2)
        if target != log_fd:
            os.close(target)
        self._log_fd = log_fd
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        replaced = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = self._saved_streams
        os.dup2(self._saved_fds[0], 1)  # restoring 1 and 2 also closes the tee's pipe (EOF for its thread)
        os.dup2(self._saved_fds[1], 2)
        for stream in replaced:
            stream.close()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        os.environ.pop(CHANNEL_ENV, None)
        for fd in (*self._saved_fds, self._log_fd):
            os.close(fd)
        if self._out_given is None:
            self.out.close()  # our own descriptor of the terminal; print() reaches it again
        else:
            self.out.flush()

    # ------------------------------------------------------------------ the terminal

    @property
    def _live(self) -> bool:
        """Progress bars only on a terminal; a pipe or a file gets the start and end lines alone."""
        try:
            return self.out.isatty()
        except (AttributeError, ValueError):
            return False

    def write(self, text: str) -> None:
        """A line for the user, above any live progress bar."""
        if self._bars:
            from tqdm import tqdm

            tqdm.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    # ------------------------------------------------------------------ threads

    def _tee(self, read_fd: int, log_fd: int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a chunk may end inside a character
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                os.write(log_fd, chunk)
                self.out.write(decoder.decode(chunk))
                self.out.flush()

    def _follow(self) -> None:
        """Follow the events file until the block ends (then read what is left)."""
        pending = b""
        with open(self.events_path, "rb") as events:
            while True:
                stopping = self._stop.is_set()
                chunk = events.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self._draw(line)
                elif stopping:
                    break
                else:
                    time.sleep(POLL_S)
        self._close_bars()

    def _close_bars(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def _draw(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        kind = event.get("kind")
        if kind == "stage":
            self._stage(event)
        elif kind == "note":
            self.write(f"! {event['stage']:<9} {event.get('text', '')}")
        elif kind == "progress" and self._live:
            self._progress(event)

    def _stage(self, event: dict) -> None:
        stage, state, text = event["stage"], event["state"], event.get("text", "")
        if state == "started":
            self._started[stage] = event["t"]
            self._attempts[stage] = self._attempts.get(stage, 0) + 1
            again = f" again (retry {self._attempts[stage] - 1})" if self._attempts[stage] > 1 else ""
            self.write(f"- {stage:<9} started{again} {datetime.fromtimestamp(event['t']):%H:%M:%S}")
            return
        self._close_bars()  # stages run one after the other: what is still drawn was this stage's
        took = clock(event["t"] - self._started.get(stage, event["t"]))
        if state == "failed":
            self.failed[stage] = text
            after = f" after {took}" if stage in self._started else ""  # start-run / finish-run say only this
            self.write(f"x {stage:<9} FAILED{after}: {text}")
        else:
            self.failed.pop(stage, None)  # a retry succeeded
            self.write(f"+ {stage:<9} done in {took}  {text}")

    def _progress(self, event: dict) -> None:
        from tqdm import tqdm

        bar = self._bars.get(event["id"])
        if event.get("closed"):
            if bar is not None:
                self._bars.pop(event["id"]).close()
            return
        if bar is None:
            bar = tqdm(total=event.get("total"), initial=event["done"], desc=f"  {event.get('label') or ''}",
                       unit=f" {event.get('what', 'items')}", file=self.out, leave=False, dynamic_ncols=True,
                       mininterval=0.2)
            self._bars[event["id"]] = bar
        else:
            bar.update(event["done"] - bar.n)
        if event.get("postfix"):
            bar.set_postfix_str(event["postfix"])

    # ------------------------------------------------------------------ failures

    def failure(self, exc: BaseException) -> str:
        """One message for a failed run: the stage, the error and the log file (after the block, when every
        event has been read)."""
        if isinstance(exc, KeyboardInterrupt):
            return f"clipflow run interrupted\n  full log: {self.log_path}"
        if self.failed:  # the first stage that failed (its latest attempt's error), before the exit handler
            stage = next((s for s in self.failed if s != "finish-run"), "finish-run")
            error = self.failed[stage]
        else:
            message = _ANSI.sub("", str(exc))
            found = re.findall(r"'([A-Za-z0-9_-]+)'", message.split("Inner task failed:")[-1])
            stage, error = (found[0] if found else ""), error_line(exc)
        where = f" in stage {stage}" if stage else ""
        return f"clipflow run failed{where}: {_ANSI.sub('', error)}\n  full log: {self.log_path}"
