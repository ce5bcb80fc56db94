"""No credential in anything the stages write or print (issue 15, acceptance 2).

Recognizable fake secrets (AWS keys, which the local S3 server accepts; an MLflow password in the tracking
URI and another in MLFLOW_TRACKING_PASSWORD; a Ray token) are set while preprocess, train, evaluate and
register run against a real MLflow server with basic authentication (`mlflow server --app-name
basic-auth`: it refuses a wrong password, so the credentials must also reach the Ray training workers).
Then every byte they printed, every object under their storage paths, the Ray session's logs, the MLflow
runs' params/tags/metrics/artifacts and the registered model are searched for the secrets.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest

from pipelines import tracking
from pipelines.data import storage
from pipelines.data.synthetic import SyntheticSpec, generate
from pipelines.stack import free_port

# one test runs all four stages: more than the suite's 600 s on a busy 2-core machine
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

URI_PASSWORD = "uriPASS-fake-7c1e0b"  # admin's, written into the tracking URI
ENV_PASSWORD = "envPASS-fake-93ad4f"  # bob's, in MLFLOW_TRACKING_PASSWORD
AWS_KEY_ID = "AKIAFAKETRUST15KEYID"
AWS_SECRET = "awsSECRET-fake-5b2e9d"
RAY_TOKEN = "rayTOKEN-fake-1f7a3c"
SECRETS = (URI_PASSWORD, ENV_PASSWORD, AWS_KEY_ID, AWS_SECRET, RAY_TOKEN)


def _forms(secret: str) -> list[bytes]:
    """A secret as it could appear: plain, or inside the Basic auth header of either user."""
    forms = [secret.encode()]
    for user in ("admin", "bob"):
        forms.append(base64.b64encode(f"{user}:{secret}".encode()))
    return forms


def leaks(data: bytes | str) -> list[str]:
    data = data.encode() if isinstance(data, str) else data
    return [secret for secret in SECRETS if any(form in data for form in _forms(secret))]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on a free loopback port: admin (URI_PASSWORD) and bob
    (ENV_PASSWORD), every user allowed everything (default_permission MANAGE)."""
    state = tmp_path_factory.mktemp("auth-mlflow")
    ini = state / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = MANAGE\ndatabase_uri = sqlite:///{state / 'users.db'}\n"
                   f"admin_username = admin\nadmin_password = {URI_PASSWORD}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = state / "server.log"
    with log.open("wb") as handle:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port",
             str(port), "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}", "--artifacts-destination",
             str(state / "artifacts"), "--workers", "1"],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"the basic-auth MLflow server did not start:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
        admin = base64.b64encode(f"admin:{URI_PASSWORD}".encode()).decode()
        create = urllib.request.Request(
            f"{base}/api/2.0/mlflow/users/create", data=json.dumps({"username": "bob", "password": ENV_PASSWORD}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Basic {admin}"})
        urllib.request.urlopen(create, timeout=30).close()
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture
def secret_env(monkeypatch):
    """The fake secrets in the environment; everything `tracking.connect` sets is undone afterwards."""
    from pipelines.data.storage import _client

    for name in ("MLFLOW_TRACKING_URI", *tracking.CREDENTIAL_ENV):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TOKEN)
    _client.cache_clear()  # S3 clients are cached with the credentials they were made with
    yield monkeypatch
    _client.cache_clear()


def test_no_secret_in_anything_the_stages_write_or_print(auth_server, services, ray_session, secret_env, capfd,
                                                         mvit_in_process, tmp_path):
    import ray

    started = time.time()
    host = auth_server.split("//")[1]
    prefix = f"s3://mvit/secrets-{uuid.uuid4().hex[:8]}"
    generate(tmp_path / "videos", SyntheticSpec(classes=2, videos_per_class=6, frames=8, size=32))
    for path in sorted((tmp_path / "videos").rglob("*.*")):
        storage.upload_file(path, f"{prefix}/raw/{path.relative_to(tmp_path / 'videos')}")
    printed = []

    def mvit(*args, expect: int = 0) -> str:
        code, out, err = mvit_in_process(list(args))
        printed.append(out + err)
        assert code == expect, err[-3000:]
        return out

    mvit("preprocess", f"source={prefix}/raw/labels.csv", f"output={prefix}/dataset", "fps=0", "val_fraction=0.3",
         "max_samples_per_shard=2")
    # train: admin's password in the tracking URI, both in the config and in MLFLOW_TRACKING_URI
    admin_uri = f"http://admin:{URI_PASSWORD}@{host}"
    secret_env.setenv("MLFLOW_TRACKING_URI", admin_uri)
    small = ["model=mvit_debug", "epochs=1", "batch_size=1", "num_workers=2", "clip.num_frames=4",
             "clip.sampling_rate=1", "clip.crop_size=32", "clip.train_crop=random", "mlflow.experiment=secrets"]
    result = json.loads(mvit("train", f"dataset={prefix}/dataset", f"storage_path={prefix}/runs",
                             f"mlflow.tracking_uri={admin_uri}", *small).strip().splitlines()[-1])
    assert result["tracking_uri"] == auth_server
    # evaluate, register: bob, with MLflow's own variables
    secret_env.setenv("MLFLOW_TRACKING_URI", auth_server)
    secret_env.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    secret_env.setenv("MLFLOW_TRACKING_PASSWORD", ENV_PASSWORD)
    run = [f"checkpoint={result['checkpoint']}", f"mlflow_run_id={result['mlflow_run_id']}"]
    mvit("evaluate", f"dataset={prefix}/dataset", *run)
    registered = json.loads(mvit("register", f"dataset={prefix}/dataset", "model_name=secrets-it", *run)
                            .strip().splitlines()[-1])
    assert registered["promoted"] and registered["tracking_uri"] == auth_server
    # the errors of a server that does not answer, and of one that refuses the password
    dead = f"127.0.0.1:{free_port()}"
    mvit("train", f"dataset={prefix}/dataset", f"storage_path={prefix}/runs",
               f"mlflow.tracking_uri=http://admin:{URI_PASSWORD}@{dead}", *small, expect=1)
    assert f"http://{dead} does not answer" in printed[-1]
    secret_env.setenv("MLFLOW_TRACKING_USERNAME", "bob")  # the URI above made this process admin
    secret_env.setenv("MLFLOW_TRACKING_PASSWORD", f"{ENV_PASSWORD}-wrong")
    mvit("evaluate", f"dataset={prefix}/dataset", *run, expect=1)
    assert "refused the credentials of user 'bob' (HTTP 401)" in printed[-1]

    # --- search everything for the secrets ---------------------------------------------------------------
    captured = capfd.readouterr()
    found = {"printed": leaks("".join(printed) + captured.out + captured.err)}
    for uri, _ in storage.list_files(prefix):
        found[uri] = leaks(storage.read_bytes(uri))
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_mtime >= started - 1:
            found[str(path)] = leaks(path.read_bytes())
    secret_env.setenv("MLFLOW_TRACKING_PASSWORD", ENV_PASSWORD)
    client = mlflow.MlflowClient(auth_server)
    for experiment in client.search_experiments():
        for run_info in client.search_runs([experiment.experiment_id]):
            data = run_info.data
            found[f"run {run_info.info.run_id} params/tags/metrics"] = leaks(json.dumps(
                [data.params, data.tags, sorted(data.metrics)]) + run_info.info.artifact_uri)
            local = mlflow.artifacts.download_artifacts(run_id=run_info.info.run_id, dst_path=str(tmp_path / run_info.info.run_id),
                                                        tracking_uri=auth_server)
            for path in Path(local).rglob("*"):
                if path.is_file():
                    found[f"artifact {path.relative_to(tmp_path)}"] = leaks(path.read_bytes())
    model = client.get_registered_model("secrets-it")
    versions = client.search_model_versions("name='secrets-it'")
    found["registered model"] = leaks(json.dumps([model.tags, model.description or "", model.aliases]) + json.dumps(
        [[v.tags, v.source, v.run_link or "", v.description or ""] for v in versions]))
    with tracking.fluent(auth_server):
        local = mlflow.artifacts.download_artifacts(registered["model_uri"], dst_path=str(tmp_path / "model"))
    files = [path for path in Path(local).rglob("*") if path.is_file()]
    assert any(path.name == "model.pt" for path in files)  # the slim checkpoint was searched too
    for path in files:
        found[f"model file {path.relative_to(tmp_path)}"] = leaks(path.read_bytes())

    assert len(found) > 20, sorted(found)  # storage objects, logs, runs and model files were all searched
    assert {where: secrets for where, secrets in found.items() if secrets} == {}
