"""The quiet console of `clipflow run`: library noise to the log file, one line per stage start and end,
one message naming the failed stage and the log; the stages' side of the channel (progress, end lines)."""

import io
import json
import subprocess
import sys
import textwrap

from components.common import console
from components.common.progress import Progress
from pipelines.run_console import RunConsole

# A stand-in for kfp.local's task processes: library noise on stdout and stderr, a progress bar, a stage
# that ends with its key figures and one that fails.
STAGES = textwrap.dedent("""
    import sys
    from components.common.console import finished, run_stage
    from components.common.progress import Progress

    def work(n):
        for i in range(200):
            print(f"(RayTrainWorker pid={i}) noise line {i}")
            print(f"WARNING noise on stderr {i}", file=sys.stderr)
        progress = Progress(n, "records", label="filter")
        for _ in range(n):
            progress.update(1)
        progress.close()
        finished("filter", "kept 5 of 6 pairs")

    def broken():
        raise ValueError("source_uri /nowhere does not exist\\nmore detail on a second line")

    run_stage("filter", work, {"n": 50})
    run_stage("shard", broken, {})
""")


def _run(tmp_path, code: str):
    out = io.StringIO()
    with RunConsole(tmp_path, out=out) as run_console:
        print("parent noise")  # this process's own output goes to the log too
        done = subprocess.run([sys.executable, "-c", code])
    return out.getvalue(), run_console, done


def test_quiet_console_shows_stage_lines_and_logs_the_rest(tmp_path):
    shown, run_console, done = _run(tmp_path, STAGES)
    assert done.returncode == 1
    lines = shown.splitlines()
    assert lines[0].startswith("- filter") and "started" in lines[0]
    assert lines[1].startswith("+ filter") and lines[1].endswith("kept 5 of 6 pairs")
    assert lines[2].startswith("- shard")
    assert lines[3].startswith("x shard") and lines[3].endswith("ValueError: source_uri /nowhere does not exist")
    assert len(lines) == 4, shown
    assert "noise" not in shown
    log = run_console.log_path.read_text()
    assert log.count("noise line") == 200 and log.count("noise on stderr") == 200 and "parent noise" in log
    assert "more detail on a second line" in log, "the whole traceback is in the log"
    assert "[filter] 50/50 records" in log, "progress lines go to the log"
    assert run_console.log_path.parent == tmp_path.resolve() / "logs"


def test_a_failure_is_one_message_naming_the_stage_and_the_log(tmp_path):
    _, run_console, _ = _run(tmp_path, STAGES)
    message = run_console.failure(RuntimeError("Pipeline 'clip-pretraining' finished with status FAILURE"))
    assert message.splitlines() == ["clipflow run failed in stage shard: ValueError: source_uri /nowhere does not "
                                    "exist", f"  full log: {run_console.log_path}"]


def test_a_retried_stage_says_so(tmp_path):
    retried = textwrap.dedent("""
        from components.common.console import run_stage

        def broken():
            raise ValueError("no files found")

        for attempt in range(2):  # kfp.local runs a failed task again when it has retries
            try:
                run_stage("filter", broken, {})
            except ValueError:
                pass
    """)
    shown, _, _ = _run(tmp_path, retried)
    lines = [line.rsplit(" ", 1)[0] if line.startswith("-") else line for line in shown.splitlines()]
    assert lines == ["- filter    started", "x filter    FAILED after 0:00: ValueError: no files found",
                     "- filter    started again (retry 1)", "x filter    FAILED after 0:00: ValueError: no files found"]


def test_a_task_that_dies_without_saying_is_named_from_kfps_error(tmp_path):
    _, run_console, _ = _run(tmp_path, "import os; os._exit(3)")
    kfp_error = RuntimeError("Pipeline \x1b[95m'clip-pretraining'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m. "
                             "Inner task failed: \x1b[96m'train'\x1b[0m inside \x1b[96m'exit-handler-1'\x1b[0m.")
    assert run_console.failure(kfp_error).startswith("clipflow run failed in stage train: RuntimeError: Pipeline")


def test_verbose_console_shows_everything_and_logs_it(tmp_path):
    out = io.StringIO()
    with RunConsole(tmp_path, verbose=True, out=out) as run_console:
        subprocess.run([sys.executable, "-c", STAGES])
    shown = out.getvalue()
    assert shown.count("noise line") == 200 and "[filter] finished: kept 5 of 6 pairs" in shown
    assert run_console.log_path.read_text().count("noise line") == 200


