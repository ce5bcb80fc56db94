"""Bad input at the skeleton level fails fast with a message naming the thing to fix."""

from __future__ import annotations

import time

import pytest

from pipelines.cli import main
from pipelines.stack import free_port

pytestmark = pytest.mark.integration


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def test_missing_source_dir(capsys, tmp_path):
    code, err = _run(capsys, "preprocess", f"source={tmp_path}/nope", f"output={tmp_path}/out")
    assert code == 1
    assert f"{tmp_path}/nope" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_unreachable_s3_endpoint(capsys, tmp_path, monkeypatch):
    from pipelines.data import storage

    storage._client.cache_clear()
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    started = time.monotonic()
    code, err = _run(capsys, "preprocess", f"source={tmp_path}", "output=s3://mvit/unreachable")
    storage._client.cache_clear()
    assert code == 1
    assert dead in err and "AWS_ENDPOINT_URL" in err
    assert time.monotonic() - started < 30


def test_s3_without_credentials(capsys, tmp_path, monkeypatch):
    from pipelines.data import storage

    storage._client.cache_clear()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, err = _run(capsys, "preprocess", f"source={tmp_path}", "output=s3://mvit/nocreds")
    storage._client.cache_clear()
    assert code == 1
    assert "no S3 credentials" in err and "AWS_ACCESS_KEY_ID" in err


def test_mlflow_uri_that_does_not_answer(capsys, services, ray_session, tmp_path):
    from pipelines.config import load_config
    from pipelines.data.synthetic import SyntheticSpec, generate
    from pipelines.preprocess.config import PreprocessConfig
    from pipelines.preprocess.job import run as preprocess

    generate(tmp_path / "videos", SyntheticSpec(classes=2, videos_per_class=2, frames=8, size=32))
    preprocess(load_config(PreprocessConfig, None, [f"source={tmp_path}/videos", f"output={tmp_path}/ds", "fps=0",
                                                    "max_samples_per_shard=2"]))
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, err = _run(capsys, "train", f"dataset={tmp_path}/ds", f"storage_path={tmp_path}/runs", "model=mvit_debug",
                     "batch_size=1", f"mlflow.tracking_uri={dead}")
    assert code == 1
    assert dead in err and "does not answer" in err
    assert time.monotonic() - started < 30


def test_dataset_without_manifest_is_refused(capsys, tmp_path):
    (tmp_path / "shards").mkdir()
    code, err = _run(capsys, "train", f"dataset={tmp_path}", "model=mvit_debug")
    assert code == 1 and "manifest.json" in err and "resume" in err


def test_relative_local_paths_reach_the_ray_workers(capsys, services, ray_session, tmp_path, monkeypatch):
    """Ray Data tasks and Ray Train workers do not run in the caller's directory: relative paths given on the
    command line must name the same files there (preprocessing wrote its parts into the workers' directory,
    and training failed with 'no manifest.json')."""
    from pipelines.data.synthetic import SyntheticSpec, generate

    generate(tmp_path / "videos", SyntheticSpec(classes=2, videos_per_class=2, frames=8, size=32))
    monkeypatch.chdir(tmp_path)
    code, err = _run(capsys, "preprocess", "source=videos/labels.csv", "output=ds", "fps=0", "max_samples_per_shard=2")
    assert code == 0, err
    code, err = _run(capsys, "train", "dataset=ds", "storage_path=runs", "model=mvit_debug", "epochs=1",
                     "batch_size=1", "num_workers=2", "clip.num_frames=4", "clip.sampling_rate=1",
                     "clip.crop_size=32", "clip.train_crop=random", "mlflow.experiment=relative-paths")
    assert code == 0, err
    checkpoints = list((tmp_path / "runs").glob("*/checkpoint_*/model.pt"))
    assert len(checkpoints) == 1
