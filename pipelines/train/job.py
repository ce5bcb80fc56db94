"""The training job: checks inputs, opens the MLflow run, and runs a Ray Train TorchTrainer."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from pipelines import artifact, tracking
from pipelines.config import StageResult
from pipelines.data import storage
from pipelines.data.shards import DatasetError, read_manifest
from pipelines.raycluster import ensure_ray
from pipelines.train import init
from pipelines.train.config import TrainConfig
from pipelines.train.loop import build_model, train_loop_per_worker


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
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train workers do not run in the caller's directory: local paths are resolved here, once.
    mlflow_uri = cfg.init_checkpoint.startswith(("models:/", "runs:/"))
    cfg = replace(cfg, dataset=storage.absolute(cfg.dataset), storage_path=storage.absolute(cfg.storage_path),
                  init_checkpoint=cfg.init_checkpoint if mlflow_uri else storage.absolute(cfg.init_checkpoint))
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
    tracking_uri = tracking.resolve_uri(cfg.mlflow.tracking_uri)
    # Fine-tuning: the weights are read here, once, checked against the run's model (a wrong architecture
    # fails before any worker starts), and handed to the workers through the object store.
    weights = init.read_init_weights(cfg.init_checkpoint, tracking_uri) if cfg.init_checkpoint else None
    report = init.describe(build_model(cfg, manifest.label_map, weights.state), weights.state,
                           manifest.label_map) if weights else None
    run_id = tracking.open_run(cfg, manifest, run_dir)
    if weights:
        print(f"[train] init from {weights.source} {weights.lineage or ''}: {len(report.loaded)} tensors loaded, "
              f"new: {report.new or 'none'}", flush=True)
        init.record_lineage(weights, report, tracking.client(tracking_uri), run_id)

    ensure_ray(cfg.ray)
    weights_ref = ray.put(weights.state) if weights else None
    filesystem, path = storage.pyarrow_filesystem(cfg.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "run_id": run_id, "tracking_uri": tracking_uri, "run_dir": run_dir,
                           "init_weights": weights_ref},
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
    storage.write_bytes(storage.join(run_dir, artifact.RESULT_FILE), json.dumps(outcome.to_dict(), indent=1).encode())
    return outcome

