"""MLflow plumbing without a server: the scoped fluent URI, the local default store."""

from __future__ import annotations

import os

import mlflow

from pipelines import tracking


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
