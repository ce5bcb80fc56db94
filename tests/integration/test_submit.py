"""`mvit submit` / `mvit jobs` against a separate local Ray head with its job server and Ray's token auth.

The head is NOT the session's embedded Ray (`ray_session`): its own temp dir, ports and process group,
started with RAY_AUTH_MODE unset so Ray turns token auth on as it does for any local cluster (>= 2.59); the
token lives in a file named by RAY_AUTH_TOKEN_PATH, so nothing is written to ~/.ray. It is stopped by
killing its process group and session, never with `ray stop` (which stops every Ray on the machine).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from pipelines import stack as local_stack
from pipelines.artifact import checkpoint_file
from pipelines.data import storage
from pipelines.data.shards import read_manifest
from pipelines.raycluster import runtime_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# A prefix of its own: preprocessing names its scratch dirs after the output URI, which must not be the same
# as that of a concurrent test session on this machine (with its own S3 server).
PREFIX = f"s3://mvit/submit-{uuid.uuid4().hex[:8]}"
DATASET = f"{PREFIX}/dataset"
RUNS = f"{PREFIX}/runs"
TINY_TRAIN = [
    "model=mvit_debug", "epochs=1", "batch_size=4", "num_workers=2", "log_every_steps=2", "clip.num_frames=8",
    "clip.sampling_rate=2", "clip.crop_size=32", "clip.train_crop=random", "clip.horizontal_flip=false",
    "optim.lr=1e-3", "optim.lr_batch=16", "optim.warmup_epochs=1", "mlflow.experiment=submit-it",
]


def _http_status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _stop_head(proc: subprocess.Popen) -> None:
    session = os.getsid(proc.pid) if proc.poll() is None else proc.pid
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):  # a throwaway head: no graceful drain needed
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Ray workers of this head that left its process group but not its session
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and os.getsid(p.pid) == session:
                p.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def ray_head(services, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rayhead")
    token_file = tmp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    # Ray's unix socket paths must stay short: its temp dir goes straight under /tmp.
    temp_dir = Path(tempfile.mkdtemp(prefix="mvit-rayhead-", dir="/tmp"))
    dashboard = local_stack.free_port()
    # The head's environment holds the local S3 server's (dummy) credentials, as a cluster node holds its own.
    head_env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    head_env.update(RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={local_stack.free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={local_stack.free_port()}", f"--dashboard-agent-listen-port={local_stack.free_port()}",
        f"--temp-dir={temp_dir}", "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats",
    ]
    log = tmp / "head.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=head_env, cwd=tmp,
                                start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    bearer = {"Authorization": f"Bearer {token_file.read_text()}"}
    saved_token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    try:
        deadline = time.monotonic() + 180
        while _http_status(f"{address}/api/jobs/", bearer) != 200:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the head's job server did not come up:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        # The client side, as a user runs it: the Makefile's RAY_AUTH_MODE=disabled (meant for the embedded
        # Ray) stays set; the token comes from RAY_AUTH_TOKEN_PATH, for the subprocess and the in-process calls.
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
        client_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        client_env["RAY_AUTH_MODE"] = "disabled"
        yield {"address": address, "token_file": token_file, "env": client_env, "log": log}
    finally:
        if saved_token_path is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = saved_token_path
        _stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def mvit(args: list[str], env: dict, timeout: float = 420) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    print(f"$ mvit {' '.join(args[:6])} ... -> {result.returncode} in {time.monotonic() - started:.1f}s")
    return result


def job_status(mvit_in_process, head, job_id: str) -> dict:
    _, out, _ = mvit_in_process(["jobs", "status", job_id, "--address", head["address"], "--json"])
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def submitted(ray_head, raw_videos_s3, mvit_in_process):
    """`mvit preprocess` through `mvit submit --follow` (the real command, in its own process); then `mvit
    train` submitted without following, a failing job followed while it trains, and the train job waited
    for with `mvit jobs logs --follow` (these in this process: the same code, without the command's start-up)."""
    head = ray_head
    pre = mvit(["submit", "--address", head["address"], "--follow", "--", "preprocess",
                f"source={raw_videos_s3['csv']}", f"output={DATASET}", "short_side=36", "fps=0",
                "max_samples_per_shard=16"], head["env"])
    assert pre.returncode == 0, pre.stderr[-4000:]
    code, out, err = mvit_in_process(["submit", "--address", head["address"], "--", "train", f"dataset={DATASET}",
                                      f"storage_path={RUNS}", *TINY_TRAIN])
    assert code == 0, err[-4000:]
    train_id = out.strip().splitlines()[-1]
    failing = mvit_in_process(["submit", "--address", head["address"], "--follow", "--", "train",
                               f"dataset={PREFIX}/not-a-dataset", f"storage_path={RUNS}", *TINY_TRAIN])
    code, logs, err = mvit_in_process(["jobs", "logs", train_id, "--address", head["address"], "--follow"])
    return {"pre": pre, "pre_id": pre.stdout.strip().splitlines()[0], "train_id": train_id,
            "train_exit": code, "train_logs": logs, "train_err": err, "failing": failing}


def test_preprocess_job_writes_the_dataset_to_s3(submitted, ray_head, raw_videos_s3, services, mvit_in_process):
    manifest = read_manifest(DATASET)
    assert manifest.splits == {"train": raw_videos_s3["train"], "val": raw_videos_s3["val"]}
    assert manifest.quarantined == raw_videos_s3["missing"]
    assert job_status(mvit_in_process, ray_head, submitted["pre_id"])["status"] == "SUCCEEDED"
    # the job ran this checkout's code from the uploaded working dir, with the storage settings forwarded
    out, err = submitted["pre"].stdout, submitted["pre"].stderr
    assert "python -m pipelines.cli preprocess" in err
    forwarded = sorted(k for k in runtime_env()["env_vars"])
    assert "MLFLOW_TRACKING_URI" in forwarded and "AWS_ENDPOINT_URL" in forwarded
    assert f"[submit] env forwarded (names only): {', '.join(forwarded)};" in err  # the names ...
    submit_lines = [line for line in err.splitlines() if line.startswith("[submit]")]
    for name in forwarded:  # ... never the values (those long enough not to occur by chance)
        value = runtime_env()["env_vars"][name]
        assert len(value) < 8 or not [line for line in submit_lines if value in line], name
    assert not [line for line in submit_lines if os.environ["AWS_SECRET_ACCESS_KEY"] in line]
    assert '"num_samples": 80' in out  # the stage's result line, streamed by --follow


def train_result(submitted) -> dict:
    """The train job's result: the last JSON line of its log that names a checkpoint (keys are sorted)."""
    lines = [line for line in submitted["train_logs"].splitlines() if line.startswith("{")]
    return next(r for r in map(json.loads, reversed(lines)) if "checkpoint" in r and "mlflow_run_id" in r)


def test_train_job_writes_a_checkpoint_and_succeeds(submitted, ray_head, services, mvit_in_process):
    assert submitted["train_exit"] == 0, submitted["train_err"][-3000:]
    result = train_result(submitted)
    assert result["checkpoint"].startswith(f"{RUNS}/")
    assert storage.exists(checkpoint_file(result["checkpoint"]))
    assert job_status(mvit_in_process, ray_head, submitted["train_id"])["status"] == "SUCCEEDED"
    _, out, _ = mvit_in_process(["jobs", "list", "--address", ray_head["address"], "--json"])
    statuses = {job["submission_id"]: job["status"] for job in json.loads(out.strip().splitlines()[-1])}
    assert statuses[submitted["pre_id"]] == statuses[submitted["train_id"]] == "SUCCEEDED"


def test_failing_job_exits_non_zero_with_its_log_tail(submitted, ray_head, mvit_in_process):
    code, out, err = submitted["failing"]
    assert code == 1
    job_id = out.strip().splitlines()[0]
    assert f"job {job_id} FAILED" in err
    tail = err.split("--- last lines of its log ---", 1)[1]
    assert f"dataset {PREFIX}/not-a-dataset does not exist" in tail  # a missing path is named as missing
    code, out, _ = mvit_in_process(["jobs", "status", job_id, "--address", ray_head["address"]])
    assert code == 1 and "FAILED" in out


def test_requests_without_the_right_token_are_refused(ray_head, tmp_path, mvit_in_process, monkeypatch):
    # no token anywhere (not in the environment, no ~/.ray/auth_token under this HOME)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, _, err = mvit_in_process(["jobs", "list", "--address", ray_head["address"]])
    assert code == 1
    assert "refused the request" in err and "RAY_AUTH_TOKEN" in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    code, _, err = mvit_in_process(["jobs", "list", "--address", ray_head["address"]])
    assert code == 1 and "Authentication failed" in err


def test_workflow_stage_runs_as_a_ray_job(submitted, ray_head, services):
    """The workflow's cluster mode: the evaluate asset's stage as a job on the head, result read back."""
    from pipelines.workflow.config import load_workflow_config
    from pipelines.workflow.launch import run_as_ray_job

    trained = train_result(submitted)
    cfg = load_workflow_config(REPO / "configs" / "workflow.yaml",
                               [f"workflow.ray_address={ray_head['address']}", f"workflow.dataset={DATASET}",
                                "evaluate.temporal_views=1"])
    evaluate_cfg = dataclasses.replace(cfg.evaluate, checkpoint=trained["checkpoint"],
                                       mlflow_run_id=trained["mlflow_run_id"])
    report = run_as_ray_job("evaluate", evaluate_cfg, cfg.settings)
    assert report.checkpoint == trained["checkpoint"] and report.videos == 16
    assert report.dataset_digest == read_manifest(DATASET).digest()
    import mlflow

    metrics = mlflow.MlflowClient(services.mlflow_uri).get_run(trained["mlflow_run_id"]).data.metrics
    assert metrics["eval/val/top1"] == pytest.approx(report.top1)
