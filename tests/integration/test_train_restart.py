"""Training resumes by itself when a worker dies: Ray Train restarts the worker group, the workers load
the latest checkpoint and continue with the next epoch, and everything lands in the same MLflow run."""

from __future__ import annotations

import signal
import time

import mlflow
import psutil
import pytest

from pipelines.config import load_config
from pipelines.data.shards import read_manifest
from pipelines.data.synthetic import SyntheticSpec, generate
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.job import run as preprocess
from pipelines.train.config import TrainConfig

pytestmark = pytest.mark.integration

EPOCHS = 4


def test_a_killed_training_worker_is_replaced_and_training_resumes(services, ray_session, tmp_path,
                                                                  training_in_background):
    generate(tmp_path / "videos", SyntheticSpec(classes=4, videos_per_class=8, frames=16, size=48, seed=5))
    dataset = tmp_path / "ds"
    preprocess(load_config(PreprocessConfig, None, [
        f"source={tmp_path}/videos/labels.csv", f"output={dataset}", "short_side=36", "fps=0",
        "max_samples_per_shard=8", "val_fraction=0.25",
    ]))
    runs = tmp_path / "runs"
    cfg = load_config(TrainConfig, None, [
        f"dataset={dataset}", f"storage_path={runs}", "run_name=restart", "mlflow.experiment=restart",
        "model=mvit_debug", f"epochs={EPOCHS}", "batch_size=4", "num_workers=2", "log_every_steps=1",
        "clip.num_frames=8", "clip.sampling_rate=2", "clip.crop_size=32", "clip.train_crop=random",
        "clip.horizontal_flip=false", "optim.lr_batch=8", "optim.warmup_epochs=1", "max_failures=1",
    ])
    job = training_in_background(cfg)

    deadline = time.monotonic() + 240
    # epoch 0 is done and its checkpoint registered by the controller (which then writes its snapshot)
    while not (runs / "restart" / "checkpoint_manager_snapshot.json").exists():
        assert time.monotonic() < deadline and job.is_alive(), "no checkpoint appeared"
        time.sleep(0.1)
    workers = train_workers()
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGKILL)
    replaced = False
    while job.is_alive() and not replaced:  # Ray Train starts a new worker group
        replaced = bool(set(train_workers()) - set(workers))
        time.sleep(0.1)
    result = job.result(timeout=400)
    assert replaced, "no replacement worker group was started"

    client = mlflow.MlflowClient(services.mlflow_uri)
    experiment = client.get_experiment_by_name("restart")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [result.mlflow_run_id]
    history = client.get_metric_history(result.mlflow_run_id, "val/top1")
    # one value per epoch, steps increasing: the epoch in flight at the kill was redone, none twice
    assert len(history) == EPOCHS
    assert [m.step for m in history] == sorted({m.step for m in history})
    assert result.metrics["epoch"] == EPOCHS - 1
    # the replacement group started from the checkpoint, not from scratch: epoch 0's steps were not redone
    # every step's metrics exactly once, though the steps after the checkpoint were trained twice
    steps_per_epoch = read_manifest(str(dataset)).split_samples("train") // (cfg.batch_size * cfg.num_workers)
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "train/loss")]
    assert sorted(steps) == list(range(1, EPOCHS * steps_per_epoch + 1))
    # the replacement group went on from a checkpoint (not from scratch), and the run says so
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert tags["mvit.restarts"] == "1" and 0 <= int(tags["mvit.resumed_from_epoch"]) < EPOCHS - 1


def train_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(process)
        except psutil.Error:  # exited meanwhile
            pass
    return found
