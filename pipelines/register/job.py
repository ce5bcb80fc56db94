"""Register a trained model in the MLflow registry and move the alias when it beats the holder."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING

import mvit
import pipelines
from pipelines.data.shards import MEDIA_KEY, read_manifest
from pipelines.evaluate.job import load_checkpoint
from pipelines.train import tracking
from pipelines.train.config import MlflowConfig

PIP_REQUIREMENTS = ["torch", "torchvision", "av<19", "numpy", "pandas", "boto3", "omegaconf", "pyyaml", "webdataset", "mlflow"]


@dataclass
class RegisterConfig:
    checkpoint: str = MISSING
    mlflow_run_id: str = MISSING  # the training run the model is logged into
    dataset: str = ""  # where to take an example video from (for the model's input_example)
    example_video: str = ""  # or a video file/URI to use as the input_example
    model_name: str = "mvit"
    alias: str = "champion"
    metric: str = "eval/val/top1"  # compared with the alias holder's run; higher is better
    temporal_views: int = 1  # clips per video at inference
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def _example_video(cfg: RegisterConfig, directory: Path) -> str:
    if cfg.example_video:
        return cfg.example_video
    if not cfg.dataset:
        raise ValueError("register needs dataset=<prefix> or example_video=<file> for the model's input example")
    import webdataset as wds

    manifest = read_manifest(cfg.dataset)
    split = "val" if manifest.shard_urls(cfg.dataset, "val") else "train"
    for sample in wds.WebDataset(manifest.shard_urls(cfg.dataset, split)[:1], shardshuffle=False, empty_check=False):
        path = directory / f"{sample['__key__']}.mp4"
        path.write_bytes(sample[MEDIA_KEY])
        return str(path)
    raise ValueError(f"{cfg.dataset} has no samples to use as an example")


def _metric_of(client, run_id: str, key: str) -> float | None:
    value = client.get_run(run_id).data.metrics.get(key)
    return float(value) if value is not None else None


def run(cfg: RegisterConfig) -> dict:
    import mlflow
    import pandas as pd

    from pipelines.register.pyfunc import MViTVideoClassifier

    uri = tracking.resolve_uri(cfg.mlflow.tracking_uri)
    tracking.check_server(uri)
    client = tracking.client(uri)
    state = load_checkpoint(cfg.checkpoint)
    tracking.log_config(client, cfg.mlflow_run_id, "register", cfg)
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / "model.pt"
        # Inference needs weights, labels and how clips are cut, not the optimizer state.
        torch.save({k: state[k] for k in ("format", "model", "model_name", "config", "train_config", "label_map")}
                   | {"temporal_views": cfg.temporal_views}, slim)
        example = _example_video(cfg, Path(tmp))
        with mlflow.start_run(run_id=cfg.mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=MViTVideoClassifier(),
                artifacts={"checkpoint": str(slim)},
                code_paths=[str(Path(mvit.__file__).parent), str(Path(pipelines.__file__).parent)],
                input_example=pd.DataFrame({"video": [example]}),
                pip_requirements=PIP_REQUIREMENTS,
            )
    version = mlflow.register_model(info.model_uri, cfg.model_name)
    new_score = _metric_of(client, cfg.mlflow_run_id, cfg.metric)
    try:
        holder = client.get_model_version_by_alias(cfg.model_name, cfg.alias)
        holder_score = _metric_of(client, holder.run_id, cfg.metric)
    except mlflow.exceptions.MlflowException:
        holder, holder_score = None, None
    promote = holder is None or holder_score is None or (new_score is not None and new_score > holder_score)
    if promote:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version.version)
    print(
        f"[register] {cfg.model_name} v{version.version} ({cfg.metric}={new_score}); "
        f"@{cfg.alias} {'-> this version' if promote else f'stays on v{holder.version} ({holder_score})'}",
        flush=True,
    )
    return {
        "model_uri": f"models:/{cfg.model_name}/{version.version}",
        "alias_uri": f"models:/{cfg.model_name}@{cfg.alias}",
        "version": int(version.version),
        "promoted": promote,
        "metric": new_score,
    }
