"""The per-worker training loop, readable top to bottom (Ray Train runs one copy per rank).

Side effects (MLflow, checkpoints, artifacts) happen on rank 0 only. A restarted worker group picks up
the latest checkpoint through `ray.train.get_checkpoint()` and continues at the exact step it was taken
at: checkpoints are written every `checkpoint_every_steps` steps and at each epoch's end, and carry the
position in the data stream and every rank's random generators, so with the same number of workers the
steps after a resume are those an uninterrupted run takes (same batches, same drop-path masks).

A step takes `global_batch / batch_size` micro-batches spread over the ranks, each accumulating its share
(pipelines/train/steps.py): the global batch is the recipe's whatever the number of workers. A step whose loss or gradient norm is not finite on some rank
is skipped on all of them; `max_bad_steps` in a row end the run with a report the driver raises (not an
exception, which Ray Train would answer with a restart into the same wall).

An AVA dataset trains the detector (pipelines/detection/task.py): where the two tasks differ (head, epoch
size, loader, loss, validation) the loop asks the task; accumulation, the NaN guard, checkpoints and exact
mid-epoch resume are the same code for both.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import mvit
from pipelines import artifact, tracking
from pipelines.data import storage
from pipelines.data.loader import rank_shards, train_loader
from pipelines.data.shards import read_manifest
from pipelines.detection.data import DetectionBatch
from pipelines.detection.task import DetectionTask, detection_task
from pipelines.raycluster import quiet_train_worker_logs
from pipelines.scoring import precision_context, score_videos
from pipelines.tracking import Attempt, MlflowTracker, NullTracker, system_metrics
from pipelines.train import init, optim, rng
from pipelines.train.config import BatchPlan, TrainConfig
from pipelines.train.objective import Targets, soft_target_cross_entropy
from pipelines.train.progress import Progress
from pipelines.train.steps import accumulate_gradients, check_step, grouped

# The metric Ray Train ranks checkpoints by (CheckpointConfig.checkpoint_score_attribute): the validation
# metric at an epoch's end; a mid-epoch checkpoint has not been evaluated and scores -inf, so it is never the best and
# is the first to go once a newer checkpoint exists (Ray keeps the latest whatever its score).
SCORE = "checkpoint_score"
# What SCORE is at an epoch's end: val/top1, or for detection val/frame_map.
VAL_SCORE = {"classification": "val/top1", "detection": "val/frame_map"}


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_step{step:08d}"


def build_model(cfg: TrainConfig, label_map: dict[str, int], init_state: dict | None = None,
                task: DetectionTask | None = None) -> torch.nn.Module:
    """The run's model at the recipe's input size (T x crop x crop, or crop x crop for the image
    variants), from `init_state` (the weights the driver read, see init.py) when fine-tuning: a head
    trained on other classes is re-initialised. With a detection `task`: the detector (RoI head, one
    output per AVA action id), whose head `create_model` re-initialises over a classifier's checkpoint."""
    num_classes = task.num_classes if task else len(label_map)
    crop = (cfg.clip.crop_size, cfg.clip.crop_size)
    overrides = {"input_size": (cfg.clip.num_frames, *crop) if mvit.get_config(cfg.model).is_video else crop,
                 "head": task.head if task else "cls"}
    if cfg.drop_path_rate >= 0:
        overrides["drop_path_rate"] = cfg.drop_path_rate
    model = mvit.create_model(cfg.model, num_classes=num_classes, checkpoint=init_state, **overrides)
    if init_state is not None and init.head_is_new(init_state, label_map):
        model.reset_classifier(num_classes)
    if cfg.activation_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.optim.freeze_backbone:
        optim.freeze_backbone(model)
    return model


