"""Run the commands `clipflow run`'s closing summary prints (`pipelines.local.commands`), as a user would
paste them into a shell, on 127.0.0.1; servers they start are stopped here."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from tests.net_helpers import free_port


def _until_answers(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 120) -> requests.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the command exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return requests.get(url, timeout=2)
        except requests.RequestException:
            time.sleep(0.5)
    raise AssertionError(f"nothing answered at {url} within {timeout_s}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def _serving(command: str, port: int, probe: str, env: dict, cwd: Path) -> Iterator[None]:
    """Run a printed server command (its --port replaced by a free one) until its `probe` path answers 200."""
    log = cwd / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", re.sub(r"--port \d+", f"--port {port}", command)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        assert _until_answers(proc, f"http://127.0.0.1:{port}{probe}", log).status_code == 200
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def check_printed_commands(shown: dict[str, str], image: Path, tmp_path: Path) -> None:
    """zeroshot classifies `image`; serve answers an invocation; the UI (a command or a URL) answers."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the commands say what they need
    zeroshot = subprocess.run(["bash", "-c", shown["zeroshot"].replace("IMAGE...", str(image))], capture_output=True,
                              text=True, timeout=180, env=env, cwd=tmp_path)
    assert zeroshot.returncode == 0, zeroshot.stderr[-3000:]
    assert str(image) in zeroshot.stdout

    port = free_port()
    with _serving(shown["serve"], port, "/ping", env, tmp_path):
        answer = requests.post(f"http://127.0.0.1:{port}/invocations",
                               json={"dataframe_records": [{"text": "a photo of a red circle"}]}, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["predictions"][0]["text_embedding"]) > 0, answer.text

    if shown["ui"].startswith("http"):
        assert requests.get(shown["ui"].split("#")[0], timeout=10).status_code == 200
        return
    with _serving(shown["ui"], free_port(), "/health", env, tmp_path):
        pass
