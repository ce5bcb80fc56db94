"""Evaluate a checkpoint: multi-view, video-level top-1/top-5 on one split, logged to MLflow."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING

from pipelines.config import from_dict
from pipelines.data import storage
from pipelines.data.shards import DatasetError, read_manifest
from pipelines.train import plots, tracking
from pipelines.train.config import MlflowConfig, TrainConfig
from pipelines.train.job import checkpoint_file
from pipelines.train.loop import build_model, evaluate_views


@dataclass
class EvaluateConfig:
    dataset: str = MISSING
    checkpoint: str = MISSING  # a checkpoint directory (holds model.pt) or the model.pt itself
    split: str = "val"
    temporal_views: int = 1  # evenly spaced clips per video, softmax averaged (Kinetics recipe: 5)
    batch_size: int = 16
    mlflow_run_id: str = ""  # log metrics and the report into this run ("" = do not log)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def load_checkpoint(uri: str) -> dict:
    """Read one of our training checkpoints (weights only: no pickle execution)."""
    path = checkpoint_file(uri)
    if not storage.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the checkpoint printed by `mvit train`")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model.pt"
        storage.download_file(path, local)
        try:
            return torch.load(local, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt file must give a clear message
            raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None


def model_from_checkpoint(state: dict) -> tuple[torch.nn.Module, TrainConfig]:
    train_cfg = from_dict(TrainConfig, state["train_config"], origin="checkpoint train_config")
    train_cfg.init_checkpoint = ""  # the weights come from this checkpoint, not from the run's initial ones
    model = build_model(train_cfg, len(state["label_map"]))
    model.load_state_dict(state["model"])
    return model.eval(), train_cfg


def run(cfg: EvaluateConfig) -> dict:
    manifest = read_manifest(cfg.dataset)
    urls = manifest.shard_urls(cfg.dataset, cfg.split)
    if not urls:
        raise DatasetError(f"{cfg.dataset} has no '{cfg.split}' shards (splits: {sorted(manifest.splits)})")
    state = load_checkpoint(cfg.checkpoint)
    if state["label_map"] != manifest.label_map:
        raise DatasetError(f"the labels of checkpoint {cfg.checkpoint} differ from those of {cfg.dataset}")
    model, train_cfg = model_from_checkpoint(state)
    train_cfg.batch_size = cfg.batch_size
    correct1, correct5, total, confusion = evaluate_views(
        model, urls, train_cfg, len(manifest.label_map), torch.device("cpu"), views=cfg.temporal_views
    )
    report = {
        "split": cfg.split,
        "videos": total,
        "temporal_views": cfg.temporal_views,
        "top1": correct1 / total,
        "top5": correct5 / total,
        "checkpoint": cfg.checkpoint,
        "dataset": cfg.dataset,
        "dataset_digest": manifest.digest(),
    }
    if cfg.mlflow_run_id:
        uri = tracking.resolve_uri(cfg.mlflow.tracking_uri)
        tracking.check_server(uri)
        tracker = tracking.MlflowTracker(uri, cfg.mlflow_run_id)
        tracking.log_config(tracker.client, cfg.mlflow_run_id, "evaluate", cfg)
        tracker.log_metrics({f"eval/{cfg.split}/top1": report["top1"], f"eval/{cfg.split}/top5": report["top5"]},
                            step=int(state.get("step", 0)))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"eval_{cfg.split}.json")
            Path(path).write_text(json.dumps(report, indent=1))
            tracker.log_artifact(path, "eval")
            png = os.path.join(tmp, f"confusion_matrix_eval_{cfg.split}.png")
            plots.confusion_matrix(confusion, manifest.labels, png)
            tracker.log_artifact(png, "eval")
    print(f"[evaluate] {cfg.split}: top1 {report['top1']:.4f} top5 {report['top5']:.4f} over {total} videos", flush=True)
    return report
