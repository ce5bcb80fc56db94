"""The training job: checks inputs, opens the MLflow run, and runs a Ray Train TorchTrainer.

What Ray Train is asked for:
  * checkpoints: every `checkpoint_every_steps` steps and at each epoch's end (train/loop.py); Ray keeps the
    best `checkpoints_to_keep` by val/top1 (CheckpointConfig's score attribute) plus always the latest;
  * failures: a worker group that loses a worker (a crash, a killed process, a lost node) is restarted
    from the latest checkpoint, up to `max_failures` times; with a fixed `num_workers` the restart waits
    until the cluster has the resources again (Ray retries the worker group's start without limit);
  * elastic: with `min_workers` (0 < min_workers < num_workers) the restart goes on with however many
    workers the cluster has, down to min_workers (and grows back when it can, checked every
    `elastic_resize_monitor_interval_s` = 60 s); the global batch stays the recipe's (the loop accumulates).
The NaN guard's stop is not a failure Ray would retry: the loop ends normally and returns its report,
which `run` raises as NonFiniteTrainingError.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from pipelines import artifact, tracking
from pipelines.artifact import Lineage
from pipelines.config import StageResult
from pipelines.data import storage
from pipelines.data.shards import DatasetError, read_manifest, stored_fps
from pipelines.detection.task import detection_task
from pipelines.provenance import code_version
from pipelines.raycluster import ensure_ray
from pipelines.train import init
from pipelines.train.config import TrainConfig
from pipelines.train.loop import SCORE, build_model, train_loop_per_worker


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after `max_bad_steps` non-finite steps in a row (not retried: it would hit the same
    batch again). The message names the step, the batch's sample keys and the last good checkpoint."""


@dataclass
class TrainResult(StageResult):
    run_name: str
    run_dir: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint: str  # URI of the latest checkpoint directory (holds model.pt)
    metrics: dict
    best_checkpoint: str = ""  # URI of the checkpoint with the highest val/top1 (also <run_dir>/best.json)


def _record_best(result, cfg: TrainConfig, run_dir: str, run_id: str, tracking_uri: str) -> str:
    """The best of the checkpoints Ray Train kept (highest score; the later one on a tie, as Ray ranks
    them), recorded as <run_dir>/best.json (rank 0 keeps it current during the run too) and the MLflow
    tags mvit.best_checkpoint / mvit.best_step."""
    # Ray's kept checkpoints in ascending score order: the last is the best. A score of -inf (a mid-epoch
    # checkpoint, or no val split) was never evaluated: no best then.
    if not result.best_checkpoints:
        return ""
    checkpoint, metrics = result.best_checkpoints[-1]
    if not math.isfinite(float(metrics.get(SCORE, -math.inf))):
        return ""
    uri = artifact.ray_checkpoint_uri(checkpoint.path, cfg.storage_path)
    artifact.write_best(run_dir, uri, {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
    mlflow_client = tracking.client(tracking_uri)
    mlflow_client.set_tag(run_id, "mvit.best_checkpoint", uri)
    mlflow_client.set_tag(run_id, "mvit.best_step", str(metrics.get("step", "")))
    return uri


def scaling_workers(cfg: TrainConfig) -> int | tuple[int, int]:
    """ScalingConfig(num_workers): fixed, or Ray Train V2's elastic (min, max) pair."""
    if cfg.min_workers and cfg.min_workers < cfg.num_workers:
        return (cfg.min_workers, cfg.num_workers)
    return cfg.num_workers


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
    # AVA: the detection task (it also checks the chunks' context); an example is a labelled keyframe
    task = detection_task(cfg.dataset, manifest, cfg.clip, cfg.detection)
    examples = task.train_examples() if task else manifest.split_samples("train")
    if examples < cfg.global_batch():
        raise DatasetError(f"{cfg.dataset} has fewer train {'keyframes' if task else 'samples'} ({examples}) than one "
                           f"global batch ({cfg.global_batch()})")
    storage.check_reachable(cfg.storage_path)
    run_name = cfg.resolved_run_name()
    run_dir = storage.join(cfg.storage_path, run_name)
    tracking_uri = tracking.connect(cfg.mlflow.tracking_uri)  # without credentials: safe to print and store
    if cfg.mlflow.tracking_uri:
        cfg = replace(cfg, mlflow=replace(cfg.mlflow, tracking_uri=tracking_uri))
    # Fine-tuning: the weights are read here, once, checked against the run's model (a wrong architecture
    # fails before any worker starts), and handed to the workers through the object store.
    weights = init.read_init_weights(cfg.init_checkpoint, tracking_uri) if cfg.init_checkpoint else None
    report = init.describe(build_model(cfg, manifest.label_map, weights.state, task), weights.state,
                           manifest.label_map) if weights else None
    run_id = tracking.open_run(cfg, manifest, run_dir, tracking_uri)
    if weights:
        print(f"[train] init from {weights.source} {weights.lineage or ''}: {len(report.loaded)} tensors loaded, "
              f"new: {report.new or 'none'}", flush=True)
        init.record_lineage(weights, report, tracking.client(tracking_uri), run_id)
    lineage = Lineage(dataset=cfg.dataset, manifest_digest=manifest.digest(),
                      input_fingerprint=manifest.input_fingerprint, fps=stored_fps(cfg.dataset, manifest),
                      short_side=int(manifest.config.get("short_side") or 0), code_version=code_version())

    ensure_ray(cfg.ray)
    weights_ref = ray.put(weights.state) if weights else None
    filesystem, path = storage.pyarrow_filesystem(cfg.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # The MLflow credentials travel in memory to the workers, which may have started before this process
        # had them (never in the runtime env: the Ray dashboard shows it).
        train_loop_config={"cfg": cfg, "run_id": run_id, "tracking_uri": tracking_uri, "run_dir": run_dir,
                           "init_weights": weights_ref, "tracking_credentials": tracking.credentials(),
                           "lineage": lineage},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling_workers(cfg),
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoints_to_keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max",
            ),
        ),
    )
    workers = scaling_workers(cfg)
    described = f"{workers[0]}-{workers[1]} (elastic)" if isinstance(workers, tuple) else str(workers)
    print(f"[train] run {run_name}: {described} workers, global batch {cfg.global_batch()}, MLflow run {run_id} "
          f"at {tracking_uri}", flush=True)
    result = trainer.fit()
    best = _record_best(result, cfg, run_dir, run_id, tracking_uri)
    failure = result.return_value.get("failure") if isinstance(result.return_value, dict) else None
    if failure:
        mlflow_client = tracking.client(tracking_uri)
        mlflow_client.set_tag(run_id, "mvit.failure", failure[:5000])
        mlflow_client.set_terminated(run_id, status="FAILED")
        raise NonFiniteTrainingError(f"training of {run_name} stopped: {failure}")
    if result.checkpoint is None:
        raise RuntimeError(f"training of {run_name} finished without a checkpoint (see the worker logs above)")
    checkpoint = artifact.ray_checkpoint_uri(result.checkpoint.path, cfg.storage_path)
    tracking.client(tracking_uri).set_terminated(run_id, status="FINISHED")
    outcome = TrainResult(run_name, run_dir, run_id, tracking_uri, checkpoint, dict(result.metrics or {}), best)
    storage.write_bytes(storage.join(run_dir, artifact.RESULT_FILE), json.dumps(outcome.to_dict(), indent=1).encode())
    if best:
        print(f"[train] best checkpoint (val/top1): {best}", flush=True)
    return outcome

