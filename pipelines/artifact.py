"""The trained-model artifact: one owner for the file a training run writes and every stage reads.

A training checkpoint is a directory (Ray Train's) holding `model.pt`:

    {"format": "mvit-train-v1", "model": state_dict, "config": MViTConfig dict, "model_name": str,
     "train_config": the run's effective config (credentials redacted), "label_map": {name: id},
     "optimizer": ..., "scheduler": ..., "epoch": int, "step": int, "epoch_metrics": {...}}

It is a superset of `mvit`'s own checkpoint format (`model` + `config`), so `mvit.create_model(name,
checkpoint=...)` and `mvit convert` read it too. The model is rebuilt from the stored `MViTConfig`, not
from the training recipe, so a checkpoint stays loadable when the recipe's defaults change. Serving gets
a slim copy (`slim`): weights, model config, labels and how clips are cut, without optimizer state.

Train writes it (`save_training_state`), evaluate/register/predict and the MLflow pyfunc read it
(`load_state`, `TrainedModel`); nothing else knows the file name or the keys.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.config import redact
from pipelines.data import storage
from pipelines.data.clips import ClipConfig, clip_config_from_stored

CHECKPOINT_FILE = "model.pt"
# Written by `mvit train` into its run directory (<storage_path>/<run_name>/) when it finishes: the final
# checkpoint's URI and the MLflow run id, so a run directory can stand for its checkpoint.
RESULT_FILE = "result.json"
FORMAT = "mvit-train-v1"
# What inference needs: weights, how to rebuild the model, labels, how clips are cut.
SERVING_KEYS = ("format", "model", "config", "model_name", "train_config", "label_map", "step")


def checkpoint_file(checkpoint: str) -> str:
    """The `model.pt` of a checkpoint given as its directory (Ray's) or as the file itself."""
    return checkpoint if checkpoint.endswith(".pt") else storage.join(checkpoint, CHECKPOINT_FILE)


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint as a user names it, resolved: its directory (or file) and, when known, its MLflow run."""

    checkpoint: str
    mlflow_run_id: str = ""


def resolve(uri: str) -> CheckpointRef:
    """`uri` is a checkpoint (a directory holding model.pt, or the file) or a training run directory
    (holding result.json, written when `mvit train` finished): the checkpoint it names."""
    if uri.endswith(".pt") or storage.exists(storage.join(uri, CHECKPOINT_FILE)):
        return CheckpointRef(uri)
    result_uri = storage.join(uri, RESULT_FILE)
    if storage.exists(result_uri):
        result = json.loads(storage.read_bytes(result_uri))
        return CheckpointRef(result["checkpoint"], result.get("mlflow_run_id", ""))
    raise FileNotFoundError(
        f"{uri} is neither a checkpoint (no {CHECKPOINT_FILE}) nor a finished training run (no {RESULT_FILE}); "
        "pass the checkpoint or the run directory printed by `mvit train`"
    )


def save_training_state(directory: Path, model: torch.nn.Module, optimizer, scheduler, *, epoch: int, step: int,
                        model_name: str, train_config: dict[str, Any], label_map: dict[str, int],
                        epoch_metrics: dict[str, float] | None = None) -> Path:
    """Write `directory/model.pt`: the weights plus everything needed to resume, rebuild and use the model."""
    module = getattr(model, "module", model)  # unwrap DDP
    path = directory / CHECKPOINT_FILE
    torch.save(
        {
            "format": FORMAT,
            "model": module.state_dict(),
            "config": module.cfg.replace(num_classes=module.num_classes).to_dict(),
            "model_name": model_name,
            "train_config": redact(train_config),
            "label_map": label_map,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "step": step,
            "epoch_metrics": epoch_metrics or {},
        },
        path,
    )
    return path


def read_local(path: str | Path) -> dict[str, Any]:
    """A checkpoint file on this machine (weights only: no pickle execution); a clear error if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file must give a clear message
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None


def load_state(uri: str) -> dict[str, Any]:
    """The checkpoint at `uri` (a directory or its model.pt, local or s3://)."""
    path = checkpoint_file(uri)
    if not storage.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the checkpoint printed by `mvit train`")
    if not storage.is_s3(path):
        return read_local(storage.local_path(path))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / CHECKPOINT_FILE
        storage.download_file(path, local)
        return read_local(local)


def slim(state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The serving copy of a checkpoint: without optimizer/scheduler state, plus `extra` (e.g. views)."""
    return {k: state[k] for k in SERVING_KEYS if k in state} | extra


@dataclass
class TrainedModel:
    """A trained classifier ready for inference: the model in eval mode, its labels, how clips are cut."""

    model: torch.nn.Module
    model_name: str
    label_map: dict[str, int]
    clip: ClipConfig
    train_config: dict[str, Any]
    step: int

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "TrainedModel":
        from mvit.checkpoint import load_model

        if not state.get("config"):
            raise ValueError("the checkpoint carries no model config; it was not written by `mvit train`")
        model = load_model(state)  # built from the stored MViTConfig, weights loaded strictly
        train_config = state.get("train_config", {})
        clip = clip_config_from_stored(train_config.get("clip", {}))
        return cls(model.eval(), state.get("model_name", ""), dict(state["label_map"]), clip, train_config,
                   int(state.get("step", 0)))

    @classmethod
    def load(cls, uri: str) -> "TrainedModel":
        return cls.from_state(load_state(uri))

    @property
    def labels(self) -> list[str]:
        """Class names in id order."""
        return [name for name, _ in sorted(self.label_map.items(), key=lambda kv: kv[1])]
