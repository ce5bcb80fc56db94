"""Register a trained model in the MLflow registry, tag it with its lineage, and move the alias when it
beats the holder on the same evaluation.

The champion rule: two versions are compared only on evaluations of the same kind (the same dataset
digest, split and number of temporal views, recorded by `mvit evaluate` as run tags next to the metric);
the alias moves when the candidate's latest value of `metric` is strictly higher. Otherwise the holder
keeps it, and the result says why (`reason`). With no holder, an evaluated candidate takes the alias.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING

import mvit
import pipelines
from pipelines import artifact, tracking
from pipelines.config import StageResult
from pipelines.data import storage
from pipelines.data.shards import MANIFEST, MEDIA_KEY, read_manifest, read_samples
from pipelines.tracking import MlflowConfig

PIP_REQUIREMENTS = ["torch", "torchvision", "av<19", "numpy", "pandas", "boto3", "omegaconf", "pyyaml", "webdataset", "mlflow"]
METRIC_PATTERN = re.compile(r"eval/(?P<split>[^/]+)/[^/]+")


@dataclass
class RegisterConfig:
    # a checkpoint (directory or its model.pt), a finished run's directory, or best | latest of `run_dir`
    checkpoint: str = MISSING
    run_dir: str = ""  # the training run's directory (`run_dir` of its result), for checkpoint=best | latest
    mlflow_run_id: str = ""  # the training run the model is logged into ("" = the run of `checkpoint`)
    dataset: str = ""  # where to take an example video from (for the model's input_example)
    example_video: str = ""  # or a video file/URI to use as the input_example
    model_name: str = "mvit"
    alias: str = "champion"
    metric: str = "eval/val/top1"  # eval/<split>/<name>, logged by `mvit evaluate`; higher is better
    temporal_views: int = 1  # clips per video at inference
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def validate(self) -> None:
        if not METRIC_PATTERN.fullmatch(self.metric):
            raise ValueError(f"config key 'metric' must name an evaluation metric eval/<split>/<name> (as logged by "
                             f"`mvit evaluate`, e.g. eval/val/top1), got {self.metric!r}")


@dataclass
class RegisterResult(StageResult):
    model_uri: str  # models:/NAME/VERSION
    alias_uri: str  # models:/NAME@alias
    model_name: str
    version: int
    promoted: bool
    metric: float | None
    tracking_uri: str  # the MLflow server holding the registry (no credentials: see tracking.connect)
    reason: str = ""  # why the alias moved or stayed


@dataclass(frozen=True)
class Evaluation:
    """A run's latest value of the compared metric and what it was measured on ("" = not recorded)."""

    score: float | None
    split: str
    dataset_digest: str
    views: str  # "<temporal>x<spatial>"

    def comparable_with(self, other: "Evaluation") -> bool:
        return bool(self.dataset_digest) and (self.dataset_digest, self.split, self.views) == (
            other.dataset_digest, other.split, other.views)

    def describe(self) -> str:
        if not self.dataset_digest:
            return f"split {self.split}, dataset and views not recorded"
        return f"dataset {self.dataset_digest}, split {self.split}, {self.views} views"


def evaluation_of(client, run_id: str, metric: str) -> Evaluation:
    """What `run_id` records of `metric` (nothing when the run is gone)."""
    import mlflow

    split = METRIC_PATTERN.fullmatch(metric).group("split")
    try:
        data = client.get_run(run_id).data
    except mlflow.exceptions.MlflowException:
        return Evaluation(None, split, "", "")
    tags = {key.rsplit(".", 1)[1]: data.tags.get(key, "") for key in tracking.evaluation_tags(split, "", "")}
    value = data.metrics.get(metric)
    return Evaluation(float(value) if value is not None else None, split, tags["dataset_digest"],
                      tags["views"])


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(metric: str, alias: str, candidate: Evaluation, version: int, holder: Evaluation | None,
           holder_version: int | None) -> Decision:
    """Whether version `version` takes `alias` from `holder_version` (None: nobody holds it)."""
    if candidate.score is None:
        return Decision(False, f"v{version} has no {metric}: evaluate its run (`mvit evaluate ... mlflow_run_id=...`) "
                               f"before it can hold @{alias}")
    if holder is None:
        return Decision(True, f"no version holds @{alias}")
    if holder.score is None or not holder.dataset_digest:
        return Decision(False, f"v{holder_version} holds @{alias} without a {metric} recorded with its dataset and "
                               f"views; evaluate its run the way v{version} was ({candidate.describe()}), then register "
                               "again, or move the alias by hand")
    if not candidate.comparable_with(holder):
        return Decision(False, f"not comparable: v{version} was evaluated on {candidate.describe()}, "
                               f"v{holder_version} (holding @{alias}) on {holder.describe()}; evaluate both the same "
                               "way to compare them")
    if candidate.score > holder.score:
        return Decision(True, f"{metric} {candidate.score:.4f} > {holder.score:.4f} of v{holder_version} "
                              f"({candidate.describe()})")
    return Decision(False, f"{metric} {candidate.score:.4f} is not above {holder.score:.4f} of v{holder_version} "
                           f"({candidate.describe()})")