def _mixing_generator(data_seed: int, step_in_epoch: int) -> torch.Generator:
    """MixUp/CutMix draws of one step of a rank: a function of (seed, epoch, rank, step), so a run resumed
    mid-epoch mixes its later steps exactly as an uninterrupted one."""
    return torch.Generator().manual_seed(data_seed * 1_000_003 + step_in_epoch)


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """One rank's training. Returns, on rank 0, {"failure": message} when the NaN guard stopped the run."""
    import ray.train
    import ray.train.torch

    quiet_train_worker_logs()
    cfg: TrainConfig = loop_config["cfg"]
    run_id: str = loop_config["run_id"]
    tracking_uri: str = loop_config["tracking_uri"]
    tracking.use_credentials(loop_config.get("tracking_credentials", {}))
    run_dir: str = loop_config["run_dir"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives (the generators' gather) use the current device

    manifest = read_manifest(cfg.dataset)
    # AVA datasets train the detector (pipelines/detection/task.py); where the two differ, the loop asks `task`.
    task = detection_task(cfg.dataset, manifest, cfg.clip, cfg.detection)
    num_classes = task.num_classes if task else len(manifest.label_map)
    train_urls = rank_shards(manifest.shard_urls(cfg.dataset, "train"), rank, world)
    val_urls = rank_shards(manifest.shard_urls(cfg.dataset, "val"), rank, world)
    # The recipe's global batch whatever the world size: fewer workers accumulate more micro-batches.
    plan = BatchPlan.of(cfg.global_batch(), cfg.batch_size, world)
    accumulation = plan.accumulation(rank)  # this rank's micro-batches per step
    # One example is a clip: a video, or for AVA a labelled keyframe (a stored sample is a chunk of many).
    examples = task.train_examples() if task else manifest.split_samples("train")
    steps_per_epoch = max(1, examples // plan.global_batch)
    if task and rank == 0:
        ignored = [name for name, on in (("mixup", cfg.mixup.enabled), ("optim.label_smoothing", cfg.optim.label_smoothing),
                                         ("clip.repeated_augment", cfg.clip.repeated_augment > 1)) if on]
        print(f"[train] {task.describe()}; {examples} training keyframes"
              + (f"; not used by detection: {', '.join(ignored)}" if ignored else ""), flush=True)

    init_state = ray.get(loop_config["init_weights"]) if loop_config.get("init_weights") is not None else None
    model = ray.train.torch.prepare_model(build_model(cfg, manifest.label_map, init_state, task))
    del init_state
    lr = optim.scaled_lr(cfg.optim.lr, cfg.optim.lr_batch, plan.global_batch)
    optimizer = optim.build_optimizer(model, cfg.optim, lr)
    scheduler = optim.build_schedule(optimizer, cfg.optim, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, base_lr=lr)
    start_epoch, start_in_epoch, step, skipped, from_epoch = 0, 0, 0, 0, None
    resumed_loss_sum, resumed_finite_steps = 0.0, 0  # of the steps of a resumed epoch taken before the resume

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = artifact.read_local(Path(directory) / artifact.CHECKPOINT_FILE)
        getattr(model, "module", model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_in_epoch = artifact.resume_position(state)
        step, skipped, from_epoch = state["step"], state.get("skipped_steps", 0), state["epoch"]
        resumed_loss_sum = state.get("position", {}).get("epoch_loss_sum", 0.0)
        resumed_finite_steps = state.get("position", {}).get("epoch_finite_steps", 0)
        print(f"[train rank {rank}] resumed at epoch {start_epoch} step {step} ({start_in_epoch} of the epoch "
              f"done)", flush=True)
    # From here torch's generator drives drop-path: a stream per rank, not the same masks on every rank.
    # A resume with the same number of ranks restores each rank's generators; otherwise they start afresh.
    saved_rng = state.get("rng", []) if checkpoint else []
    if len(saved_rng) == world:
        rng.restore(saved_rng[rank], device)
    else:
        rng.reseed(cfg.seed, rank, step)

    tracker = MlflowTracker(tracking_uri, run_id) if rank == 0 else NullTracker()
    # Steps whose per-step metrics the run already holds: an attempt that died after them is redone
    # from its last checkpoint, and its repeated steps are not logged a second time.
    logged_through = tracker.last_step("train/loss")
    attempt = Attempt(world, plan.accumulations, plan.global_batch, plan.describe(), step, from_epoch,
                      max(0, logged_through - step))
    tracker.start_attempt(attempt)
    if rank == 0:
        print(f"[train] {attempt.describe()}; {steps_per_epoch} steps per epoch", flush=True)
    if checkpoint and state.get("epoch_metrics") and start_in_epoch == 0:
        # The previous group may have died between committing this checkpoint and logging its epoch.
        tracker.log_metrics_once(state["epoch_metrics"], step)
    last_good = storage.join(run_dir, os.path.basename(checkpoint.path.rstrip("/"))) if checkpoint else ""

    def commit(epoch: int, position: dict, metrics: dict, epoch_metrics: dict | None = None) -> None:
        """Report a checkpoint of the state after `step` to Ray Train (which uploads it to storage); the last
        good checkpoint is the last one before a run of non-finite steps."""
        nonlocal last_good
        started = time.perf_counter()
        states = rng.gather(device, world)  # every rank's generators, in the one file rank 0 writes
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                artifact.save_training_state(Path(tmp), model, optimizer, scheduler, epoch=epoch, step=step,
                                             model_name=cfg.model, train_config=asdict(cfg),
                                             label_map=manifest.label_map, lineage=loop_config.get("lineage"),
                                             epoch_metrics=epoch_metrics, position=position, rng=states,
                                             world_size=world, skipped_steps=skipped)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(step))
        # Ray Train registers a reported checkpoint when its controller next polls the workers; a failure
        # before that would resume from the checkpoint before. Waiting for the commit bounds what a failure
        # costs to `checkpoint_every_steps` steps, and returns Ray's ranking of the kept checkpoints.
        kept = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        seconds = time.perf_counter() - started
        if bad_in_a_row == 0:
            last_good = storage.join(run_dir, checkpoint_dir_name(step))
        if rank == 0:
            print(f"[train] checkpoint at step {step} committed in {seconds:.2f}s", flush=True)
            _point_at_best(kept, cfg.storage_path, run_dir)
        if step > logged_through:
            tracker.log_metrics({"train/checkpoint_s": seconds}, step)

    progress = Progress(cfg.epochs, steps_per_epoch)
    bad_in_a_row, failure, val = 0, None, None
    seen_keys: set[str] = set()
    with system_metrics(tracking_uri, run_id, cfg.system_metrics_interval_s if rank == 0 else 0):
        for epoch in range(start_epoch, cfg.epochs):
            first = start_in_epoch if epoch == start_epoch else 0
            data_seed = cfg.seed * 100_003 + epoch * 1009 + rank
            if task:  # the same stream contract: batch k of a resumed epoch is batch k of the whole epoch
                loader = task.train_loader(train_urls, batch_size=cfg.batch_size,
                                           steps_per_epoch=steps_per_epoch * accumulation,
                                           shuffle_buffer=cfg.shuffle_buffer, seed=data_seed,
                                           loader_workers=cfg.loader_workers, start_batch=first * accumulation)
            else:
                loader = train_loader(
                    train_urls, cfg.clip, cfg.batch_size, steps_per_epoch * accumulation,
                    shuffle_buffer=cfg.shuffle_buffer, seed=data_seed,
                    loader_workers=cfg.loader_workers, start_batch=first * accumulation,
                )
            model.train()
            epoch_loss, epoch_steps = (resumed_loss_sum, resumed_finite_steps) if first else (0.0, 0)
            for step_in_epoch, micro_batches in enumerate(grouped(progress.timed(loader), accumulation), first):
                step += 1
                # soft targets: label smoothing, and MixUp/CutMix when on
                targets = None if task else Targets(num_classes, cfg.mixup, cfg.optim.label_smoothing,
                                                    _mixing_generator(data_seed, step_in_epoch))

                def loss_of(batch, step=step, targets=targets):
                    if task:  # multi-label BCE over the boxes: per-box labels take no MixUp / smoothing
                        loss, _keys = task.loss(model, batch, device, cfg.precision)
                    else:
                        clips, soft = targets(*batch[:2])
                        with precision_context(cfg.precision, device):
                            logits = model(clips.to(device))
                        loss = soft_target_cross_entropy(logits, soft.to(device))
                    return loss * math.nan if rank == 0 and cfg.faults.nan_at(step) else loss

                optimizer.zero_grad(set_to_none=True)
                loss_sum = accumulate_gradients(model, micro_batches, loss_of, plan.loss_scale)
                trained = [p for p in model.parameters() if p.grad is not None]  # a frozen backbone has none
                grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.optim.grad_clip or math.inf)
                checked = check_step(loss_sum, grad_norm, plan.micro_batches)
                keys = [key for batch in micro_batches for key in _batch_keys(batch)]
                if checked.finite:
                    optimizer.step()
                    bad_in_a_row = 0
                    epoch_loss += checked.mean_loss
                    epoch_steps += 1
                else:  # skipped on every rank; the schedule still advances, as the data does
                    skipped += 1
                    bad_in_a_row += 1
                    report = _bad_step_report(step, float(loss_sum), float(grad_norm), keys, world)
                    if rank == 0:
                        print(f"[train] {report}; optimizer step skipped ({bad_in_a_row} in a row, "
                              f"{skipped} in all)", flush=True)
                    if step > logged_through:
                        tracker.log_metrics({"train/skipped_steps": skipped}, step)
                    if bad_in_a_row >= cfg.max_bad_steps:
                        failure = (f"{cfg.max_bad_steps} non-finite steps in a row, the last at epoch {epoch} "
                                   f"step {step}: {report}. The last good checkpoint is "
                                   f"{last_good or 'none (no checkpoint was written before)'}")
                        break
                scheduler.step()
                progress.stepped(plan.global_batch)
                if cfg.audit_sample_keys:
                    seen_keys.update(keys)
                if step % cfg.log_every_steps == 0:
                    line, metrics = progress.report(step=step, epoch=epoch, loss=checked.mean_loss,
                                                    lr=scheduler.get_last_lr()[0])
                    metrics |= {"train/world_size": world, "train/global_batch": plan.global_batch,
                                "train/skipped_steps": skipped}
                    if rank == 0:
                        print(line, flush=True)
                    if step > logged_through:
                        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step)
                if (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
                        and step_in_epoch + 1 < steps_per_epoch):  # the epoch's end checkpoints anyway
                    position = {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "epoch_loss_sum": epoch_loss,
                                "epoch_finite_steps": epoch_steps}
                    commit(epoch, position, {"epoch": epoch, "step": step, SCORE: -math.inf})
            if failure:
                break

            if task:  # a collective (all_gather): every rank calls it, also one without val shards
                val_metrics = task.validate(model, val_urls, device=device, batch_size=cfg.batch_size,
                                            precision=cfg.precision)
            else:
                val = score_videos(model, val_urls, cfg.clip, num_classes=num_classes, device=device,
                                   batch_size=cfg.batch_size, precision=cfg.precision)
                val_metrics = {"val/top1": val.top1, "val/top5": val.top5} if val.total else {}
            # The step losses are already means over the ranks: every rank holds the same epoch mean.
            metrics = {"epoch": epoch, "step": step, "train/epoch_loss": epoch_loss / max(1, epoch_steps),
                       **val_metrics}
            epoch_metrics = {k: v for k, v in metrics.items() if k not in ("epoch", "step")}
            if rank == 0:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}  # MLflow keeps all digits
                print(f"[train] epoch {epoch}: {json.dumps(shown)}", flush=True)

            if cfg.audit_sample_keys:
                audit = {"rank": rank, "world": world, "keys": sorted(seen_keys), "shards": train_urls}
                storage.write_bytes(storage.join(run_dir, "data_audit", f"rank-{rank}.json"), json.dumps(audit).encode())
            score = val_metrics.get(VAL_SCORE["detection" if task else "classification"], -math.inf)
            commit(epoch, {"epoch": epoch + 1, "step_in_epoch": 0}, {**metrics, SCORE: score}, epoch_metrics)
            # Logged once the epoch's checkpoint is committed, and at most once per step: an epoch redone after
            # a restart does not add a second point to the per-epoch curves.
            tracker.log_metrics_once(epoch_metrics, step)

    if rank == 0 and isinstance(tracker, MlflowTracker):
        _log_final_artifacts(tracker, manifest.labels, val.confusion if val is not None else None)
    if failure and rank == 0:
        return {"failure": failure}
    return None


