"""Look at a finished run's MLflow pages in a real browser: `clipflow screenshots [--workdir .demo]`.

Starts `mlflow ui` on the workdir's store on 127.0.0.1 (a free port), then takes headless Chromium
screenshots (Debian's `chromium` package: `apt-get install -y chromium`) of the experiment page, the
newest pipeline run's parent run, each stage run, the train run's metrics, the evaluate run's plots, the
registered model (its versions with their aliases) and the runs table with the parent runs' headline metrics,
params and the Dataset column, and writes the PNGs under `<workdir>/screenshots/`. A tool for people, not a test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = "1440,1100"
SETTLE_S = 8.0  # seconds a page gets after loading to fetch and draw before its screenshot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser() -> str:
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    raise RuntimeError(f"no Chromium found ({', '.join(BROWSERS)}): install Debian's package with "
                       "`apt-get install -y chromium`")


def pages(summary: dict) -> dict[str, str]:
    """{file name: the MLflow UI route} for the newest pipeline run (`pipelines.local.summarize`)."""
    parent_id = summary["parent_run_id"]
    stages = summary["stages"]
    exp = next(iter(stages.values())).info.experiment_id if stages else None
    if exp is None:
        import mlflow

        exp = mlflow.get_run(parent_id).info.experiment_id
    out = {"01-experiment": f"#/experiments/{exp}", "02-parent-run": f"#/experiments/{exp}/runs/{parent_id}"}
    for i, stage in enumerate(("filter", "shard", "train", "evaluate", "export"), start=3):
        if stage in stages:
            out[f"{i:02d}-{stage}-run"] = f"#/experiments/{exp}/runs/{stages[stage].info.run_id}"
    if "train" in stages:
        out["08-train-metrics"] = f"#/experiments/{exp}/runs/{stages['train'].info.run_id}/model-metrics"
    if "evaluate" in stages:
        out["09-evaluate-plots"] = (f"#/experiments/{exp}/runs/{stages['evaluate'].info.run_id}/artifacts/"
                                    "plots/few_shot.png")
    name, _, version = summary["tags"].get("lineage.registered_model", "").partition("/")
    if name and version and version != "None":
        out["10-registered-model"] = f"#/models/{name}/versions/{version}"
        out["11-registered-model-versions"] = f"#/models/{name}"
    out[COMPARE_PAGE] = f"#/experiments/{exp}"  # opened with the columns of `table_state` (last: it changes the page)
    return out


COMPARE_PAGE = "12-runs-compared"
COMPARE_WINDOW = (2400, 700)  # the runs table's page: its columns side by side
TABLE_PARAMS = ("model_config", "steps", "dataset_content_hash")  # params of the parent run shown in the runs table


def table_state(experiment_id: str, expanded_run_id: str) -> dict:
    """The MLflow UI's saved view of the experiment's runs table (localStorage, `ExperimentPage` component
    state): the Dataset column, the headline metrics and the data/model params of the parent runs
    (`components.common.headline`), newest first, with the stage runs of `expanded_run_id` shown (each with
    the datasets it read)."""
    from components.common.headline import STAGE_METRICS

    metrics = ("kept_fraction", *(key for _stage, key in STAGE_METRICS), "onnx_parity_max_abs")
    columns = ["attributes.`Dataset`", *(f"metrics.`{m}`" for m in metrics), *(f"params.`{p}`" for p in TABLE_PARAMS)]
    key = f"MLflowLocalStorage-1.1-ExperimentPage-{json.dumps([experiment_id])}-ReactComponentState"
    return {key: {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False,
                  "runsExpanded": {expanded_run_id: True}}}


class MlflowUI:
    """`mlflow ui` on 127.0.0.1 for the duration of a `with` block (its output in `log`)."""

    def __init__(self, tracking_uri: str, log: Path, port: int | None = None) -> None:
        self.tracking_uri, self.log, self.port = tracking_uri, log, port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> "MlflowUI":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", self.tracking_uri,
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow ui exited with {self.process.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(self.url + "health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"mlflow ui did not answer at {self.url} within 120 s; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and the workers it started
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# The MLflow UI keeps its own state in the browser's localStorage: open experiments as model training (not
# GenAI), no assistant panel and no first-visit hints over the page (keys: `<name>_v<version>`, JSON values).
UI_STATE = {"mlflow.workflowType_v1": "machine_learning", "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
            "mlflow.assistant.panelOpen_v1": False, "mlflow.detectIssues.guidanceShown_v1": True,
            "mlflow.flagForReview.guidanceShown_v1": True}


class Chromium:
    """Headless Chromium driven over the DevTools protocol (websocket-client): set the UI's state, open
    pages, take screenshots."""

    def __init__(self, executable: str, settle_s: float = SETTLE_S) -> None:
        self.executable, self.settle_s, self._id = executable, settle_s, 0

    def __enter__(self) -> "Chromium":
        import json

        try:
            import websocket
        except ImportError:
            raise SystemExit("clipflow screenshots needs websocket-client: pip install 'clipflow[screenshots]'") from None

        self.profile = tempfile.mkdtemp(prefix="clipflow-chromium-")
        self.process = subprocess.Popen(
            [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={self.profile}",
             f"--window-size={WINDOW}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.time() > deadline or self.process.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"{self.executable} did not start its DevTools endpoint")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120)
        self.resize(*(int(v) for v in WINDOW.split(",")))
        return self

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, **params: object) -> dict:
        import json

        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"chromium {method}: {message['error']}")
                return message.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.time() + 60
        while self.call("Runtime.evaluate", expression="document.readyState",
                        returnByValue=True)["result"].get("value") != "complete" and time.time() < deadline:
            time.sleep(0.3)
        time.sleep(self.settle_s)  # the single-page app fetches and draws after the load event

    def set_local_storage(self, items: dict) -> None:
        """Set the open page's localStorage and reload it (the app reads its state once, when it starts)."""
        import json

        for key, value in items.items():
            self.call("Runtime.evaluate", expression=f"localStorage.setItem({json.dumps(key)}, "
                                                     f"{json.dumps(json.dumps(value))})")
        self.call("Page.reload")
        time.sleep(self.settle_s)

    def click_text(self, text: str) -> int:
        """Click every button or link whose text is `text` (e.g. a description's "Show more"); how many."""
        import json

        script = (f"(() => {{ const hits = [...document.querySelectorAll('button, a, [role=button]')]"
                  f".filter(e => e.textContent.trim() === {json.dumps(text)}); hits.forEach(e => e.click());"
                  f" return hits.length; }})()")
        clicked = self.call("Runtime.evaluate", expression=script, returnByValue=True)["result"].get("value") or 0
        if clicked:
            time.sleep(1.0)
        return clicked

    def screenshot(self, png: Path) -> None:
        import base64

        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


