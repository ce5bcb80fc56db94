"""Register a trained model in the MLflow registry and move the alias when it beats the holder."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING

import mvit
import pipelines
from pipelines import artifact, tracking
from pipelines.config import StageResult
from pipelines.data.shards import MEDIA_KEY, read_manifest, read_samples
from pipelines.tracking import MlflowConfig

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


@dataclass
class RegisterResult(StageResult):
    model_uri: str  # models:/NAME/VERSION
    alias_uri: str  # models:/NAME@alias
    model_name: str
    version: int
    promoted: bool
    metric: float | None
    tracking_uri: str  # the MLflow server holding the registry


def _example_video(cfg: RegisterConfig, directory: Path) -> str:
    if cfg.example_video:
        return cfg.example_video
    if not cfg.dataset:
        raise ValueError("register needs dataset=<prefix> or example_video=<file> for the model's input example")
    manifest = read_manifest(cfg.dataset)
    split = "val" if manifest.shard_urls(cfg.dataset, "val") else "train"
    for sample in read_samples(manifest.shard_urls(cfg.dataset, split)[:1]):
        path = directory / f"{sample['__key__']}.mp4"
        path.write_bytes(sample[MEDIA_KEY])
        return str(path)
    raise ValueError(f"{cfg.dataset} has no samples to use as an example")


def _metric_of(client, run_id: str, key: str) -> float | None:
    value = client.get_run(run_id).data.metrics.get(key)
    return float(value) if value is not None else None


def run(cfg: RegisterConfig) -> RegisterResult:
    import mlflow
    import pandas as pd

    from pipelines.register import detection_pyfunc
    from pipelines.register.pyfunc import MViTVideoClassifier

    uri = tracking.resolve_uri(cfg.mlflow.tracking_uri)
    tracking.check_server(uri)
    client = tracking.client(uri)
    state = artifact.load_state(cfg.checkpoint)
    tracking.log_config(client, cfg.mlflow_run_id, "register", cfg)
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / artifact.CHECKPOINT_FILE
        if detection_pyfunc.is_detector(state):  # AVA: boxes with action scores at a keyframe (detection_pyfunc.py)
            python_model = detection_pyfunc.MViTActionDetector()
            input_example, fps = detection_pyfunc.example_and_fps(cfg.dataset, Path(tmp))
            torch.save(artifact.slim(state, fps=fps), slim)
        else:
            python_model = MViTVideoClassifier()
            torch.save(artifact.slim(state, temporal_views=cfg.temporal_views), slim)
            input_example = pd.DataFrame({"video": [_example_video(cfg, Path(tmp))]})
        with tracking.fluent(uri), mlflow.start_run(run_id=cfg.mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=python_model,
                artifacts={"checkpoint": str(slim)},
                code_paths=[str(Path(mvit.__file__).parent), str(Path(pipelines.__file__).parent)],
                input_example=input_example,
                pip_requirements=PIP_REQUIREMENTS,
            )
    with tracking.fluent(uri):
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
    return RegisterResult(model_uri=f"models:/{cfg.model_name}/{version.version}",
                          alias_uri=f"models:/{cfg.model_name}@{cfg.alias}", model_name=cfg.model_name,
                          version=int(version.version), promoted=promote, metric=new_score,
                          tracking_uri=uri)