def lineage_tags(state: dict, training_run_id: str) -> dict[str, str]:
    """The model version's lineage: training run, dataset manifest and digest, input fingerprint, initial
    weights and code version (from the checkpoint; a checkpoint older than its `lineage` entry gets the
    dataset's from the manifest, if it is still there)."""
    train_config = state.get("train_config", {})
    lineage = artifact.Lineage.from_dict(state.get("lineage"))
    dataset = lineage.dataset or str(train_config.get("dataset", ""))
    if dataset and not lineage.manifest_digest:
        try:
            manifest = read_manifest(dataset)
            lineage.manifest_digest, lineage.input_fingerprint = manifest.digest(), manifest.input_fingerprint
        except (ValueError, OSError):
            pass
    return {
        "mvit.training_run_id": training_run_id,
        "mvit.dataset_manifest": storage.join(dataset, MANIFEST) if dataset else "unknown",
        "mvit.dataset_digest": lineage.manifest_digest or "unknown",
        "mvit.input_fingerprint": lineage.input_fingerprint or "unknown",
        "mvit.init_checkpoint": str(train_config.get("init_checkpoint") or "none"),
        "mvit.code_version": lineage.code_version or "unknown",
        "mvit.clip_fps": str(lineage.fps or "unknown"),
    }


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


def run(cfg: RegisterConfig) -> RegisterResult:
    import mlflow
    import pandas as pd

    from pipelines.register import detection_pyfunc
    from pipelines.register.pyfunc import SIGNATURE

    uri = tracking.connect(cfg.mlflow.tracking_uri)
    client = tracking.client(uri)
    ref = artifact.resolve(cfg.checkpoint, cfg.run_dir)
    cfg = dataclasses.replace(cfg, checkpoint=ref.checkpoint, mlflow_run_id=cfg.mlflow_run_id or ref.mlflow_run_id)
    if not cfg.mlflow_run_id:
        raise ValueError(f"register needs mlflow_run_id=<training run>: {cfg.checkpoint} is a checkpoint, not a "
                         "finished run's directory that would name it")
    state = artifact.load_state(cfg.checkpoint)
    tracking.log_config(client, cfg.mlflow_run_id, "register", cfg)
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / artifact.CHECKPOINT_FILE
        if detection_pyfunc.is_detector(state):  # AVA: boxes with action scores at a keyframe (detection_pyfunc.py)
            python_model = Path(__file__).with_name("detection_pyfunc_model.py")
            input_example, fps = detection_pyfunc.example_and_fps(cfg.dataset, Path(tmp))
            signature = None  # inferred from the example (video, timestamp, boxes as JSON)
            torch.save(artifact.slim(state, fps=fps), slim)
        else:
            python_model = Path(__file__).with_name("pyfunc_model.py")
            torch.save(artifact.slim(state, temporal_views=cfg.temporal_views), slim)
            input_example = pd.DataFrame({"video": [_example_video(cfg, Path(tmp))]})
            signature = SIGNATURE
        with tracking.fluent(uri), mlflow.start_run(run_id=cfg.mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(python_model),  # models from code: nothing is pickled
                artifacts={"checkpoint": str(slim)},
                code_paths=[str(Path(mvit.__file__).parent), str(Path(pipelines.__file__).parent)],
                signature=signature,
                input_example=input_example,
                pip_requirements=PIP_REQUIREMENTS,
            )
    with tracking.fluent(uri):
        version = mlflow.register_model(info.model_uri, cfg.model_name, tags=lineage_tags(state, cfg.mlflow_run_id))
    candidate = evaluation_of(client, cfg.mlflow_run_id, cfg.metric)
    try:
        holder_version = client.get_model_version_by_alias(cfg.model_name, cfg.alias)
    except mlflow.exceptions.MlflowException:
        holder_version = None
    holder = evaluation_of(client, holder_version.run_id, cfg.metric) if holder_version is not None else None
    decision = decide(cfg.metric, cfg.alias, candidate, int(version.version), holder,
                      int(holder_version.version) if holder_version is not None else None)
    if decision.promote:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version.version)
    shown = "not evaluated" if candidate.score is None else f"{candidate.score:.4f}"  # MLflow keeps every digit
    print(f"[register] {cfg.model_name} v{version.version} ({cfg.metric}={shown}); @{cfg.alias} "
          f"{'-> this version' if decision.promote else 'stays'}: {decision.reason}", flush=True)
    return RegisterResult(model_uri=f"models:/{cfg.model_name}/{version.version}",
                          alias_uri=f"models:/{cfg.model_name}@{cfg.alias}", model_name=cfg.model_name,
                          version=int(version.version), promoted=decision.promote, metric=candidate.score,
                          tracking_uri=uri, reason=decision.reason)
