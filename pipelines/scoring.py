"""Video-level scoring of a classifier on stored samples: the softmax averaged over a video's views
(`video_probabilities`, the one implementation), top-1 / top-5 and the confusion matrix (`Score`), summed
over every DDP rank.

Shared by the training loop (validation after each epoch) and `mvit evaluate` (a checkpoint on a split,
on Ray workers), so both report the same numbers for the same model and views.
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


def video_probabilities(model: torch.nn.Module, views: torch.Tensor, videos: int, *, device: torch.device,
                        precision: str = "fp32") -> torch.Tensor:
    """(videos, K) class probabilities: the softmax of each view averaged over each video's views.
    `views` holds videos x V views, video-major (all views of video 0 first)."""
    with precision_context(precision, device):
        logits = model(views.to(device)).float()
    return logits.softmax(-1).view(videos, -1, logits.shape[-1]).mean(1).cpu()


@dataclass
class Score:
    correct1: int
    correct5: int
    total: int
    confusion: np.ndarray  # (true, predicted) counts

    @classmethod
    def of(cls, labels: np.ndarray, top5: np.ndarray, num_classes: int) -> "Score":
        """From per-video true labels (N,) and top-k predicted ids (N, k), best first."""
        labels, top5 = np.asarray(labels, dtype=np.int64), np.asarray(top5, dtype=np.int64).reshape(len(labels), -1)
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        if len(labels):
            np.add.at(confusion, (labels, top5[:, 0]), 1)
        return cls(int((top5[:, 0] == labels).sum()) if len(labels) else 0,
                   int((top5 == labels[:, None]).any(1).sum()) if len(labels) else 0, len(labels), confusion)

    def per_class(self, labels: list[str]):
        """A table (pandas) of class, id, videos, correct (top-1) and top1 per class."""
        import pandas as pd

        videos = self.confusion.sum(1)
        correct = np.diag(self.confusion)
        return pd.DataFrame({"class": labels, "id": np.arange(len(labels)), "videos": videos, "correct": correct,
                             "top1": np.where(videos > 0, correct / np.maximum(videos, 1), np.nan)})

    @property
    def top1(self) -> float:
        return self.correct1 / self.total if self.total else float("nan")

    @property
    def top5(self) -> float:
        return self.correct5 / self.total if self.total else float("nan")


@torch.no_grad()
def score_videos(model: torch.nn.Module, urls: list[str], clip: ClipConfig, *, num_classes: int,
                 device: torch.device, views: int = 1, spatial: int = 1, batch_size: int = 8,
                 precision: str = "fp32") -> Score:
    """Top-1/top-5 of `model` on every sample of `urls`, the softmax averaged over `views` temporal x
    `spatial` views per video; summed over every rank (each rank passes its own shards)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    correct1 = correct5 = total = 0
    batch: list[tuple[torch.Tensor, int]] = []

    def flush():
        nonlocal correct1, correct5, total
        clips = torch.cat([c for c, _ in batch])
        labels = torch.tensor([y for _, y in batch])
        probs = video_probabilities(model, clips, len(batch), device=device, precision=precision)
        top = probs.topk(min(5, num_classes), dim=-1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(-1).sum())
        total += len(batch)
        for y, p in zip(labels.tolist(), top[:, 0].tolist()):
            confusion[y, p] += 1
        batch.clear()

    for clips, label, _key in eval_samples(urls, clip, views, spatial):
        batch.append((clips, label))
        if len(batch) * len(clips) >= batch_size:
            flush()
    if batch:
        flush()
    counts = all_reduce_sum(torch.tensor([correct1, correct5, total], dtype=torch.long))
    confusion = all_reduce_sum(confusion)
    model.train(was_training)
    return Score(int(counts[0]), int(counts[1]), int(counts[2]), confusion.numpy())
