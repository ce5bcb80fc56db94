"""The trained-model artifact: one owner for the file a training run writes and every stage reads.

A training checkpoint is a directory (Ray Train's) holding `model.pt`:

    {"format": "mvit-train-v1", "model": state_dict, "config": MViTConfig dict, "model_name": str,
     "train_config": the run's effective config (credentials redacted), "label_map": {name: id},
     "lineage": Lineage dict (dataset, its digest and input fingerprint, the stored clips' fps, code version),
     "optimizer": ..., "scheduler": ..., "epoch": int, "step": int, "epoch_metrics": {...}}

(`lineage` was added later: checkpoints without it load with an empty one; serving then keeps a video's
own frame rate, as it did before.)

It is a superset of `mvit`'s own checkpoint format (`model` + `config`), so `mvit.create_model(name,
checkpoint=...)` and `mvit convert` read it too. The model is rebuilt from the stored `MViTConfig`, not
from the training recipe, so a checkpoint stays loadable when the recipe's defaults change. Serving gets
a slim copy (`slim`): weights, model config, labels and how clips are cut, without optimizer state.

Train writes it (`save_training_state`), evaluate/register/predict and the MLflow pyfunc read it
(`load_state`, `TrainedModel`); nothing else knows the file name or the keys.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from pipelines.config import from_dict, redact
from pipelines.data import storage
from pipelines.data.clips import ClipConfig

CHECKPOINT_FILE = "model.pt"
FORMAT = "mvit-train-v1"
# What inference needs: weights, how to rebuild the model, labels, how clips are cut (and at what fps).
SERVING_KEYS = ("format", "model", "config", "model_name", "train_config", "label_map", "lineage", "step")


@dataclass
class Lineage:
    """Where a trained model comes from, and the time scale of what it saw (serving resamples to it)."""

    dataset: str = ""  # the training dataset prefix (holds manifest.json)
    manifest_digest: str = ""  # Manifest.digest(): the shards' identity
    input_fingerprint: str = ""  # manifest.input_fingerprint: the raw inputs and preprocessing config
    fps: float = 0.0  # frame rate of the stored training clips (0: not known)
    short_side: int = 0  # their short side in pixels (preprocessing's short_side; 0: not known)
    code_version: str = ""  # pipelines/provenance.py code_version() of the training driver

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Lineage":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


def checkpoint_file(checkpoint: str) -> str:
    """The `model.pt` of a checkpoint given as its directory (Ray's) or as the file itself."""
    return checkpoint if checkpoint.endswith(".pt") else storage.join(checkpoint, CHECKPOINT_FILE)


def save_training_state(directory: Path, model: torch.nn.Module, optimizer, scheduler, *, epoch: int, step: int,
                        model_name: str, train_config: dict[str, Any], label_map: dict[str, int],
                        lineage: Lineage | None = None, epoch_metrics: dict[str, float] | None = None) -> Path:
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
            "lineage": redact(asdict(lineage or Lineage())),
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
    lineage: Lineage = field(default_factory=Lineage)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "TrainedModel":
        from mvit.checkpoint import load_model

        if not state.get("config"):
            raise ValueError("the checkpoint carries no model config; it was not written by `mvit train`")
        model = load_model(state)  # built from the stored MViTConfig, weights loaded strictly
        train_config = state.get("train_config", {})
        clip = from_dict(ClipConfig, train_config.get("clip", {}), origin="checkpoint train_config.clip")
        return cls(model.eval(), state.get("model_name", ""), dict(state["label_map"]), clip, train_config,
                   int(state.get("step", 0)), Lineage.from_dict(state.get("lineage")))

    @classmethod
    def load(cls, uri: str) -> "TrainedModel":
        return cls.from_state(load_state(uri))

    @property
    def labels(self) -> list[str]:
        """Class names in id order."""
        return [name for name, _ in sorted(self.label_map.items(), key=lambda kv: kv[1])]