def test_progress_and_stage_events_on_the_channel(tmp_path, monkeypatch, capsys):
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(console.CHANNEL_ENV, str(events))
    progress = Progress(10, "steps", label="train")
    for _ in range(10):
        progress.update(1, loss=0.5)
    progress.close(loss=0.25)
    console.finished("train", "10 steps, final loss 0.250")
    sent = [json.loads(line) for line in events.read_text().splitlines()]
    bars = [e for e in sent if e["kind"] == "progress"]
    assert bars[0]["done"] >= 1 and bars[0]["total"] == 10 and bars[0]["label"] == "train"
    assert bars[-1]["closed"] and bars[-1]["done"] == 10 and bars[-1]["postfix"] == "loss=0.25"
    assert len(bars) <= 4, "updates are throttled"
    assert sent[-1] == {**sent[-1], "kind": "stage", "stage": "train", "state": "finished",
                        "text": "10 steps, final loss 0.250"}
    printed = capsys.readouterr().out
    assert "[train] 10/10 steps" in printed and "[train] finished: 10 steps" in printed, "the log gets plain lines"


def test_without_a_channel_stages_print_plain_lines(monkeypatch, capsys):
    monkeypatch.delenv(console.CHANNEL_ENV, raising=False)
    assert not console.emit({"kind": "line", "text": "x"})
    console.run_stage("export", lambda: console.finished("export", "parity 1e-7"), {})
    assert capsys.readouterr().out.splitlines() == ["[export] started", "[export] finished: parity 1e-7"]


def _missing_bucket_error(endpoint: str) -> BaseException:
    """What reading a shard from a bucket that does not exist raises (the project's storage, a real S3
    server on loopback)."""
    import pytest

    from components.common import storage

    with pytest.raises(storage.StorageError) as info:
        storage.read_text("s3://clipdata-missing/shards/train-000000.tar")
    return info.value


def test_a_wrapped_failure_says_its_root_cause(s3_server, tmp_path):
    """Ray Train's WorkerGroupError (a worker's error, wrapped with its traceback), an exception group and a
    chained error: the console line is the root cause's type and message, naming the bucket and endpoint."""
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    cause = _missing_bucket_error(s3_server)
    worker = UserExceptionWithTraceback(cause, "Traceback (most recent call last):\n  ...\n")
    wrapped = {
        "WorkerGroupError": WorkerGroupError("[Rank 1]\nTraceback ...", {1: worker}),
        "ControllerError": ControllerError(cause),
        "ExceptionGroup": ExceptionGroup("shards failed", [cause, ValueError("later")]),
    }
    try:
        try:
            raise cause
        except OSError as e:
            raise RuntimeError() from e  # a wrapper with nothing to say
    except RuntimeError as e:
        wrapped["RuntimeError"] = e
    assert console.error_line(cause).startswith("BucketNotFound: "), "not botocore's NoSuchBucket it came from"
    for outer, exc in wrapped.items():
        line = console.error_line(exc)
        assert line.startswith(f"{type(cause).__name__}: ") and line.endswith(f"(via {outer})"), line
        assert "clipdata-missing" in line and s3_server in line, line
    assert "\n" not in console.error_line(wrapped["WorkerGroupError"])

    code = f"""
import pickle, sys
from components.common.console import run_stage
exc = pickle.loads({__import__("pickle").dumps(wrapped["WorkerGroupError"])!r})
def train():
    raise exc
run_stage("train", train, {{}})
"""
    shown, run_console, done = _run(tmp_path, code)
    assert done.returncode == 1
    (failed,) = [line for line in shown.splitlines() if line.startswith("x train")]
    assert "BucketNotFound: " in failed and "clipdata-missing" in failed and s3_server in failed, failed
    assert run_console.failure(RuntimeError("Inner task failed: 'train'")).startswith(
        "clipflow run failed in stage train: BucketNotFound: ")


def test_start_run_and_finish_run_say_only_their_failure(tmp_path):
    """The tasks around the stages draw no start and end lines, but their failure, and the run's failure
    message names the first stage that failed (not the exit handler that failed after it)."""
    code = textwrap.dedent("""
        from components.common.console import run_stage

        def preflight():
            raise RuntimeError("preflight: the data root is not usable: cannot connect to endpoint http://127.0.0.1:9")

        def close():
            raise ConnectionError("MLflow tracking server http://127.0.0.1:5000 cannot be reached")

        run_stage("start-run", lambda: "ok", {}, announce=False)
        for stage, fn in (("start-run", preflight), ("finish-run", close)):
            try:
                run_stage(stage, fn, {}, announce=False)
            except Exception:
                pass
    """)
    shown, run_console, _ = _run(tmp_path, code)
    assert shown.splitlines() == [
        "x start-run FAILED: RuntimeError: preflight: the data root is not usable: cannot connect to endpoint "
        "http://127.0.0.1:9",
        "x finish-run FAILED: ConnectionError: MLflow tracking server http://127.0.0.1:5000 cannot be reached"]
    assert run_console.failure(RuntimeError("x")).splitlines()[0] == (
        "clipflow run failed in stage start-run: RuntimeError: preflight: the data root is not usable: cannot "
        "connect to endpoint http://127.0.0.1:9")


def test_a_note_reaches_the_console(tmp_path):
    shown, _, _ = _run(tmp_path, "from components.common.console import note\n"
                                 "note('train', 'restarted from step 20 (attempt 2) after: RuntimeError: boom')")
    assert shown.splitlines() == ["! train     restarted from step 20 (attempt 2) after: RuntimeError: boom"]
