"""The trained-model artifact: one owner for the file a training run writes and every stage reads.

A training checkpoint is a directory (Ray Train's) holding `model.pt`:

    {"format": "mvit-train-v2", "model": state_dict, "config": MViTConfig dict, "model_name": str,
     "train_config": the run's effective config (credentials redacted), "label_map": {name: id},
     "lineage": Lineage dict (dataset, its digest and input fingerprint, the stored clips' fps, code version),
     "optimizer": ..., "scheduler": ..., "epoch": int, "step": int, "epoch_metrics": {...},
     "position": {"epoch": int, "step_in_epoch": int, ...}, "world_size": int, "rng": [per-rank states],
     "skipped_steps": int}

`position` is where a resumed run goes on: the epoch and the optimizer steps of it already taken (an
end-of-epoch checkpoint of epoch e holds (e + 1, 0)); `rng` holds every rank's random generators (torch,
CUDA, numpy, python) in rank order. Checkpoints written before step checkpoints existed
("mvit-train-v1": epoch ends only, no position or generators) still resume (`resume_position`) and load.

(`lineage` was added later: checkpoints without it load with an empty one; serving then keeps a video's
own frame rate, as it did before.)

It is a superset of `mvit`'s own checkpoint format (`model` + `config`), so `mvit.create_model(name,
checkpoint=...)` and `mvit convert` read it too. The model is rebuilt from the stored `MViTConfig`, not
from the training recipe, so a checkpoint stays loadable when the recipe's defaults change. Serving gets
a slim copy (`slim`): weights, model config, labels and how clips are cut, without optimizer state.

Which checkpoint of a run is the best: `<run dir>/best.json` (`write_best`) names it, from Ray Train's own
ranking of the checkpoints it keeps (CheckpointConfig's score attribute, val/top1): rank 0 rewrites it after
each committed checkpoint, so it is current while the run goes on, and the driver once more at the end.
`resolve("best", run_dir)` reads it; "latest" is the checkpoint of the run's `result.json`.

Train writes it (`save_training_state`), evaluate/register/predict and the MLflow pyfunc read it
(`load_state`, `TrainedModel`); nothing else knows the file name or the keys.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from pipelines.config import redact
from pipelines.data import storage
from pipelines.data.clips import ClipConfig, clip_config_from_stored

CHECKPOINT_FILE = "model.pt"
FORMAT = "mvit-train-v2"
BEST_FILE = "best.json"  # in the run directory: which checkpoint scored best
RESULT_FILE = "result.json"  # in the run directory: the training job's result (holds the latest checkpoint)
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
                        lineage: Lineage | None = None, epoch_metrics: dict[str, float] | None = None,
                        position: dict[str, Any] | None = None, rng: list[dict[str, Any]] | None = None,
                        world_size: int = 1, skipped_steps: int = 0) -> Path:
    """Write `directory/model.pt`: the weights plus everything needed to resume, rebuild and use the model.
    `position` ({"epoch", "step_in_epoch"}: the optimizer steps of that epoch taken, plus what the loop needs
    to finish the epoch's numbers) defaults to the start of the epoch after `epoch`."""
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
            "position": position or {"epoch": epoch + 1, "step_in_epoch": 0},
            "world_size": world_size,
            "rng": rng or [],
            "skipped_steps": skipped_steps,
        },
        path,
    )
    return path


def resume_position(state: dict[str, Any]) -> tuple[int, int]:
    """(epoch, optimizer steps of it already taken) where a run resumed from `state` goes on."""
    if "position" in state:
        return int(state["position"]["epoch"]), int(state["position"]["step_in_epoch"])
    return int(state["epoch"]) + 1, 0  # mvit-train-v1: written at epoch ends only


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


def ray_checkpoint_uri(path: str, storage_path: str) -> str:
    """The URI of a Ray Train checkpoint (its `path`, which has no scheme) under `storage_path`."""
    return f"s3://{path.lstrip('/')}" if storage.is_s3(storage_path) else path


def write_best(run_dir: str, checkpoint: str, metrics: dict[str, Any]) -> str:
    """Record `checkpoint` (a URI) as the run's best, with the metrics it was reported with; returns the
    pointer's URI."""
    uri = storage.join(run_dir, BEST_FILE)
    storage.write_bytes(uri, json.dumps({"checkpoint": checkpoint, "metrics": metrics}, indent=1).encode())
    return uri


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint as a user names it, resolved: its directory (or file) and, when known, its MLflow run."""

    checkpoint: str
    mlflow_run_id: str = ""


def resolve(uri: str, run_dir: str = "") -> CheckpointRef:
    """The checkpoint a user names: a checkpoint (a directory holding model.pt, or the file), a finished
    training run's directory (its result.json: the final checkpoint and the MLflow run), or "best" /
    "latest" of the run in `run_dir` (its best.json, kept current while the run goes on / its result.json)."""
    if uri in ("best", "latest"):
        if not run_dir:
            raise ValueError(f"checkpoint={uri} needs run_dir=<the training run's directory> "
                             "(printed by `mvit train`, also the run_dir of its result)")
        result_uri = storage.join(run_dir, RESULT_FILE)
        result = _read_pointer(result_uri) if storage.exists(result_uri) else {}
        if uri == "latest" and not result:
            raise FileNotFoundError(f"{result_uri} does not exist: the run has not finished; pass a checkpoint "
                                    f"directory of {run_dir} instead")
        best_uri = storage.join(run_dir, BEST_FILE)
        if uri == "best" and not storage.exists(best_uri):
            raise FileNotFoundError(f"{best_uri} does not exist: no checkpoint of the run has been evaluated yet "
                                    f"(best.json is written at the first epoch's end); pass a checkpoint directory "
                                    f"of {run_dir} instead")
        named = _read_pointer(best_uri) if uri == "best" else result
        return CheckpointRef(str(named["checkpoint"]), str(result.get("mlflow_run_id", "")))
    if uri.endswith(".pt") or storage.exists(storage.join(uri, CHECKPOINT_FILE)):
        return CheckpointRef(uri)
    if storage.exists(storage.join(uri, RESULT_FILE)):
        result = _read_pointer(storage.join(uri, RESULT_FILE))
        return CheckpointRef(str(result["checkpoint"]), str(result.get("mlflow_run_id", "")))
    raise FileNotFoundError(
        f"{uri} is neither a checkpoint (no {CHECKPOINT_FILE}) nor a finished training run (no {RESULT_FILE}); "
        "pass the checkpoint or the run directory printed by `mvit train` (or checkpoint=best|latest with run_dir=)"
    )


def _read_pointer(pointer: str) -> dict[str, Any]:
    try:
        data = json.loads(storage.read_bytes(pointer))
        str(data["checkpoint"])
        return data
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{pointer} does not name a checkpoint ({type(exc).__name__}: {exc})") from None


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
        clip = clip_config_from_stored(train_config.get("clip", {}))
        return cls(model.eval(), state.get("model_name", ""), dict(state["label_map"]), clip, train_config,
                   int(state.get("step", 0)), Lineage.from_dict(state.get("lineage")))

    @classmethod
    def load(cls, uri: str) -> "TrainedModel":
        return cls.from_state(load_state(uri))

    @property
    def labels(self) -> list[str]:
        """Class names in id order."""
        return [name for name, _ in sorted(self.label_map.items(), key=lambda kv: kv[1])]
