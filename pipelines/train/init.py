"""Fine-tuning: the weights a run starts from (`init_checkpoint`), read once on the driver.

Accepted: a local path or s3:// URI of a checkpoint file or directory (ours: a training checkpoint or a
slim one; an official SlowFast `.pyth`; a torchvision state dict), `models:/NAME@alias` or
`models:/NAME/VERSION` (a registered model: its `checkpoint` artifact, the slim checkpoint that
`mvit register` logs), and `runs:/RUN_ID/path` (an artifact of a run: a checkpoint file, or a logged
model's folder). The driver reads it, keeps only the weights (and our model config), checks that it
fits the run's model, and hands it to the workers through the Ray object store: no node opens the path.

Lineage: a log line and MLflow tags on the run say where the weights came from (the URI as given and
what it resolved to: registered version, source run) and which parameters were loaded, which are new
(the head, when the class set differs); `init/keys.json` lists them all.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import artifact, tracking
from pipelines.config import read_yaml_file
from pipelines.data import storage

# What a model needs from a checkpoint: weights in any layout mvit reads, our model config when present.
_WEIGHT_KEYS = ("model", "config", "format", "model_name", "model_state", "state_dict", "label_map")


@dataclass
class InitWeights:
    state: dict[str, Any]  # for mvit.create_model(..., checkpoint=state)
    source: str  # the URI as given
    lineage: dict[str, str] = field(default_factory=dict)  # where it resolved to (MLflow tags)


@dataclass
class InitReport:
    loaded: list[str]  # model parameters/buffers that took the checkpoint's values
    new: list[str]  # initialised afresh (a head of another class count)


def _weights_only(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"init_checkpoint {where}: expected a dict checkpoint, got {type(obj).__name__}")
    kept = {k: obj[k] for k in _WEIGHT_KEYS if k in obj}
    return kept if kept else obj  # a bare state dict (torchvision's)


def _read_file(path: str | Path, where: str) -> dict[str, Any]:
    return _weights_only(artifact.read_local(path), where)


def _checkpoint_in(directory: Path, where: str) -> Path:
    """The checkpoint file in a downloaded folder: a logged model's `checkpoint` artifact (MLmodel), or
    the one model.pt / .pyth / .pth in it."""
    mlmodel = directory / "MLmodel"
    if mlmodel.is_file():
        flavor = (read_yaml_file(mlmodel, "MLmodel").get("flavors") or {}).get("python_function") or {}
        relative = ((flavor.get("artifacts") or {}).get("checkpoint") or {}).get("path")
        if relative and (directory / relative).is_file():
            return directory / relative
    found = sorted(p for p in directory.rglob("*") if p.suffix in (".pt", ".pyth", ".pth") and p.is_file())
    if len(found) != 1:
        raise ValueError(f"init_checkpoint {where}: expected one checkpoint file in it, found "
                         f"{[str(p.relative_to(directory)) for p in found] or 'none'}")
    return found[0]


def _download_mlflow(uri: str, tracking_uri: str, where: str) -> dict[str, Any]:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri))
        return _read_file(_checkpoint_in(local, where) if local.is_dir() else local, where)


def _registered(uri: str, tracking_uri: str) -> tuple[dict[str, Any], dict[str, str]]:
    """models:/NAME@alias or models:/NAME/VERSION -> (weights, lineage)."""
    import mlflow

    client = tracking.client(tracking_uri)
    spec = uri.removeprefix("models:/")
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = spec.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except (ValueError, mlflow.exceptions.MlflowException) as exc:
        raise ValueError(f"init_checkpoint {uri}: no such registered model version in {tracking_uri} "
                         f"({str(exc).splitlines()[0]})") from None
    pinned = f"models:/{version.name}/{version.version}"  # what the alias pointed at when this run started
    lineage = {"mvit.init.model_version": pinned, "mvit.init.source_run": str(version.run_id or "")}
    return _download_mlflow(pinned, tracking_uri, uri), lineage


def read_init_weights(uri: str, tracking_uri: str = "") -> InitWeights:
    """Read `init_checkpoint` once (see the module doc for what it may be)."""
    if uri.startswith("models:/"):
        state, lineage = _registered(uri, tracking.resolve_uri(tracking_uri))
        return InitWeights(state, uri, lineage)
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/", 1)[0]
        state = _download_mlflow(uri, tracking.resolve_uri(tracking_uri), uri)
        return InitWeights(state, uri, {"mvit.init.source_run": run_id})
    if not storage.exists(uri):
        raise FileNotFoundError(f"init_checkpoint {uri} does not exist")
    if not storage.is_s3(uri):
        path = Path(storage.local_path(uri))
        return InitWeights(_read_file(_checkpoint_in(path, uri) if path.is_dir() else path, uri), uri)
    file_uri = uri if uri.endswith((".pt", ".pyth", ".pth")) else artifact.checkpoint_file(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(file_uri).name
        storage.download_file(file_uri, local)
        return InitWeights(_read_file(local, uri), uri)


def head_is_new(state: dict[str, Any], label_map: dict[str, int]) -> bool:
    """A checkpoint of ours knows its classes: its head is re-initialised when they are not the run's (even
    with as many of them), since its rows would name other classes. Official / torchvision weights carry no
    label map: their head is kept when its size fits."""
    return bool(state.get("label_map")) and dict(state["label_map"]) != dict(label_map)


def describe(model, state: dict[str, Any], label_map: dict[str, int]) -> InitReport:
    """Which of `model`'s tensors came from `state` (any layout) and which are new (the head, when the class
    set differs)."""
    from mvit import checkpoint as ckpt

    weights, _, where = ckpt.read_checkpoint(state)
    weights = ckpt.to_mvit_keys(weights, where)
    reset = head_is_new(state, label_map)
    loaded, new = [], []
    for name, value in model.state_dict().items():
        head = name.startswith("head.")
        same_head = not head or (not reset and name in weights and weights[name].shape == value.shape)
        (loaded if name in weights and same_head else new).append(name)
    return InitReport(loaded, new)


def record_lineage(init: InitWeights, report: InitReport, mlflow_client, run_id: str) -> None:
    """Tags on the run (source, what it resolved to, counts and the new keys) and init/keys.json."""
    tags = {"mvit.init.checkpoint": init.source, **init.lineage,
            "mvit.init.loaded_keys": str(len(report.loaded)), "mvit.init.new_keys": ",".join(report.new)[:5000]}
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keys.json"
        path.write_text(json.dumps({"source": init.source, **init.lineage, "loaded": report.loaded, "new": report.new},
                                   indent=1))
        mlflow_client.log_artifact(run_id, str(path), artifact_path="init")
