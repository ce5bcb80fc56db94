"""Video-level scoring of a classifier on stored samples: the softmax averaged over a video's views,
top-1 / top-5 and the confusion matrix, summed over every DDP rank.

Shared by the training loop (validation after each epoch) and `mvit evaluate` (a checkpoint on a split),
so both report the same numbers for the same model and views.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipelines.data.clips import ClipConfig
from pipelines.data.loader import eval_samples


def precision_context(precision: str, device: torch.device):
    """bf16 autocast for `precision: bf16`, nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the DDP ranks in place (the tensor itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            on_gpu = values.cuda()
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            values.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@dataclass
class Score:
    correct1: int
    correct5: int
    total: int
    confusion: np.ndarray  # (true, predicted) counts

    @property
    def top1(self) -> float:
        return self.correct1 / self.total if self.total else float("nan")

    @property
    def top5(self) -> float:
        return self.correct5 / self.total if self.total else float("nan")


@torch.no_grad()
def score_videos(model: torch.nn.Module, urls: list[str], clip: ClipConfig, *, num_classes: int,
                 device: torch.device, views: int = 1, batch_size: int = 8, precision: str = "fp32") -> Score:
    """Top-1/top-5 of `model` on every sample of `urls`, the softmax averaged over `views` temporal clips
    per video; summed over every rank (each rank passes its own shards)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    correct1 = correct5 = total = 0
    batch: list[tuple[torch.Tensor, int]] = []

    def flush():
        nonlocal correct1, correct5, total
        clips = torch.cat([c for c, _ in batch]).to(device)
        labels = torch.tensor([y for _, y in batch])
        with precision_context(precision, device):
            logits = model(clips).float()
        probs = logits.softmax(-1).view(len(batch), views, -1).mean(1).cpu()
        top = probs.topk(min(5, num_classes), dim=-1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(-1).sum())
        total += len(batch)
        for y, p in zip(labels.tolist(), top[:, 0].tolist()):
            confusion[y, p] += 1
        batch.clear()

    for clips, label, _key in eval_samples(urls, clip, views):
        batch.append((clips, label))
        if len(batch) * views >= batch_size:
            flush()
    if batch:
        flush()
    counts = all_reduce_sum(torch.tensor([correct1, correct5, total], dtype=torch.long))
    confusion = all_reduce_sum(confusion)
    model.train(was_training)
    return Score(int(counts[0]), int(counts[1]), int(counts[2]), confusion.numpy())