def _batch_keys(batch) -> list[str]:
    """The sample keys of a micro-batch: (clips, labels, keys) for classification, a DetectionBatch (its
    keyframe keys) for detection."""
    return list(batch.keys) if isinstance(batch, DetectionBatch) else list(batch[2])


def _point_at_best(kept: list, storage_path: str, run_dir: str) -> None:
    """<run dir>/best.json -> the best of the checkpoints Ray Train keeps (its list is in ascending score
    order), so `checkpoint=best` works while the run goes on; unchanged when nothing was evaluated yet."""
    if kept and math.isfinite(float(kept[-1].metrics.get(SCORE, -math.inf))):
        best = kept[-1]
        artifact.write_best(run_dir, artifact.ray_checkpoint_uri(best.checkpoint.path, storage_path),
                            {k: v for k, v in best.metrics.items() if isinstance(v, (int, float, str))})


def _bad_step_report(step: int, loss: float, grad_norm: float, keys: list[str], world: int) -> str:
    """What went wrong at `step`, with the sample keys of the ranks whose loss was not finite (all ranks'
    keys when only the gradient norm was). A collective: every rank calls it at the same step."""
    mine = {"finite_loss": math.isfinite(loss), "keys": keys}
    everyone = [mine]
    if world > 1 and dist.is_available() and dist.is_initialized():
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    culprits = [r for r, e in enumerate(everyone) if not e["finite_loss"]]
    named = culprits or list(range(world))
    batch_keys = [key for r in named for key in everyone[r]["keys"]]
    what = f"non-finite loss on rank(s) {culprits}" if culprits else f"non-finite gradient norm ({grad_norm})"
    return f"step {step}: {what}; sample keys of the batch: {batch_keys}"


def _log_final_artifacts(tracker: MlflowTracker, labels: list[str], confusion: np.ndarray | None) -> None:
    from pipelines import plots

    with tempfile.TemporaryDirectory() as tmp:
        series = {k: tracker.history(k) for k in ("train/loss", "train/lr", "val/top1", "val/frame_map")}
        series = {k: points for k, points in series.items() if points or k != "val/frame_map"}  # detection only
        curves = os.path.join(tmp, "curves.png")
        plots.curves(series, curves)
        tracker.log_artifact(curves, "plots")
        if confusion is not None:
            path = os.path.join(tmp, "confusion_matrix_val.png")
            plots.confusion_matrix(confusion, labels, path)
            tracker.log_artifact(path, "plots")
