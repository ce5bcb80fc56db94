"""Streaming clips out of WebDataset shards for training and evaluation.

Each rank reads a disjoint subset of the shards (shard i goes to rank i mod world), so no two ranks
ever see the same sample. Training resamples shards of its own subset (`resampled=True`) and cuts
the endless stream at a fixed number of batches, so every rank runs the same number of steps per epoch: DDP
needs equal step counts, and shards of unequal size would otherwise leave one rank waiting.

The training stream is a function of its seed: shard draws, the shuffle buffer, the temporal offsets
and every augmentation draw (crops, flips, RandAugment, erasing) come from generators seeded by (seed,
DataLoader worker), so a run can be repeated and a bad one investigated. With repeated augmentation
(`clip.repeated_augment` = k) each decoded sample gives k clips: a batch of `batch_size` samples holds
batch_size x k clips, copy-major (all first copies, then all second copies), so that MixUp/CutMix, which
pairs clip i with clip i-1, mixes clips of different videos. (`wds.WebDataset(resampled=True)` does not pass its seed on: its shard draws mix
in the time and os.urandom, so two runs of the same recipe saw different data.)
"""

from __future__ import annotations

import hashlib
import itertools
import random
from typing import Iterator

import torch
import webdataset as wds

from pipelines.data.clips import ClipConfig, eval_views, train_augment, train_clips
from pipelines.data.shards import IMAGE_KEY, MEDIA_KEY, read_samples, sample_metadata, tar_samples


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


def _worker_generator(seed: int, purpose: str) -> torch.Generator:
    """A torch generator per (seed, purpose, DataLoader worker), made in the worker that uses it."""
    digest = hashlib.sha256(f"{seed}/{purpose}/{_loader_worker()[0]}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def sample_media(sample: dict) -> tuple[bytes, bool]:
    """(the sample's media bytes, whether it is an image): `mp4` video or `jpg` image samples."""
    if MEDIA_KEY in sample:
        return sample[MEDIA_KEY], False
    if IMAGE_KEY in sample:
        return sample[IMAGE_KEY], True
    raise KeyError(f"sample {sample.get('__key__')} has neither {MEDIA_KEY!r} nor {IMAGE_KEY!r} (fields: {sorted(sample)})")


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


def _decoded(clip: ClipConfig, seed: int):
    def stage(samples):
        # One generator per (seed, DataLoader worker) drives the temporal sampling and every augmentation
        # draw; the global one (which the training loop seeds alike on every rank) is left alone.
        generator = _worker_generator(seed, "clip")
        transforms = {}
        for sample in samples:
            media, image = sample_media(sample)
            if image not in transforms:
                transforms[image] = train_augment(clip, image=image)
            frames = 1 if image else int(sample_metadata(sample)["frames"])
            clips = train_clips(media, frames, clip, transforms[image], generator, image=image)
            yield clips, int(sample["cls"]), sample["__key__"]
    return stage


def _epoch_share(steps_per_epoch: int):
    # `with_epoch` would cut each DataLoader worker's stream at the full count, so an epoch would run
    # loader_workers times the steps its LR schedule was built for; each worker takes its share instead.
    def stage(batches):
        worker, workers = _loader_worker()
        yield from itertools.islice(batches, steps_per_epoch // workers + (worker < steps_per_epoch % workers))
    return stage


def _collate(batch):
    """(k, ...) clips of B samples -> (k * B, ...) copy-major, with labels and keys repeated alike."""
    clips, labels, keys = zip(*batch)
    stacked = torch.stack(clips)  # (B, k, ...)
    copies = stacked.shape[1]
    return (stacked.transpose(0, 1).flatten(0, 1), torch.tensor(labels).repeat(copies), list(keys) * copies)


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


def sample_views(sample: dict, clip: ClipConfig, temporal: int | None = None, spatial: int | None = None) -> torch.Tensor:
    """The test views of one stored sample (see clips.eval_views; None: the recipe's views)."""
    media, image = sample_media(sample)
    frames = None if image else int(sample_metadata(sample)["frames"])
    return eval_views(media, clip, temporal, frames, spatial=spatial, image=image)


def eval_samples(urls: list[str], clip: ClipConfig, temporal: int | None = None, spatial: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, int, str]]:
    """(views, label, key) of every sample of `urls` once, in order (no resampling)."""
    if not urls:
        return iter(())
    return ((sample_views(s, clip, temporal, spatial), int(s["cls"]), s["__key__"]) for s in read_samples(urls))
