"""The training job: checks inputs, opens the MLflow run, and runs a Ray Train TorchTrainer."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from pipelines import tracking
from pipelines.artifact import Lineage
from pipelines.config import StageResult
from pipelines.data import storage
from pipelines.data.shards import DatasetError, read_manifest, stored_fps
from pipelines.provenance import code_version
from pipelines.raycluster import ensure_ray
from pipelines.train.config import TrainConfig
from pipelines.train.loop import train_loop_per_worker


@dataclass
class TrainResult(StageResult):
    run_name: str
    run_dir: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint: str  # URI of the latest checkpoint directory (holds model.pt)
    metrics: dict


def _checkpoint_uri(checkpoint, storage_path: str) -> str:
    if storage.is_s3(storage_path):
        return f"s3://{checkpoint.path.lstrip('/')}"
    return checkpoint.path


def run(cfg: TrainConfig) -> TrainResult:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train workers do not run in the caller's directory: local paths are resolved here, once.
    cfg = replace(cfg, dataset=storage.absolute(cfg.dataset), storage_path=storage.absolute(cfg.storage_path),
                  init_checkpoint=storage.absolute(cfg.init_checkpoint))
    manifest = read_manifest(cfg.dataset)
    train_shards = len(manifest.shard_urls(cfg.dataset, "train"))
    if train_shards < cfg.num_workers:
        raise DatasetError(
            f"{cfg.dataset} has {train_shards} train shard(s) for {cfg.num_workers} workers: every rank needs "
            "its own shards; preprocess with a smaller target_shard_bytes / max_samples_per_shard or use fewer workers"
        )
    if manifest.split_samples("train") < cfg.batch_size * cfg.num_workers:
        raise DatasetError(f"{cfg.dataset} has fewer train samples than one global batch ({cfg.batch_size} x {cfg.num_workers})")
    storage.check_reachable(cfg.storage_path)
    run_name = cfg.resolved_run_name()
    run_dir = storage.join(cfg.storage_path, run_name)
    tracking_uri = tracking.connect(cfg.mlflow.tracking_uri)  # without credentials: safe to print and store
    if cfg.mlflow.tracking_uri:
        cfg = replace(cfg, mlflow=replace(cfg.mlflow, tracking_uri=tracking_uri))
    run_id = tracking.open_run(cfg, manifest, run_dir, tracking_uri)
    lineage = Lineage(dataset=cfg.dataset, manifest_digest=manifest.digest(),
                      input_fingerprint=manifest.input_fingerprint, fps=stored_fps(cfg.dataset, manifest),
                      short_side=int(manifest.config.get("short_side") or 0), code_version=code_version())

    ensure_ray(cfg.ray)
    filesystem, path = storage.pyarrow_filesystem(cfg.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # The MLflow credentials travel in memory to the workers, which may have started before this process
        # had them (never in the runtime env: the Ray dashboard shows it).
        train_loop_config={"cfg": cfg, "run_id": run_id, "tracking_uri": tracking_uri, "run_dir": run_dir,
                           "tracking_credentials": tracking.credentials(), "lineage": lineage},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
        ),
    )
    print(f"[train] run {run_name}: {cfg.num_workers} workers, MLflow run {run_id} at {tracking_uri}", flush=True)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training of {run_name} finished without a checkpoint (see the worker logs above)")
    checkpoint = _checkpoint_uri(result.checkpoint, cfg.storage_path)
    tracking.client(tracking_uri).set_terminated(run_id, status="FINISHED")
    outcome = TrainResult(run_name, run_dir, run_id, tracking_uri, checkpoint, dict(result.metrics or {}))
    storage.write_bytes(storage.join(run_dir, "result.json"), json.dumps(outcome.to_dict(), indent=1).encode())
    return outcome