def take_screenshots(workdir: str | Path = ".demo", tracking_uri: str | None = None,
                     experiment: str | None = None, port: int | None = None) -> list[Path]:
    """Screenshots of the newest pipeline run's MLflow pages; returns the PNGs' paths."""
    from pipelines.local import summarize
    from components.common.platform import PIPELINE_NAME

    workdir = Path(workdir).resolve()
    tracking_uri = tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    chromium = browser()
    summary = summarize(tracking_uri, experiment or PIPELINE_NAME, since=0)
    out_dir = workdir / "screenshots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with MlflowUI(tracking_uri, workdir / "logs" / "mlflow-ui.log", port) as ui, Chromium(chromium) as browser_:
        browser_.open(ui.url)
        browser_.set_local_storage(UI_STATE)
        for name, route in pages(summary).items():
            png = out_dir / f"{name}.png"
            if name == COMPARE_PAGE:  # wide enough for every headline column
                browser_.set_local_storage(table_state(summary["experiment_id"], summary["parent_run_id"]))
                browser_.resize(*COMPARE_WINDOW)
            browser_.open(ui.url + route)
            browser_.click_text("Show more")  # a run's whole description, not its first lines
            browser_.screenshot(png)
            written.append(png)
            print(f"{png}  <- {ui.url}{route}", flush=True)
    return written
