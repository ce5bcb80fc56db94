"""`mvit evaluate` on Ray workers: the same per-video predictions whatever the number of workers, for the
recipes' view layouts, and its outputs (predictions, per-class table, confusion matrix) in the MLflow run."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds

import mvit
from pipelines import artifact
from pipelines.config import load_config
from pipelines.data import storage
from pipelines.data.clips import ClipConfig
from pipelines.data.shards import Manifest, ShardInfo
from pipelines.data.video import encode_mp4
from pipelines.evaluate.job import EvaluateConfig
from pipelines.evaluate.job import run as evaluate

pytestmark = pytest.mark.integration

CLASSES = ["a", "b", "c", "d"]
CLIP = ClipConfig(num_frames=8, sampling_rate=2, crop_size=32, test_short_side=40, train_crop="random",
                  horizontal_flip=False)


@pytest.fixture(scope="module")
def dataset_and_checkpoint(tmp_path_factory):
    """4 val shards of 3 videos (40 frames, 36x60: 5 temporal clips and 3 crops that differ) and a randomly
    initialised mvitv2_debug checkpoint: predictions are arbitrary but a function of the weights and views."""
    root = tmp_path_factory.mktemp("evalset")
    shards = []
    rng = np.random.default_rng(0)
    for s in range(4):
        buffer = io.BytesIO()
        with wds.TarWriter(buffer) as sink:
            for i in range(3):
                video = encode_mp4(rng.integers(0, 255, (40, 36, 60, 3), dtype=np.uint8), 15)
                sink.write({"__key__": f"s{s}v{i}", "mp4": video, "cls": str((s + i) % 4).encode(),
                            "json": json.dumps({"frames": 40}).encode()})
        data = buffer.getvalue()
        storage.write_bytes(str(root / "shards" / f"val-{s}.tar"), data)
        shards.append(ShardInfo(f"shards/val-{s}.tar", "val", 3, len(data), hashlib.sha256(data).hexdigest()))
    manifest = Manifest(12, {c: i for i, c in enumerate(CLASSES)}, shards, {}, "test", 12, 0, {"val": 12})
    storage.write_bytes(str(root / "manifest.json"), manifest.to_json().encode())

    torch.manual_seed(0)
    model = mvit.create_model("mvitv2_debug", num_classes=4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    (root / "ckpt").mkdir()
    artifact.save_training_state(root / "ckpt", model, optimizer, scheduler, epoch=0, step=7, model_name="mvitv2_debug",
                                 train_config={"clip": asdict(CLIP)}, label_map=manifest.label_map)
    return str(root), str(root / "ckpt")


def _evaluate(dataset, checkpoint, out, workers, temporal, spatial, run_id=""):
    cfg = load_config(EvaluateConfig, None, [
        f"dataset={dataset}", f"checkpoint={checkpoint}", f"output={out}", f"num_workers={workers}",
        f"temporal_views={temporal}", f"spatial_views={spatial}", "batch_size=2",
        *([f"mlflow_run_id={run_id}"] if run_id else []),
    ])
    report = evaluate(cfg)
    return report, pd.read_parquet(f"{out}/predictions.parquet")


@pytest.mark.parametrize("temporal, spatial", [(5, 1), (1, 3)], ids=["1x5 (Kinetics)", "3x1 (SSv2)"])
def test_two_ray_workers_give_exactly_the_predictions_of_one(services, ray_session, dataset_and_checkpoint, tmp_path,
                                                             temporal, spatial):
    dataset, checkpoint = dataset_and_checkpoint
    one_report, one = _evaluate(dataset, checkpoint, tmp_path / "one", 1, temporal, spatial)
    two_report, two = _evaluate(dataset, checkpoint, tmp_path / "two", 2, temporal, spatial)
    assert len(one) == 12 and one["key"].tolist() == sorted(one["key"])
    assert one["key"].tolist() == two["key"].tolist() and one["label"].tolist() == two["label"].tolist()
    assert [list(x) for x in one["top5_ids"]] == [list(x) for x in two["top5_ids"]]
    assert [list(x) for x in one["top5_scores"]] == [list(x) for x in two["top5_scores"]]  # bit for bit
    assert (one_report.temporal_views, one_report.spatial_views) == (temporal, spatial)
    assert one_report.top1 == two_report.top1 and one_report.videos == 12
    # the in-process path computes the same thing (its thread count may move the last bits)
    _, local = _evaluate(dataset, checkpoint, tmp_path / "local", 0, temporal, spatial)
    assert [list(x) for x in local["top5_ids"]] == [list(x) for x in one["top5_ids"]]
    np.testing.assert_allclose(np.stack(local["top5_scores"]), np.stack(one["top5_scores"]), rtol=1e-5, atol=1e-6)
    # the views differ from each other, so their number matters: one view gives other scores
    _, single = _evaluate(dataset, checkpoint, tmp_path / "single", 0, 1, 1)
    assert not np.allclose(np.stack(single["top5_scores"]), np.stack(one["top5_scores"]))


def test_per_class_table_and_confusion_matrix_are_in_the_mlflow_run(services, ray_session, dataset_and_checkpoint,
                                                                      tmp_path):
    dataset, checkpoint = dataset_and_checkpoint
    client = mlflow.MlflowClient(services.mlflow_uri)
    experiment = client.get_experiment_by_name("eval-it") or client.get_experiment(client.create_experiment("eval-it"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    report, predictions = _evaluate(dataset, checkpoint, tmp_path / "logged", 2, 5, 1, run_id)
    files = {a.path for d in ("eval", "eval/val") for a in client.list_artifacts(run_id, d)}
    assert {"eval/eval_val.json", "eval/per_class_val.csv", "eval/confusion_val.csv",
            "eval/confusion_matrix_eval_val.png", "eval/per_class_val_table.json", "eval/val/predictions.parquet"} <= files
    run = client.get_run(run_id)
    assert run.data.metrics["eval/val/top1"] == report.top1 and run.data.metrics["eval/val/videos_per_s"] > 0
    per_class = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/per_class_val.csv",
                                                                tracking_uri=services.mlflow_uri, dst_path=str(tmp_path)))
    confusion = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/confusion_val.csv",
                                                                tracking_uri=services.mlflow_uri, dst_path=str(tmp_path)),
                            index_col=0)
    # both agree with the per-video predictions
    top1 = np.array([ids[0] for ids in predictions["top5_ids"]])
    for k, name in enumerate(CLASSES):
        mine = predictions["label"].to_numpy() == k
        assert per_class.loc[k, "videos"] == mine.sum() and per_class.loc[k, "correct"] == (top1[mine] == k).sum()
        assert confusion.loc[name].tolist() == [int((top1[mine] == j).sum()) for j in range(4)]
    assert confusion.to_numpy().sum() == 12
