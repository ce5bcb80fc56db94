"""Streaming clips out of WebDataset shards for training and evaluation.

Each rank reads a disjoint subset of the shards (shard i goes to rank i mod world), so no two ranks
ever see the same sample. Training resamples shards of its own subset (`resampled=True`) and cuts
the endless stream at a fixed number of batches, so every rank runs the same number of steps per epoch: DDP
needs equal step counts, and shards of unequal size would otherwise leave one rank waiting.

The training stream is a function of its seed: shard draws, the shuffle buffer, the temporal offsets
and every augmentation draw (crops, flips, RandAugment, erasing) come from generators seeded by (seed,
DataLoader worker, position in its stream), so a run can be repeated and a bad one investigated. With repeated augmentation
(`clip.repeated_augment` = k) each decoded sample gives k clips: a batch of `batch_size` samples holds
batch_size x k clips, copy-major (all first copies, then all second copies), so that MixUp/CutMix, which
pairs clip i with clip i-1, mixes clips of different videos. (`wds.WebDataset(resampled=True)` does not pass its seed on: its shard draws mix
in the time and os.urandom, so two runs of the same recipe saw different data.)

A stream can be resumed mid-epoch (`start_batch`): the samples already trained on are read but not
decoded, and each sample's clip is drawn from a generator of its own position in the stream, so the
batches after the resume point are exactly those of an uninterrupted epoch (see `train_loader`).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from typing import Iterator

import torch
import webdataset as wds

from pipelines.data.clips import ClipConfig, eval_views, train_augment, train_clips
from pipelines.data.shards import IMAGE_KEY, MEDIA_KEY, DatasetError, read_samples, sample_metadata, tar_samples


def rank_shards(urls: list[str], rank: int, world: int) -> list[str]:
    return urls[rank::world]


def _loader_worker() -> tuple[int, int]:
    """(this DataLoader worker's id, the number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _stream_worker(start_batch: int = 0) -> tuple[int, int]:
    """(the stream this DataLoader worker plays, the number of workers).

    The DataLoader asks its workers for batches in turn, starting with worker 0, so batch j of an epoch
    comes from stream j mod W. A loader resumed at batch `start_batch` again starts with worker 0, which
    therefore plays stream start_batch mod W: the streams keep their seeds and the batches their order."""
    worker, workers = _loader_worker()
    return (worker + start_batch) % workers, workers


def _sample_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """The generator of the `index`-th sample of a stream: its temporal offset and every augmentation draw
    (crops, flips, RandAugment, erasing) come from it, so a stream resumed mid-epoch gives the samples after
    the resume point exactly the clips they would have had."""
    digest = hashlib.sha256(f"{seed}/clip/{stream}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def sample_media(sample: dict) -> tuple[bytes, bool]:
    """(the sample's media bytes, whether it is an image): `mp4` video or `jpg` image samples."""
    if MEDIA_KEY in sample:
        return sample[MEDIA_KEY], False
    if IMAGE_KEY in sample:
        return sample[IMAGE_KEY], True
    raise KeyError(f"sample {sample.get('__key__')} has neither {MEDIA_KEY!r} nor {IMAGE_KEY!r} (fields: {sorted(sample)})")


def _batches_of_stream(stream: int, workers: int, batches: int) -> int:
    """How many of an epoch's first `batches` batches come from `stream` (batch j from stream j mod W)."""
    return max(0, batches - stream + workers - 1) // workers


def _stream_rng(seed: int, purpose: str, stream: int) -> random.Random:
    # Made in the worker that iterates: each DataLoader worker copies the dataset, and a generator built at
    # construction would hand every worker the same picks.
    return random.Random(f"{seed}/{purpose}/{stream}")


def _shuffled(bufsize: int, seed: int, initial: int = 64, start_batch: int = 0):
    """A shuffle buffer (as wds.shuffle) whose generator is made in the worker that iterates it. It starts
    yielding at `initial` samples and grows by one sample per yield up to `bufsize`, so the first batch
    does not wait for a full buffer."""
    def stage(samples):
        rng = _stream_rng(seed, "shuffle", _stream_worker(start_batch)[0])
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


def _decoded(clip: ClipConfig, seed: int, start_batch: int = 0, batch_size: int = 1):
    """Decode each sample into its training clip(s). The random draws of the n-th sample of a stream
    (temporal offset, every augmentation) come from a generator seeded by (seed, stream, n), so a stream resumed mid-epoch skips the
    samples already trained on *before* decoding them (their tar bytes are read, no frame is decoded) and
    the samples after them get exactly the clips they would have had."""
    def stage(samples):
        stream, workers = _stream_worker(start_batch)
        skip = _batches_of_stream(stream, workers, start_batch) * batch_size
        transforms = {}
        for index, sample in enumerate(samples):
            if index < skip:
                continue
            media, image = sample_media(sample)
            if image not in transforms:
                transforms[image] = train_augment(clip, image=image)
            frames = 1 if image else int(sample_metadata(sample)["frames"])
            # torchvision's random transforms draw from torch's global generator, which the training loop
            # seeds per rank for drop-path: the augmentations fork it (augment.py), so it is left alone.
            clips = train_clips(media, frames, clip, transforms[image], _sample_generator(seed, stream, index),
                                image=image)
            yield clips, class_id(sample), sample["__key__"]
    return stage


def _epoch_share(batches: int, start_batch: int = 0):
    # `with_epoch` would cut each DataLoader worker's stream at the full count, so an epoch would run
    # loader_workers times the batches it was planned for; each worker yields its stream's share instead,
    # less what that stream had already yielded before `start_batch`.
    def stage(stream_batches):
        stream, workers = _stream_worker(start_batch)
        done = _batches_of_stream(stream, workers, start_batch)
        yield from itertools.islice(stream_batches, _batches_of_stream(stream, workers, batches) - done)
    return stage


def _collate(batch):
    """(k, ...) clips of B samples -> (k * B, ...) copy-major, with labels and keys repeated alike."""
    clips, labels, keys = zip(*batch)
    stacked = torch.stack(clips)  # (B, k, ...)
    copies = stacked.shape[1]
    return (stacked.transpose(0, 1).flatten(0, 1), torch.tensor(labels).repeat(copies), list(keys) * copies)


def _batched(batch_size: int):
    """Full batches (copy-major, `_collate`), each yielded as soon as its last sample is decoded
    (wds.batched looks one sample ahead: a decode more per worker and epoch, and every batch one decode late)."""
    def stage(samples):
        batch = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == batch_size:
                yield _collate(batch)
                batch = []
    return stage


def train_loader(urls: list[str], clip: ClipConfig, batch_size: int, batches: int, *,
                 shuffle_buffer: int, seed: int, loader_workers: int = 0, start_batch: int = 0):
    """The `batches` batches of one epoch of one rank (the training stream of `seed`), from batch
    `start_batch` on: a loader resumed at batch k yields exactly the batches k.. of the whole epoch's
    loader, without decoding the samples of batches 0..k-1."""
    if not urls:
        raise ValueError("this rank has no training shards; use fewer workers or more shards")
    if not 0 <= start_batch <= batches:
        raise ValueError(f"start_batch {start_batch} is outside the epoch's {batches} batches")

    def shard_seed() -> int:
        return _stream_worker(start_batch)[0]

    dataset = wds.DataPipeline(
        # worker_seed: the rank is already part of `seed`; only the stream (DataLoader worker) is added
        wds.ResampledShards(urls, seed=seed, worker_seed=shard_seed, deterministic=True),
        tar_samples,
        _shuffled(shuffle_buffer, seed, start_batch=start_batch),
        _decoded(clip, seed, start_batch, batch_size),
        _batched(batch_size),
        _epoch_share(batches, start_batch),
    )
    # A generator of its own: the DataLoader draws its workers' base seed from it at every iter(), which
    # would otherwise advance torch's global generator (drop-path) once per epoch, and once more at a resume.
    return wds.WebLoader(dataset, batch_size=None, num_workers=loader_workers,
                         generator=torch.Generator().manual_seed(seed))


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
    return ((sample_views(s, clip, temporal, spatial), class_id(s), s["__key__"]) for s in read_samples(urls))
