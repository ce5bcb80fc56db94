"""Streaming clips out of WebDataset shards for training and evaluation.

Each rank reads a disjoint subset of the shards (shard i goes to rank i mod world), so no two ranks
ever see the same sample. Training resamples shards of its own subset (`resampled=True`) and cuts
the endless stream at a fixed number of batches, so every rank runs the same number of steps per epoch: DDP
needs equal step counts, and shards of unequal size would otherwise leave one rank waiting.

The training stream is a function of its seed: shard draws, the shuffle buffer, the temporal offsets
and the random crops all come from generators seeded by (seed, DataLoader worker), so a run can be
repeated and a bad one investigated. (`wds.WebDataset(resampled=True)` does not pass its seed on: its shard draws mix
in the time and os.urandom, so two runs of the same recipe saw different data.)
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator

import torch
import webdataset as wds

from pipelines.data.clips import ClipConfig, eval_views, train_clip, train_transform
from pipelines.data.shards import MEDIA_KEY, DatasetError, read_samples, sample_metadata, tar_samples


def rank_shards(urls: list[str], rank: int, world: int) -> list[str]:
    return urls[rank::world]


def _loader_worker() -> tuple[int, int]:
    """(this DataLoader worker's id, the number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _worker_rng(seed: int, purpose: str) -> random.Random:
    # Each DataLoader worker copies the dataset; a generator built at construction would hand every
    # worker the same stream (the same shuffle picks, the same temporal offsets).
    return random.Random(f"{seed}/{purpose}/{_loader_worker()[0]}")


def _shuffled(bufsize: int, seed: int, initial: int = 64):
    """A shuffle buffer (as wds.shuffle) whose generator is made in the worker that iterates it. It starts
    yielding at `initial` samples and grows by one sample per yield up to `bufsize`, so the first batch
    does not wait for a full buffer."""
    def stage(samples):
        rng = _worker_rng(seed, "shuffle")
        samples = iter(samples)
        buffer: list = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) < bufsize:
                buffer.extend(itertools.islice(samples, 1))
            if len(buffer) >= min(initial, bufsize):
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer
    return stage


def class_id(sample: dict) -> int:
    """The single class of a classification sample; a multi-label (AVA) sample is an error that says what to do."""
    try:
        return int(sample["cls"])
    except ValueError:
        raise DatasetError(f"sample {sample['__key__']} has cls {sample['cls']!r}, not one class id: a multi-label "
                           "(AVA) dataset trains and evaluates as detection, which its manifest must name "
                           "(source_format ava, written by `mvit preprocess`)") from None


def _decoded(clip: ClipConfig, seed: int):
    def stage(samples):
        rng = _worker_rng(seed, "clip")
        # torchvision's random crops draw from torch's global generator, which the training loop seeds
        # alike on every rank (identical initial weights): the crops get a state per (seed, worker) instead.
        crop_state = torch.Generator().manual_seed(rng.getrandbits(63)).get_state()
        transform = train_transform(clip)
        for sample in samples:
            frames = int(sample_metadata(sample)["frames"])
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(crop_state)
                video = train_clip(sample[MEDIA_KEY], frames, clip, transform, rng)
                crop_state = torch.get_rng_state()
            yield video, class_id(sample), sample["__key__"]
    return stage


def _epoch_share(steps_per_epoch: int):
    # `with_epoch` would cut each DataLoader worker's stream at the full count, so an epoch would run
    # loader_workers times the steps its LR schedule was built for; each worker takes its share instead.
    def stage(batches):
        worker, workers = _loader_worker()
        yield from itertools.islice(batches, steps_per_epoch // workers + (worker < steps_per_epoch % workers))
    return stage


def _collate(batch):
    clips, labels, keys = zip(*batch)
    return torch.stack(clips), torch.tensor(labels), list(keys)


def train_loader(urls: list[str], clip: ClipConfig, batch_size: int, steps_per_epoch: int, *,
                 shuffle_buffer: int, seed: int, loader_workers: int = 0):
    if not urls:
        raise ValueError("this rank has no training shards; use fewer workers or more shards")
    dataset = wds.DataPipeline(
        # worker_seed: the rank is already part of `seed`; only the DataLoader worker is added
        wds.ResampledShards(urls, seed=seed, worker_seed=lambda: _loader_worker()[0], deterministic=True),
        tar_samples,
        _shuffled(shuffle_buffer, seed),
        _decoded(clip, seed),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
        _epoch_share(steps_per_epoch),
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=loader_workers)


def eval_samples(urls: list[str], clip: ClipConfig, views: int) -> Iterator[tuple[torch.Tensor, int, str]]:
    """Every sample of `urls` once, in order (no resampling)."""
    if not urls:
        return iter(())
    return (
        (eval_views(s[MEDIA_KEY], clip, views, int(sample_metadata(s)["frames"])), class_id(s), s["__key__"])
        for s in read_samples(urls)
    )
