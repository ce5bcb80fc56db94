"""Evaluate a checkpoint: multi-view, video-level top-1/top-5 on one split, logged to MLflow."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING

from pipelines import plots, tracking
from pipelines.artifact import TrainedModel
from pipelines.config import StageResult
from pipelines.data.shards import DatasetError, read_manifest
from pipelines.detection.task import is_detection_dataset
from pipelines.scoring import score_videos
from pipelines.tracking import MlflowConfig


@dataclass
class EvaluateConfig:
    dataset: str = MISSING
    checkpoint: str = MISSING  # a checkpoint directory (holds model.pt) or the model.pt itself
    split: str = "val"
    temporal_views: int = 1  # evenly spaced clips per video, softmax averaged (Kinetics recipe: 5)
    batch_size: int = 16
    mlflow_run_id: str = ""  # log metrics and the report into this run ("" = do not log)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class EvaluateResult(StageResult):
    split: str
    videos: int
    temporal_views: int
    top1: float
    top5: float
    checkpoint: str
    dataset: str
    dataset_digest: str
    mlflow_run_id: str  # the run it is logged into ("" = not logged)
    tracking_uri: str  # where that run lives ("" = not logged)
    # AVA datasets (pipelines/evaluate/detection.py): frame-mAP@0.5; top1/top5 are then None, `videos` counts keyframes
    frame_map: float | None = None

    @property
    def metric_key(self) -> str:
        """The MLflow metric this evaluation is logged as."""
        return f"eval/{self.split}/{'top1' if self.frame_map is None else 'frame_map'}"


def run(cfg: EvaluateConfig) -> EvaluateResult:
    manifest = read_manifest(cfg.dataset)
    if is_detection_dataset(manifest):
        from pipelines.evaluate.detection import run_detection

        return run_detection(cfg, manifest)
    urls = manifest.shard_urls(cfg.dataset, cfg.split)
    if not urls:
        raise DatasetError(f"{cfg.dataset} has no '{cfg.split}' shards (splits: {sorted(manifest.splits)})")
    trained = TrainedModel.load(cfg.checkpoint)
    if trained.label_map != manifest.label_map:
        raise DatasetError(f"the labels of checkpoint {cfg.checkpoint} differ from those of {cfg.dataset}")
    precision = str(trained.train_config.get("precision", "fp32"))
    score = score_videos(trained.model, urls, trained.clip, num_classes=len(manifest.label_map),
                         device=torch.device("cpu"), views=cfg.temporal_views, batch_size=cfg.batch_size,
                         precision=precision)
    uri = tracking.resolve_uri(cfg.mlflow.tracking_uri) if cfg.mlflow_run_id else ""
    report = EvaluateResult(split=cfg.split, videos=score.total, temporal_views=cfg.temporal_views,
                            top1=score.top1, top5=score.top5, checkpoint=cfg.checkpoint, dataset=cfg.dataset,
                            dataset_digest=manifest.digest(), mlflow_run_id=cfg.mlflow_run_id, tracking_uri=uri)
    if cfg.mlflow_run_id:
        tracking.check_server(uri)
        tracker = tracking.MlflowTracker(uri, cfg.mlflow_run_id)
        tracking.log_config(tracker.client, cfg.mlflow_run_id, "evaluate", cfg)
        tracker.log_metrics({report.metric_key: report.top1, f"eval/{cfg.split}/top5": report.top5},
                            step=trained.step)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"eval_{cfg.split}.json")
            Path(path).write_text(json.dumps(report.to_dict(), indent=1))
            tracker.log_artifact(path, "eval")
            png = os.path.join(tmp, f"confusion_matrix_eval_{cfg.split}.png")
            plots.confusion_matrix(score.confusion, manifest.labels, png)
            tracker.log_artifact(png, "eval")
    print(f"[evaluate] {cfg.split}: top1 {report.top1:.4f} top5 {report.top5:.4f} over {score.total} videos", flush=True)
    return report
