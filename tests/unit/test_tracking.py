"""MLflow plumbing without a server: the scoped fluent URI, the local default store, and the tracking
server's credentials (pipelines/tracking.py, pipelines/config.py): moved out of the URI into MLflow's
variables, never printed, stored or forwarded; the health check authenticates."""

from __future__ import annotations

import base64
import http.server
import json
import os
import threading
from dataclasses import dataclass

import mlflow
import pytest

from pipelines import tracking
from pipelines.config import StageResult, redact, split_credentials
from pipelines.stack import free_port

SECRET = "pa:ss@w0rd-FAKE"  # ':' and '@' must survive percent-escaping
QUOTED = "pa%3Ass%40w0rd-FAKE"


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", *tracking.CREDENTIAL_ENV):
        monkeypatch.setenv(name, "")  # recorded, so what `connect` sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.mlflow/credentials of the machine


@pytest.fixture
def auth_server():
    """A stub of an MLflow server with basic auth: /health open, the API only for alice:SECRET."""
    expected = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            ok = self.path == "/health" or self.headers.get("Authorization") == expected
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_split_and_redact_uri_credentials():
    uri = f"http://alice:{QUOTED}@mlflow.internal:5000/base"
    assert split_credentials(uri) == ("http://mlflow.internal:5000/base", "alice", SECRET)
    assert split_credentials("http://mlflow:5000") == ("http://mlflow:5000", "", "")
    assert redact({"a": [uri]}) == {"a": ["http://alice:***@mlflow.internal:5000/base"]}
    presigned = "https://b.s3.amazonaws.com/k.mp4?X-Amz-Credential=AKIAFAKE%2F1&X-Amz-Signature=abc123&v=2"
    assert redact(presigned) == "https://b.s3.amazonaws.com/k.mp4?X-Amz-Credential=***&X-Amz-Signature=***&v=2"
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_stage_results_are_serialised_without_credentials():
    @dataclass
    class Result(StageResult):
        tracking_uri: str
        added_later: str = "default"

    line = json.dumps(Result(f"http://alice:{QUOTED}@h:5000").to_dict())
    assert QUOTED not in line and SECRET not in line and "alice:***@h:5000" in line
    assert Result.from_dict({"tracking_uri": "http://h:5000"}) == Result("http://h:5000")  # older results load


def test_connect_moves_uri_credentials_into_mlflow_variables(clean_env, auth_server, monkeypatch):
    host = auth_server.split("//")[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{QUOTED}@{host}")
    uri = tracking.connect()
    assert uri == auth_server
    assert tracking.os.environ["MLFLOW_TRACKING_URI"] == auth_server  # children and Ray runtime envs see no secret
    assert tracking.credentials() == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": SECRET}
    # a result's URI (no credentials, or redacted ones) connects with what the process holds
    assert tracking.connect(auth_server) == auth_server
    assert tracking.connect(f"http://alice:***@{host}") == auth_server
    assert tracking.credentials()["MLFLOW_TRACKING_PASSWORD"] == SECRET


def test_health_check_uses_mlflow_environment_credentials(clean_env, auth_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    assert tracking.connect(auth_server) == auth_server


def test_refused_credentials_and_dead_servers_are_named_without_the_password(clean_env, auth_server, monkeypatch):
    host = auth_server.split("//")[1]
    with pytest.raises(tracking.TrackingError) as refused:
        tracking.connect(f"http://alice:wrong-{QUOTED}@{host}")
    message = str(refused.value)
    assert "refused the credentials of user 'alice' (HTTP 401)" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "wrong" not in message and SECRET not in message and QUOTED not in message
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(tracking.TrackingError) as unreachable:
        tracking.connect(f"http://alice:{QUOTED}@{dead}")
    assert f"at http://{dead} does not answer" in str(unreachable.value)
    assert SECRET not in str(unreachable.value) and QUOTED not in str(unreachable.value)


def test_ray_runtime_env_and_job_command_lines_carry_no_password(clean_env, monkeypatch):
    from pipelines.jobclient import entrypoint
    from pipelines.raycluster import forwarded_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{QUOTED}@mlflow:5000")
    assert forwarded_env()["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    line = entrypoint(["train", f"mlflow.tracking_uri=http://alice:{QUOTED}@mlflow:5000", "epochs=1"])
    assert QUOTED not in line and "mlflow.tracking_uri=http://alice:***@mlflow:5000" in line


def test_fluent_scope_leaves_the_environment_as_it_was(clean_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server-of-the-environment:5000")
    import mlflow

    with tracking.fluent("sqlite:///elsewhere.db"):
        assert mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"
    # children (and MLflow's default) still see the environment's server
    assert tracking.os.environ["MLFLOW_TRACKING_URI"] == "http://server-of-the-environment:5000"
    assert mlflow.get_tracking_uri() == "http://server-of-the-environment:5000"


def test_fluent_scope_restores_the_uri_and_the_exported_variable(monkeypatch, tmp_path):
    """MLflow's own setter writes $MLFLOW_TRACKING_URI and deletes it on restore; every later stage of the
    process (a workflow runs four) reads that variable, so the scope must leave it as it found it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/exported")
    inner = f"sqlite:///{tmp_path / 'inner.db'}"
    with tracking.fluent(inner):
        assert mlflow.get_tracking_uri() == inner
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9/exported"
    assert tracking.resolve_uri("") == "http://127.0.0.1:9/exported"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with tracking.fluent(inner):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_the_local_default_store_is_absolute_and_gets_its_folder(monkeypatch, tmp_path):
    """With nothing configured or exported, runs go to <cwd>/.state/mlflow/mlflow.db, an absolute URI (Ray
    workers run in other directories), whose folder is made before SQLite opens it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.resolve_uri("")
    assert uri == f"sqlite:///{tmp_path / '.state' / 'mlflow' / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(client, tracking.MlflowConfig(experiment="local"))
    assert (tmp_path / ".state" / "mlflow" / "mlflow.db").is_file()
    location = client.get_experiment(experiment).artifact_location
    assert location == (tmp_path / ".state" / "mlflow" / "artifacts").as_uri()


def test_a_missing_dataset_path_is_reported_as_missing_not_as_unfinished(tmp_path):
    import pytest

    from pipelines.data.shards import DatasetError, read_manifest

    with pytest.raises(DatasetError, match=r"dataset .*nowhere does not exist: check the path"):
        read_manifest(str(tmp_path / "nowhere"))
    (tmp_path / "half").mkdir()
    with pytest.raises(DatasetError, match=r"has no manifest\.json: .*did not finish"):
        read_manifest(str(tmp_path / "half"))
