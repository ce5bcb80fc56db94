"""Streaming clips out of WebDataset shards for training and evaluation.

Each rank reads a disjoint subset of the shards (shard i goes to rank i mod world), so no two ranks
ever see the same sample. Training resamples shards of its own subset (`resampled=True`) and cuts
the endless stream with `with_epoch`, so every rank runs the same number of steps per epoch: DDP
needs equal step counts, and shards of unequal size would otherwise leave one rank waiting.
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torchvision.transforms import v2

from pipelines.data import storage
from pipelines.data.shards import MEDIA_KEY, sample_metadata
from pipelines.data.video import clip_indices, clip_starts, decode
from pipelines.train.config import ClipConfig


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_kw):
    return storage.open_read(url)


# webdataset opens URLs through gopen; give it a boto3 reader for s3:// (any endpoint, botocore retries)
# instead of its default of shelling out to an `aws` CLI that may not be installed.
wds.gopen_schemes["s3"] = _open_s3


def rank_shards(urls: list[str], rank: int, world: int) -> list[str]:
    return urls[rank::world]


def _to_model_input(frames: np.ndarray, transform, clip: ClipConfig) -> torch.Tensor:
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, C, H, W) uint8
    video = transform(video)
    video = video.float().div_(255).sub_(clip.mean).div_(clip.std)
    return video.permute(1, 0, 2, 3).contiguous()  # (C, T, H, W)


def train_transform(clip: ClipConfig):
    crop = (
        v2.RandomResizedCrop(clip.crop_size, scale=(clip.min_crop_scale, 1.0), antialias=True)
        if clip.train_crop == "random_resized"
        else v2.RandomCrop(clip.crop_size, pad_if_needed=True)
    )
    steps = [crop] + ([v2.RandomHorizontalFlip()] if clip.horizontal_flip else [])
    return v2.Compose(steps)


def eval_transform(clip: ClipConfig):
    return v2.Compose([v2.Resize(clip.crop_size, antialias=True), v2.CenterCrop(clip.crop_size)])


def decode_train_clip(sample: dict, clip: ClipConfig, transform, rng: random.Random):
    span = (clip.num_frames - 1) * clip.sampling_rate + 1
    meta = sample_metadata(sample)
    room = max(0, int(meta.get("frames", span)) - span)
    start = rng.randint(0, room)
    frames = decode(sample[MEDIA_KEY], max_frames=start + span).frames
    index = clip_indices(len(frames), clip.num_frames, clip.sampling_rate, start)
    return _to_model_input(frames[index], transform, clip), int(sample["cls"]), sample["__key__"]


def decode_eval_views(sample: dict, clip: ClipConfig, views: int) -> tuple[torch.Tensor, int, str]:
    """All temporal views of one video: (views, C, T, H, W)."""
    frames = decode(sample[MEDIA_KEY]).frames
    transform = eval_transform(clip)
    clips = [
        _to_model_input(frames[clip_indices(len(frames), clip.num_frames, clip.sampling_rate, s)], transform, clip)
        for s in clip_starts(len(frames), clip.num_frames, clip.sampling_rate, views)
    ]
    return torch.stack(clips), int(sample["cls"]), sample["__key__"]


def _collate(batch):
    clips, labels, keys = zip(*batch)
    return torch.stack(clips), torch.tensor(labels), list(keys)


def train_loader(urls: list[str], clip: ClipConfig, batch_size: int, steps_per_epoch: int, *,
                 shuffle_buffer: int, seed: int, loader_workers: int = 0):
    if not urls:
        raise ValueError("this rank has no training shards; use fewer workers or more shards")
    rng = random.Random(seed)
    transform = train_transform(clip)
    dataset = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None, seed=seed, empty_check=False)
        .shuffle(shuffle_buffer, rng=random.Random(seed + 1))
        .map(lambda s: decode_train_clip(s, clip, transform, rng))
        .batched(batch_size, collation_fn=_collate, partial=False)
        .with_epoch(steps_per_epoch)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=loader_workers)


def eval_samples(urls: list[str], clip: ClipConfig, views: int) -> Iterator[tuple[torch.Tensor, int, str]]:
    """Every sample of `urls` once, in order (no resampling)."""
    if not urls:
        return iter(())
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
    return (decode_eval_views(s, clip, views) for s in dataset)
