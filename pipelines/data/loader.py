"""Streaming clips out of WebDataset shards for training and evaluation.

Each rank reads a disjoint subset of the shards (shard i goes to rank i mod world), so no two ranks
ever see the same sample. Training resamples shards of its own subset (`resampled=True`) and cuts
the endless stream at a fixed number of batches, so every rank runs the same number of steps per epoch: DDP
needs equal step counts, and shards of unequal size would otherwise leave one rank waiting.

The training stream is a function of its seed: shard draws, the shuffle buffer, the temporal offsets
and the random crops all come from generators seeded by (seed, DataLoader worker), so a run can be
repeated and a bad one investigated. (`wds.WebDataset(resampled=True)` does not pass its seed on: its shard draws mix
in the time and os.urandom, so two runs of the same recipe saw different data.)

A stream can be resumed mid-epoch (`start_batch`): the samples already trained on are read but not
decoded, and each sample's clip is drawn from a generator of its own position in the stream, so the
batches after the resume point are exactly those of an uninterrupted epoch (see `train_loader`).
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator

import torch
import webdataset as wds

from pipelines.data.clips import ClipConfig, eval_views, train_clip, train_transform
from pipelines.data.shards import MEDIA_KEY, read_samples, sample_metadata, tar_samples


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


def _decoded(clip: ClipConfig, seed: int, start_batch: int = 0, batch_size: int = 1):
    """Decode each sample into a training clip. The random draws of the n-th sample of a stream (temporal
    offset, crop) come from a generator seeded by (seed, stream, n), so a stream resumed mid-epoch skips the
    samples already trained on *before* decoding them (their tar bytes are read, no frame is decoded) and
    the samples after them get exactly the clips they would have had."""
    def stage(samples):
        stream, workers = _stream_worker(start_batch)
        skip = _batches_of_stream(stream, workers, start_batch) * batch_size
        transform = train_transform(clip)
        for index, sample in enumerate(samples):
            if index < skip:
                continue
            rng = random.Random(f"{seed}/clip/{stream}/{index}")
            frames = int(sample_metadata(sample)["frames"])
            # torchvision's random crops draw from torch's global generator, which the training loop seeds
            # per rank for drop-path: the crops run on a forked generator seeded from this sample's.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                video = train_clip(sample[MEDIA_KEY], frames, clip, transform, rng)
            yield video, int(sample["cls"]), sample["__key__"]
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


def _batched(batch_size: int):
    """Full batches, each yielded as soon as its last sample is decoded (wds.batched looks one sample
    ahead: a decode more per worker and epoch, and every batch one decode late)."""
    def stage(samples):
        batch = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == batch_size:
                clips, labels, keys = zip(*batch)
                yield torch.stack(clips), torch.tensor(labels), list(keys)
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


def eval_samples(urls: list[str], clip: ClipConfig, views: int) -> Iterator[tuple[torch.Tensor, int, str]]:
    """Every sample of `urls` once, in order (no resampling)."""
    if not urls:
        return iter(())
    return (
        (eval_views(s[MEDIA_KEY], clip, views, int(sample_metadata(s)["frames"])), int(s["cls"]), s["__key__"])
        for s in read_samples(urls)
    )
