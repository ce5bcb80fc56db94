"""The per-worker training loop, readable top to bottom (Ray Train runs one copy per rank).

Side effects (MLflow, checkpoints, artifacts) happen on rank 0 only. A restarted worker group picks
up the latest checkpoint through `ray.train.get_checkpoint()` and continues at the next epoch.
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
import torch.nn.functional as F

import mvit
from pipelines import artifact
from pipelines.data import storage
from pipelines.data.loader import rank_shards, train_loader
from pipelines.data.shards import read_manifest
from pipelines.detection.task import detection_task
from pipelines.scoring import all_reduce_sum, precision_context, score_videos
from pipelines.tracking import MlflowTracker, NullTracker
from pipelines.train.config import TrainConfig


def build_model(cfg: TrainConfig, num_classes: int, head: str = "cls") -> torch.nn.Module:
    overrides = {"input_size": (cfg.clip.num_frames, cfg.clip.crop_size, cfg.clip.crop_size), "head": head}
    if cfg.drop_path_rate >= 0:
        overrides["drop_path_rate"] = cfg.drop_path_rate
    model = mvit.create_model(
        cfg.model, num_classes=num_classes, checkpoint=cfg.init_checkpoint or None, **overrides
    )
    if cfg.activation_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters (norms, biases) and embeddings, as in the official recipe."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_schedule(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Linear warmup then cosine decay to min_lr, stepped per iteration (torch schedulers)."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(total - 1, int(round(cfg.optim.warmup_epochs * steps_per_epoch)))
    base_lr = optimizer.param_groups[0]["lr"]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total - warmup), eta_min=min(cfg.optim.min_lr, base_lr)
    )
    if warmup <= 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=cfg.optim.warmup_start_factor, total_iters=warmup
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = loop_config["cfg"]
    run_id: str = loop_config["run_id"]
    tracking_uri: str = loop_config["tracking_uri"]
    run_dir: str = loop_config["run_dir"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    device = ray.train.torch.get_device()

    manifest = read_manifest(cfg.dataset)
    # AVA datasets train the detector (pipelines/detection/task.py); where the two differ, the loop asks `task`.
    task = detection_task(cfg.dataset, manifest, cfg.clip, cfg.detection)
    num_classes = task.num_classes if task else len(manifest.label_map)
    train_urls = rank_shards(manifest.shard_urls(cfg.dataset, "train"), rank, world)
    val_urls = rank_shards(manifest.shard_urls(cfg.dataset, "val"), rank, world)
    global_batch = cfg.batch_size * world
    examples = task.train_examples() if task else manifest.split_samples("train")
    steps_per_epoch = max(1, examples // global_batch)
    if task and rank == 0:
        print(f"[train] {task.describe()}; {examples} training keyframes", flush=True)

    model = ray.train.torch.prepare_model(build_model(cfg, num_classes, head=task.head if task else "cls"))
    # From here torch's generator drives drop-path: a stream per rank, not the same masks on every rank.
    torch.manual_seed(cfg.seed * 1009 + rank + 1)
    lr = cfg.optim.lr * global_batch / cfg.optim.lr_batch
    if task:
        optimizer = task.optimizer(param_groups(model, cfg.optim.weight_decay), lr)
    else:
        optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=lr, betas=(0.9, 0.999))
    scheduler = build_schedule(optimizer, cfg, steps_per_epoch)
    start_epoch, step = 0, 0

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = artifact.read_local(Path(directory) / artifact.CHECKPOINT_FILE)
        getattr(model, "module", model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        print(f"[train rank {rank}] resumed from epoch {state['epoch']} (step {step})", flush=True)

    tracker = MlflowTracker(tracking_uri, run_id) if rank == 0 else NullTracker()
    # Steps whose per-step metrics the run already holds: an attempt that died after them is redone
    # from its last checkpoint, and its repeated steps are not logged a second time.
    logged_through = tracker.last_step("train/loss")
    if checkpoint:
        tracker.mark_resumed(state["epoch"])
        if state.get("epoch_metrics"):
            # The previous group may have died between committing this checkpoint and logging its epoch.
            tracker.log_metrics_once(state["epoch_metrics"], step)
    seen_keys: set[str] = set()
    val = None
    for epoch in range(start_epoch, cfg.epochs):
        seed = cfg.seed * 100_003 + epoch * 1009 + rank
        if task:
            loader = task.train_loader(train_urls, batch_size=cfg.batch_size, steps_per_epoch=steps_per_epoch,
                                       shuffle_buffer=cfg.shuffle_buffer, seed=seed, loader_workers=cfg.loader_workers)
        else:
            loader = train_loader(
                train_urls, cfg.clip, cfg.batch_size, steps_per_epoch,
                shuffle_buffer=cfg.shuffle_buffer, seed=seed,
                loader_workers=cfg.loader_workers,
            )
        model.train()
        epoch_loss, epoch_steps = 0.0, 0
        window_start, window_clips = time.perf_counter(), 0
        for batch in loader:
            if task:
                loss, keys = task.loss(model, batch, device, cfg.precision)
            else:
                clips, labels, keys = batch
                clips, labels = clips.to(device), labels.to(device)
                with precision_context(cfg.precision, device):
                    logits = model(clips)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.optim.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = loss.item()
            epoch_loss += loss_value
            epoch_steps += 1
            window_clips += len(keys) * world
            if cfg.audit_sample_keys:
                seen_keys.update(keys)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at epoch {epoch} step {step}")
            if step % cfg.log_every_steps == 0 and step > logged_through:
                elapsed = time.perf_counter() - window_start
                tracker.log_metrics(
                    {"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0],
                     "train/clips_per_s": window_clips / elapsed if elapsed > 0 else 0.0},
                    step,
                )
                window_start, window_clips = time.perf_counter(), 0

        if task:
            val_metrics = task.validate(model, val_urls, device=device, batch_size=cfg.batch_size,
                                        precision=cfg.precision)
        else:
            val = score_videos(model, val_urls, cfg.clip, num_classes=num_classes, device=device,
                               batch_size=cfg.batch_size, precision=cfg.precision)
            val_metrics = {"val/top1": val.top1, "val/top5": val.top5} if val.total else {}
        train_loss = float(all_reduce_sum(torch.tensor([epoch_loss / max(1, epoch_steps)])) / world)
        metrics = {"epoch": epoch, "train/epoch_loss": train_loss, **val_metrics}
        epoch_metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if rank == 0:
            print(f"[train] epoch {epoch}: {json.dumps(metrics)}", flush=True)

        if cfg.audit_sample_keys:
            audit = {"rank": rank, "world": world, "keys": sorted(seen_keys), "shards": train_urls}
            storage.write_bytes(storage.join(run_dir, "data_audit", f"rank-{rank}.json"), json.dumps(audit).encode())
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                artifact.save_training_state(Path(tmp), model, optimizer, scheduler, epoch=epoch, step=step,
                                             model_name=cfg.model, train_config=asdict(cfg),
                                             label_map=manifest.label_map, epoch_metrics=epoch_metrics)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            else:
                ckpt = None
            ray.train.report(metrics, checkpoint=ckpt)
        # Logged once the epoch's checkpoint is committed, and at most once per step: an epoch redone after
        # a restart does not add a second point to the per-epoch curves.
        tracker.log_metrics_once(epoch_metrics, step)

    if rank == 0 and isinstance(tracker, MlflowTracker):
        _log_final_artifacts(tracker, manifest.labels, val.confusion if val is not None else None)


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
