"""Training that loses nothing (step checkpoints with exact resume, best-k, the NaN guard, progress), on the
session's Ray, S3 and MLflow servers. Node loss and elastic workers: test_train_multinode.py."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import torch

import mvit
from mvit.checkpoint import save_checkpoint
from pipelines.config import load_config
from pipelines.data import storage
from pipelines.data.shards import read_manifest
from pipelines.data.synthetic import SyntheticSpec, class_names, generate
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.job import run as preprocess
from pipelines.train.config import TrainConfig
from pipelines.train.job import NonFiniteTrainingError
from pipelines.train.job import run as train
from tests.integration.conftest import _Tee
from tests.integration.test_train_restart import train_workers

pytestmark = pytest.mark.integration

TINY = [
    "model=mvit_debug", "batch_size=4", "log_every_steps=1", "clip.num_frames=8", "clip.sampling_rate=2",
    "clip.crop_size=32", "clip.train_crop=random", "clip.horizontal_flip=false", "optim.lr_batch=8",
    "optim.warmup_epochs=1",
]
EPOCHS, STEPS_PER_EPOCH, EVERY = 2, 6, 2  # 51 train clips // (4 x 2 workers); a step checkpoint every 2 steps


@contextlib.contextmanager
def console():
    """What the job prints, the workers' lines included (Ray's log thread writes to sys.stdout)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(_Tee(buffer, sys.stdout)):
        yield buffer
        time.sleep(1.0)  # the last worker lines are forwarded asynchronously


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"s3://mvit/resil-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def motion_set(ray_session, tmp_path_factory) -> str:
    """4 classes x 16 videos: 51 train clips (6 steps of 8), 13 val."""
    root = tmp_path_factory.mktemp("motion")
    generate(root / "videos", SyntheticSpec(classes=4, videos_per_class=16, frames=16, size=48, seed=5))
    preprocess(load_config(PreprocessConfig, None, [
        f"source={root}/videos/labels.csv", f"output={root}/ds", "short_side=36", "fps=0",
        "max_samples_per_shard=8", "val_fraction=0.25",
    ]))
    assert read_manifest(str(root / "ds")).split_samples("train") // 8 == STEPS_PER_EPOCH
    return str(root / "ds")


def config(dataset: str, prefix: str, name: str, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"dataset={dataset}", f"storage_path={prefix}/runs", f"run_name={name}", f"mlflow.experiment={name}",
        *TINY, *extra,
    ])


