"""`mvit stack up|down|status`: an S3-compatible server (moto) and an MLflow tracking server on
127.0.0.1, free ports, each in its own process group, for development and for the test suite.

State (pids, ports, logs, the MLflow SQLite store) lives under one state dir; `down` kills whole
process groups, because `mlflow server` forks workers that outlive a plain kill of its parent.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "stack.json"
# moto accepts any credentials; these are dummies for the local server only.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
DATA_BUCKET = "mvit"
ARTIFACT_BUCKET = "mlflow"


@dataclass
class StackInfo:
    state_dir: str
    s3_endpoint: str
    mlflow_uri: str
    s3_pid: int
    mlflow_pid: int
    data_bucket: str = DATA_BUCKET

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            **LOCAL_CREDENTIALS,
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}; see {log}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    raise RuntimeError(f"server for {url} did not answer within {timeout:.0f}s; see {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    handle = open(log, "ab")
    # start_new_session: the server and every child it forks share one process group we can kill.
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def status(state_dir: Path) -> StackInfo | None:
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    info = StackInfo(**json.loads(path.read_text()))
    return info if _alive(info.s3_pid) and _alive(info.mlflow_pid) else None


def up(state_dir: Path, artifacts: str = "s3", timeout: float = 90.0) -> StackInfo:
    state_dir = Path(state_dir).absolute()
    running = status(state_dir)
    if running:
        return running
    down(state_dir)  # clear what a half-dead earlier stack left
    state_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **LOCAL_CREDENTIALS}
    env.pop("MLFLOW_TRACKING_URI", None)
    # The server's background job runner (huey workers) serves no purpose here and costs ~6 processes.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"

    s3_port = free_port()
    s3_endpoint = f"http://127.0.0.1:{s3_port}"
    s3_log = state_dir / "s3.log"
    s3 = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], s3_log, env)
    try:
        _wait_http(f"{s3_endpoint}/moto-api/", timeout, s3, s3_log)
        import boto3

        client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        for bucket in (DATA_BUCKET, ARTIFACT_BUCKET):
            client.create_bucket(Bucket=bucket)

        mlflow_port = free_port()
        mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        if artifacts == "s3":
            destination = f"s3://{ARTIFACT_BUCKET}/artifacts"
            env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
        else:
            destination = str(state_dir / "mlflow-artifacts")
        mlflow_log = state_dir / "mlflow.log"
        mlflow = _spawn(
            [
                sys.executable, "-m", "mlflow", "server",
                "--host", "127.0.0.1", "--port", str(mlflow_port),
                "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
                "--artifacts-destination", destination,
                "--workers", "1",
            ],
            mlflow_log,
            env,
        )
    except BaseException:
        _kill_group(s3.pid)
        raise
    info = StackInfo(str(state_dir), s3_endpoint, mlflow_uri, s3.pid, mlflow.pid)
    (state_dir / STATE_FILE).write_text(json.dumps(asdict(info), indent=1))
    try:
        _wait_http(f"{mlflow_uri}/health", timeout, mlflow, mlflow_log)
    except BaseException:
        down(state_dir)
        raise
    return info


def _kill_group(pid: int, grace: float = 5.0) -> bool:
    try:
        pgid = os.getpgid(pid)
    except OSError:
        return False
    try:
        os.killpg(pgid, signal.SIGTERM)
    except OSError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except OSError:
            return True
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    return True


def down(state_dir: Path) -> list[str]:
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return []
    info = StackInfo(**json.loads(path.read_text()))
    stopped = [name for name, pid in (("mlflow", info.mlflow_pid), ("s3", info.s3_pid)) if _kill_group(pid)]
    path.unlink()
    return stopped


def export_lines(info: StackInfo) -> str:
    lines = [f"export {key}={value}" for key, value in info.env().items()]
    lines.append(f"# MLflow UI: {info.mlflow_uri}   data bucket: s3://{info.data_bucket}")
    return "\n".join(lines)
