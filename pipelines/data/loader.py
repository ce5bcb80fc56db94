"""Streaming clips out of WebDataset shards for training and evaluation.

Each rank reads a disjoint subset of the shards (shard i goes to rank i mod world), so no two ranks
ever see the same sample. Training resamples shards of its own subset (`resampled=True`) and cuts
the endless stream with `with_epoch`, so every rank runs the same number of steps per epoch: DDP
needs equal step counts, and shards of unequal size would otherwise leave one rank waiting.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch
import webdataset as wds

from pipelines.data import storage
from pipelines.data.clips import eval_views, train_clip, train_transform
from pipelines.data.shards import MEDIA_KEY, sample_metadata
from pipelines.train.config import ClipConfig


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_kw):
    return storage.open_read(url)


# webdataset opens URLs through gopen; give it a boto3 reader for s3:// (any endpoint, botocore retries)
# instead of its default of shelling out to an `aws` CLI that may not be installed.
wds.gopen_schemes["s3"] = _open_s3


def rank_shards(urls: list[str], rank: int, world: int) -> list[str]:
    return urls[rank::world]


def _decode_train(sample: dict, clip: ClipConfig, transform, rng: random.Random):
    frames = int(sample_metadata(sample)["frames"])
    return train_clip(sample[MEDIA_KEY], frames, clip, transform, rng), int(sample["cls"]), sample["__key__"]


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
        .map(lambda s: _decode_train(s, clip, transform, rng))
        .batched(batch_size, collation_fn=_collate, partial=False)
        .with_epoch(steps_per_epoch)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=loader_workers)


def eval_samples(urls: list[str], clip: ClipConfig, views: int) -> Iterator[tuple[torch.Tensor, int, str]]:
    """Every sample of `urls` once, in order (no resampling)."""
    if not urls:
        return iter(())
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
    return (
        (eval_views(s[MEDIA_KEY], clip, views, int(sample_metadata(s)["frames"])), int(s["cls"]), s["__key__"])
        for s in dataset
    )