def losses(client, run_id: str) -> dict[int, float]:
    history = client.get_metric_history(run_id, "train/loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"duplicate step metrics: {sorted(steps)}"
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def uninterrupted(services, motion_set, prefix) -> dict:
    cfg = config(motion_set, prefix, "uninterrupted", f"epochs={EPOCHS}", "num_workers=2",
                 f"checkpoint_every_steps={EVERY}", "system_metrics_interval_s=1")
    with console() as out:
        result = train(cfg)
    return {"result": result, "console": out.getvalue(), "cfg": cfg}


# ---- acceptance 5: progress a person can read, and system metrics --------------------------------------

PROGRESS = re.compile(r"\[train\] epoch (\d+)/(\d+) step (\d+)/(\d+) \((\d+)%\) loss ([\d.]+) lr ([\d.e+-]+) \| "
                      r"([\d.]+) clips/s, data wait (\d+)% \| ETA (\d+)m(\d\d)s")


def test_progress_lines_and_system_metrics_reach_the_console_and_the_run(uninterrupted, services):
    result, total = uninterrupted["result"], EPOCHS * STEPS_PER_EPOCH
    lines = [m.groups() for m in PROGRESS.finditer(uninterrupted["console"])]
    assert len(lines) >= total // 2, uninterrupted["console"][-3000:]  # log_every_steps=1; a few may lag
    client = mlflow.MlflowClient(services.mlflow_uri)
    logged = losses(client, result.mlflow_run_id)
    assert sorted(logged) == list(range(1, total + 1))
    for epoch, epochs, step, steps, percent, loss, _lr, clips_per_s, wait, _m, _s in lines:
        assert (int(epochs), int(steps)) == (EPOCHS, total)
        assert int(epoch) == (int(step) - 1) // STEPS_PER_EPOCH + 1
        assert int(percent) == round(100 * int(step) / total)
        assert float(loss) == pytest.approx(logged[int(step)], abs=5e-5)  # the line shows 4 decimals
        assert float(clips_per_s) > 0 and 0 <= int(wait) <= 100
    metrics = client.get_run(result.mlflow_run_id).data.metrics
    for key in ("train/clips_per_s", "train/data_wait_fraction", "train/eta_s", "train/lr", "train/checkpoint_s"):
        assert key in metrics, key
    assert metrics["train/global_batch"] == 8 and metrics["train/world_size"] == 2
    # MLflow's system metrics, sampled every second into the run rank 0 logs to (no run of their own)
    cpu = client.get_metric_history(result.mlflow_run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(result.mlflow_run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 2 and all(0 <= m.value <= 100 for m in cpu)
    assert memory and all(m.value > 0 for m in memory)
    experiment = client.get_experiment_by_name("uninterrupted")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [result.mlflow_run_id]


# ---- acceptance 1: a killed worker costs at most one checkpoint interval, and the resume is exact ------

def _latest_checkpoint_step(s3, prefix: str, name: str) -> int:
    key = f"{prefix.removeprefix('s3://mvit/')}/runs/{name}/checkpoint_manager_snapshot.json"
    try:
        snapshot = json.loads(s3.get_object(Bucket="mvit", Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        return 0
    latest = snapshot.get("latest_checkpoint_result")
    return int(latest["checkpoint_dir_name"].removeprefix("checkpoint_step")) if latest else 0


def test_a_worker_killed_after_a_step_checkpoint_resumes_exactly_where_it_was(uninterrupted, services, s3,
                                                                              motion_set, prefix,
                                                                              training_in_background):
    cfg = config(motion_set, prefix, "killed", f"epochs={EPOCHS}", "num_workers=2",
                 f"checkpoint_every_steps={EVERY}", "max_failures=1", "system_metrics_interval_s=0")
    job = training_in_background(cfg)
    deadline = time.monotonic() + 300
    # a mid-epoch step checkpoint is committed (the epoch's end checkpoints at step 6, 12)
    while (latest := _latest_checkpoint_step(s3, prefix, "killed")) % STEPS_PER_EPOCH == 0:
        assert time.monotonic() < deadline and job.is_alive(), f"no step checkpoint appeared: {job.outcome}"
        time.sleep(0.05)
    workers = train_workers()
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGKILL)
    result = job.result(timeout=600)
    total = EPOCHS * STEPS_PER_EPOCH

    assert result.metrics["step"] == total  # the configured number of steps, no more, no fewer
    client = mlflow.MlflowClient(services.mlflow_uri)
    experiment = client.get_experiment_by_name("killed")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [result.mlflow_run_id]
    tags = client.get_run(result.mlflow_run_id).data.tags
    resumed = int(tags["mvit.resumed_from_step"])
    assert tags["mvit.restarts"] == "1" and resumed >= latest and resumed % STEPS_PER_EPOCH != 0  # mid-epoch
    assert 0 <= int(tags["mvit.steps_redone"]) <= EVERY
    assert tags["mvit.world_sizes"] == "2,2"

    # every step logged once, and each loss equal to the uninterrupted run's (same seed, same machine)
    expected = losses(client, uninterrupted["result"].mlflow_run_id)
    got = losses(client, result.mlflow_run_id)
    assert sorted(got) == list(range(1, total + 1))
    assert [got[s] for s in range(resumed + 1, total + 1)] == [expected[s] for s in range(resumed + 1, total + 1)]
    assert got == expected
    # and the epoch numbers, the resumed epoch's mean loss over steps from both attempts included
    for key in ("train/epoch_loss", "val/top1"):
        assert ([m.value for m in client.get_metric_history(result.mlflow_run_id, key)]
                == [m.value for m in client.get_metric_history(uninterrupted["result"].mlflow_run_id, key)])


# ---- acceptance 3: the NaN guard ---------------------------------------------------------------------

def test_a_nan_loss_at_one_step_is_skipped_on_every_rank_and_counted(services, motion_set, prefix):
    cfg = config(motion_set, prefix, "nan-once", "epochs=1", "num_workers=2", "faults.nan_loss_at_step=3",
                 "system_metrics_interval_s=0")
    with console() as out:
        result = train(cfg)
    client = mlflow.MlflowClient(services.mlflow_uri)
    logged = losses(client, result.mlflow_run_id)
    # rank 0's loss was NaN at step 3 (rank 1's gradients too, through DDP): no loss for it, and the
    # steps after it are finite, which they would not be had the NaN gradients been applied
    assert sorted(logged) == [1, 2, 4, 5, 6] and all(math.isfinite(v) for v in logged.values())
    skipped = client.get_metric_history(result.mlflow_run_id, "train/skipped_steps")
    assert {m.step: m.value for m in skipped}[3] == 1 and max(m.value for m in skipped) == 1
    assert "step 3: non-finite loss on rank(s) [0]" in out.getvalue()
    assert "optimizer step skipped (1 in a row, 1 in all)" in out.getvalue()
    assert result.metrics["step"] == STEPS_PER_EPOCH


def test_non_finite_steps_in_a_row_stop_the_run_naming_step_keys_and_last_good_checkpoint(services, motion_set,
                                                                                           prefix):
    # NaN from step 4 on; a checkpoint every 3 steps; 3 bad steps in a row stop the run at step 6, within
    # one checkpoint interval of the first bad step, and no retry follows (max_failures would allow 2)
    cfg = config(motion_set, prefix, "nan-always", "epochs=2", "num_workers=2", "faults.nan_loss_at_step=4",
                 "faults.nan_loss_steps=-1", "max_bad_steps=3", "checkpoint_every_steps=3", "max_failures=2",
                 "system_metrics_interval_s=0")
    started = time.monotonic()
    with pytest.raises(NonFiniteTrainingError) as raised:
        train(cfg)
    message = str(raised.value)
    assert "3 non-finite steps in a row, the last at epoch 0 step 6" in message
    assert f"The last good checkpoint is {prefix}/runs/nan-always/checkpoint_step00000003" in message
    keys = re.search(r"sample keys of the batch: \[(.*?)\]", message).group(1).replace("'", "").split(", ")
    index = [json.loads(line) for line in (Path(motion_set) / "index.jsonl").read_text().splitlines()]
    train_keys = {row["key"] for row in index if row["split"] == "train"}
    assert len(keys) == 4 and set(keys) <= train_keys  # rank 0's batch: batch_size keys of the train split
    client = mlflow.MlflowClient(services.mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("nan-always").experiment_id])[0]
    assert run.info.status == "FAILED" and "step 6" in run.data.tags["mvit.failure"]
    assert not any(key.startswith("mvit.attempt.2") for key in run.data.tags)  # never restarted
    assert "mvit.restarts" not in run.data.tags
    print(f"[nan-always] stopped after {time.monotonic() - started:.1f}s")


# ---- acceptance 4: best-k --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_way_set(ray_session, tmp_path_factory) -> dict:
    """Two classes: the train split holds only one (B), the val split only the other (A). A model that
    starts out predicting A scores val top-1 = 1 and loses it as training pulls it to B: the run's val/top1
    peaks at its first epoch, by construction rather than by the luck of a seed."""
    root = tmp_path_factory.mktemp("oneway")
    generate(root / "videos", SyntheticSpec(classes=2, videos_per_class=4, frames=16, size=48, seed=3))
    a, _b = class_names(2)
    rows = [(p.relative_to(root / "videos").as_posix(), p.parent.name, "val" if p.parent.name == a else "train")
            for p in sorted((root / "videos").glob("*/*.mp4"))]
    with (root / "videos" / "split.csv").open("w", newline="") as handle:  # paths relative to the CSV
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    dataset = str(root / "ds")
    preprocess(load_config(PreprocessConfig, None, [
        f"source={root}/videos/split.csv", f"output={dataset}", "short_side=36", "fps=0", "max_samples_per_shard=4",
    ]))
    assert read_manifest(dataset).splits == {"train": 4, "val": 4}
    # an initial model whose logits are the head's bias alone, +1 for A
    model = mvit.create_model("mvit_debug", num_classes=2, input_size=(8, 32, 32))
    with torch.no_grad():
        model.head.projection.weight.zero_()
        model.head.projection.bias.zero_()
        model.head.projection.bias[read_manifest(dataset).label_map[a]] = 1.0
    save_checkpoint(model, root / "init.pt", model_name="mvit_debug")
    return {"dataset": dataset, "init": str(root / "init.pt")}


def test_the_peak_checkpoint_is_kept_and_evaluate_checkpoint_best_picks_it(services, one_way_set, prefix,
                                                                          mvit_in_process):
    # 1 step per epoch (4 train clips, batch 4, 1 worker); epoch 0 trains at 1e-4 x lr (warm-up), which
    # leaves A's lead standing; epochs 1-2 at lr 1e-2 move the model to B
    cfg = load_config(TrainConfig, None, [
        f"dataset={one_way_set['dataset']}", f"storage_path={prefix}/runs", "run_name=best-k",
        "mlflow.experiment=best-k", *TINY, f"init_checkpoint={one_way_set['init']}", "epochs=3", "num_workers=1",
        "checkpoints_to_keep=1", "optim.lr=1e-2", "optim.lr_batch=4", "optim.warmup_start_factor=1e-4",
        "optim.label_smoothing=0", "system_metrics_interval_s=0",
    ])
    result = train(cfg)
    client = mlflow.MlflowClient(services.mlflow_uri)
    top1 = [(m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, "val/top1")]
    assert top1[0] == (1, 1.0) and all(v < 1.0 for _, v in top1[1:]), top1  # the peak is before the end
    peak, latest = f"{prefix}/runs/best-k/checkpoint_step00000001", f"{prefix}/runs/best-k/checkpoint_step00000003"
    assert (result.best_checkpoint, result.checkpoint) == (peak, latest)
    run_files = [uri.removeprefix(f"{prefix}/runs/best-k/") for uri, _ in storage.list_files(f"{prefix}/runs/best-k")]
    kept = sorted({path.split("/")[0] for path in run_files if path.startswith("checkpoint_step")})
    assert kept == ["checkpoint_step00000001", "checkpoint_step00000003"]  # best 1 + the latest; step 2 deleted
    assert client.get_run(result.mlflow_run_id).data.tags["mvit.best_checkpoint"] == peak

    def evaluate(which: str) -> dict:
        code, out, err = mvit_in_process(["evaluate", f"dataset={one_way_set['dataset']}", f"checkpoint={which}",
                                          f"run_dir={result.run_dir}"])
        assert code == 0, err[-2000:]
        return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])

    best = evaluate("best")
    assert (best["checkpoint"], best["top1"]) == (peak, 1.0)
    assert evaluate("latest")["checkpoint"] == latest

