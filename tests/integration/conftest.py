"""Session fixtures: ONE local S3 server + MLflow server (`mvit stack`) and ONE Ray instance for the
whole integration suite; both are torn down (process groups killed) at the end of the session."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import boto3
import pytest

from pipelines import stack as local_stack
from pipelines.data.synthetic import SyntheticSpec, class_names, generate


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    info = local_stack.up(state)
    saved = {k: os.environ.get(k) for k in info.env()}
    os.environ.update(info.env())
    yield info
    local_stack.down(state)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_session(services):
    import ray

    from pipelines.raycluster import runtime_env

    # 4 logical CPUs on a 2-core machine: 2 training workers plus Ray Data / Train bookkeeping. The
    # dashboard serves the state API Ray Train polls; its own free port keeps parallel sessions apart.
    # address="local": our own instance, not a cluster another session `ray start`-ed on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_port=local_stack.free_port(),
             runtime_env=runtime_env(embedded=True))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(services):
    return boto3.client("s3", endpoint_url=services.s3_endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def raw_videos_s3(services, s3, tmp_path_factory) -> dict:
    """8 classes x 10 synthetic videos uploaded to s3://mvit/raw/, with a CSV that fixes the split
    (8 train + 2 val per class) and one extra row pointing at a file that does not exist."""
    local = tmp_path_factory.mktemp("raw")
    spec = SyntheticSpec(classes=8, videos_per_class=10, frames=16, size=48, seed=1)
    generate(local, spec)
    rows = []
    for name in class_names(spec.classes):
        for i, path in enumerate(sorted((local / name).glob("*.mp4"))):
            key = f"raw/{name}/{path.name}"
            s3.upload_file(str(path), "mvit", key)
            rows.append((f"{name}/{path.name}", name, "val" if i >= 8 else "train"))
    rows.append(("left_speed1/does_not_exist.mp4", "left_speed1", "train"))
    csv_path = local / "labels_with_split.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    s3.upload_file(str(csv_path), "mvit", "raw/labels.csv")
    return {"csv": "s3://mvit/raw/labels.csv", "train": 64, "val": 16, "missing": 1, "local": Path(local)}


# ---- Workflow, cluster and UI fixtures (issue 5) ------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_CONFIG = REPO / "configs" / "workflow.yaml"
WORKFLOW_ASSETS = ("raw_videos", "dataset", "checkpoint", "evaluation", "registered_model")


class _Tee(io.TextIOBase):
    """Write to several streams: keep a command's output for assertions and still show it in pytest's log."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def run_mvit(args) -> tuple[int, str, str]:
    """`mvit ARGS` in this process (so it uses the session's Ray and servers): (exit code, stdout, stderr)."""
    from pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(_Tee(out, sys.stdout)), redirect_stderr(_Tee(err, sys.stderr)):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def last_json_line(text: str, key: str) -> dict:
    """The last line of `text` that is a JSON object holding `key` (a command's result line)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and key in value:
                return value
    raise AssertionError(f"no JSON line with {key!r} in the output:\n{text[-2000:]}")


def dagster_counts(dagster_home: Path) -> dict:
    """From Dagster's event log: materializations per asset, and the number of runs."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        counts = {key: len(instance.fetch_materializations(dg.AssetKey(key), limit=1000).records)
                  for key in WORKFLOW_ASSETS}
        counts["runs"] = instance.get_runs_count()
    return counts


@pytest.fixture(scope="session")
def synthetic_workflow(services, ray_session, tmp_path_factory) -> dict:
    """`mvit workflow run` on one tiny synthetic set (4 classes x 8 videos, mvit_debug, 1 epoch; shards and
    checkpoints on the session's S3, runs in its MLflow) three times against one Dagster home: first, again
    unchanged, then with one training key changed. Each invocation's summary line, wall time and
    Dagster's materialization counts after it are kept for the tests."""
    state = tmp_path_factory.mktemp("workflow")
    # A prefix of its own: preprocessing names its scratch dirs after the output URI, which must not be the
    # same as that of a concurrent test session on this machine (with its own S3 server).
    prefix = f"s3://mvit/wf-{uuid.uuid4().hex[:8]}"
    base = [
        WORKFLOW_CONFIG, f"workflow.state_dir={state}", f"workflow.dataset={prefix}/dataset",
        f"workflow.storage_path={prefix}/runs", "workflow.synthetic.classes=4",
        "workflow.synthetic.videos_per_class=8", "preprocess.max_samples_per_shard=8", "train.epochs=1",
        "train.batch_size=4", "train.mlflow.experiment=workflow-it", "register.model_name=workflow-it",
    ]
    invocations = {}
    for name, extra in (("first", []), ("unchanged", []), ("train_key_changed", ["train.optim.lr=2e-3"])):
        started = time.monotonic()
        code, out, err = run_mvit(["workflow", "run", *base, *extra])
        seconds = time.monotonic() - started
        assert code == 0, f"`mvit workflow run` ({name}) exited {code}:\n{err[-3000:]}"
        invocations[name] = {"summary": last_json_line(out, "materialized"), "seconds": seconds,
                             "counts": dagster_counts(state / "dagster")}
        print(f"[synthetic_workflow] {name}: {seconds:.1f}s, materialized {invocations[name]['summary']['materialized']}")
    return {"state": state, "base": base, "dagster_home": state / "dagster", "invocations": invocations,
            "dataset": f"{prefix}/dataset"}


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium from Debian (`chromium`, `chromium-driver`), installed when it is missing."""
    found = shutil.which("chromium")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:  # stale or missing package lists: refresh once, then retry
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=900)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"`{' '.join(install)}` failed (run it as root):\n{result.stderr[-2000:]}"
    found = shutil.which("chromium")
    assert found, "chromium was installed but is not on PATH"
    return found


class BackgroundTraining:
    """A training job (`pipelines.train.job.run`) in a thread of the test process, so that the test can
    kill its workers meanwhile; `result` joins it and re-raises what the job raised."""

    def __init__(self, cfg):
        self.outcome: dict = {}
        self.thread = threading.Thread(target=self._fit, args=(cfg,))
        self.thread.start()

    def _fit(self, cfg) -> None:
        from pipelines.train.job import run

        try:
            self.outcome["result"] = run(cfg)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread by result()
            self.outcome["error"] = exc

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def result(self, timeout: float):
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), f"training still running after {timeout}s"
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["result"]


@pytest.fixture(scope="session")
def training_in_background():
    """BackgroundTraining: start a training job in a thread, kill its workers, then take its result."""
    return BackgroundTraining


@pytest.fixture(scope="session")
def mvit_in_process():
    """run_mvit: `mvit ARGS` in the test process -> (exit code, stdout, stderr)."""
    return run_mvit


@pytest.fixture(scope="session")
def workflow_event_counts():
    """dagster_counts: materializations per asset (and runs) in a Dagster home's event log."""
    return dagster_counts
