"""Real services on 127.0.0.1 for the integration tests, each started by its test and stopped after it:
PostgreSQL (initdb + pg_ctl in a temporary directory, as the `postgres` user when the tests run as root,
since postgres refuses root) and an MLflow tracking server (`mlflow server`, backend store URI through the
MLFLOW_BACKEND_STORE_URI variable as in k8s/, never on its command line)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from tests import mlflow_template
from tests.net_helpers import free_port


def postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl (PATH, else the newest /usr/lib/postgresql/*/bin), or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


class Postgres:
    """A throwaway PostgreSQL cluster: user `mlflow` (trust auth), listening on 127.0.0.1:<free port> only."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL (initdb, pg_ctl) is not installed")
        self.dir = Path(tempfile.mkdtemp(prefix="clipflow-pg-"))
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        data = self.dir / "data"
        self._run(f"{self.bin}/initdb -D {data} -A trust -U mlflow -E UTF8 --no-sync >{self.dir}/initdb.log 2>&1")
        self._run(f"{self.bin}/pg_ctl -D {data} -l {self.dir}/server.log -w -t 60 -o "
                  f"\"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off\" start")

    def _run(self, command: str) -> None:
        argv = ["su", "postgres", "-s", "/bin/sh", "-c", command] if self.as_postgres else ["/bin/sh", "-c", command]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            logs = "".join(p.read_text()[-2000:] for p in self.dir.glob("*.log") if p.is_file())
            raise RuntimeError(f"{command!r} failed ({proc.returncode}): {proc.stdout}{proc.stderr}{logs}")

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run(f"{self.bin}/pg_ctl -D {self.dir / 'data'} -m fast -w -t 60 stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<port> (a free one unless given) that can be stopped and started
    again on the same port and store."""

    def __init__(self, backend_store_uri: str, artifacts_destination: str, env: dict[str, str] | None = None,
                 port: int | None = None, log_dir: str | Path | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # no job-execution runner (MLflow's GenAI jobs, a process of its own that nothing here uses)
        self.env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {}),
                    "MLFLOW_BACKEND_STORE_URI": backend_store_uri}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.artifacts_destination = artifacts_destination
        self.log = Path(log_dir or tempfile.mkdtemp(prefix="clipflow-mlflow-")) / f"mlflow-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> "MlflowServer":
        mlflow_template.seed(self.env["MLFLOW_BACKEND_STORE_URI"])  # a new sqlite store: migrated once per session
        argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1", "--artifacts-destination", self.artifacts_destination,
                "--allowed-hosts", f"127.0.0.1:{self.port},127.0.0.1,localhost:{self.port}"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop the server and its workers (its own process group) and wait for them."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
        except ProcessLookupError:
            pass
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP the server and its workers: connections are still accepted (by the kernel), nothing
        answers; `resume` (SIGCONT) lets it carry on where it stopped, with no restart delay."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
