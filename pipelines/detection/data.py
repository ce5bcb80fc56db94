"""AVA keyframe examples out of chunk samples: the training stream and the test batches.

A sample is a chunk of a movie holding many keyframes (why: pipelines/detection/keyframes.py). The
training stream reads each chunk once and yields every keyframe with groundtruth as its own example;
the shuffle buffer then mixes examples of several chunks (it holds references to the chunks' bytes, not
decoded frames), and each example decodes only its clip's frames.

A clip is `num_frames` frames every `sampling_rate` *stored* frames centred on the keyframe's stored frame
(SlowFast's `get_sequence`: start at frame - num_frames * sampling_rate // 2), clamped to the sample's
frames. Stored frames are at the dataset's `fps` (preprocess `fps`: the AVA recipe stores 30 fps, so
16 x 4 spans 2.1 s as in the paper; the synthetic set is stored at its own 10 fps, so its 8 x 2 spans
1.5 s). Training checks that the chunks' context (`preprocess.ava.context_s`) covers half a span.

Labels: a box's actions as a multi-hot row over the head's outputs, index = official action id - 1 (the
dataset's label map). Training boxes are the groundtruth boxes plus the proposals with IoU >
`train_proposal_iou` to one of them (taking its actions); test boxes are the proposals scoring >=
`test_score`, or the groundtruth boxes.

Batches hold a variable number of boxes per clip, padded: `boxes (B, N, 4)` in the view's pixels,
`box_mask (B, N)`, `labels (B, N, C)`; padded slots are zeros and masked out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from torchvision.ops import box_iou

from pipelines.data.clips import LOADER_DECODE_THREADS, ClipConfig
from pipelines.data.loader import _batches_of_stream, _epoch_share, _sample_generator, _shuffled, _stream_worker
from pipelines.data.shards import MEDIA_KEY, DatasetError, read_samples, tar_samples
from pipelines.data.video import decode_frames
from pipelines.detection.boxes import eval_view, normalise, train_view
from pipelines.detection.config import DetectionConfig


@dataclass
class Keyframe:
    """One annotated (or proposal-only) keyframe of a stored chunk."""

    key: str  # <sample key>@<t>
    video_id: str
    t: int  # movie second (the official timestamp)
    frame: int  # stored frame index of the keyframe
    frames: int  # stored frames of the chunk
    boxes: np.ndarray  # (N, 4) groundtruth, normalised x1, y1, x2, y2
    actions: list[list[int]]  # official action ids of each groundtruth box
    person_ids: list[int]
    proposals: np.ndarray  # (M, 5) x1, y1, x2, y2, score
    media: bytes  # the chunk's video (shared by its keyframes)


def keyframes_of(sample: dict, *, labelled_only: bool) -> Iterator[Keyframe]:
    """The keyframes a stored chunk holds (only those with groundtruth boxes when `labelled_only`)."""
    meta = json.loads(sample["json"])
    extra = meta.get("extra", {})
    for keyframe in extra.get("keyframes", ()):
        if labelled_only and not keyframe["boxes"]:
            continue
        if "frame" not in keyframe:
            raise DatasetError(f"sample {sample['__key__']}: keyframe {keyframe['t']} has no stored frame index; "
                               "the dataset predates it: preprocess the AVA source again")
        yield Keyframe(
            key=f"{sample['__key__']}@{keyframe['t']}", video_id=extra["video_id"], t=int(keyframe["t"]),
            frame=int(keyframe["frame"]), frames=int(meta["frames"]),
            boxes=np.asarray(keyframe["boxes"], dtype=np.float32).reshape(-1, 4),
            actions=[list(a) for a in keyframe["actions"]], person_ids=list(keyframe.get("person_ids", [])),
            proposals=np.asarray(keyframe.get("proposals", []), dtype=np.float32).reshape(-1, 5),
            media=sample[MEDIA_KEY],
        )


def clip_frames(frame: int, frames: int, num_frames: int, sampling_rate: int) -> np.ndarray:
    """Stored frame indices of the clip centred on `frame`, clamped to the video (the official sequence)."""
    start = frame - (num_frames * sampling_rate) // 2
    return np.clip(start + np.arange(num_frames) * sampling_rate, 0, frames - 1)


def multi_hot(actions: list[list[int]], num_classes: int) -> torch.Tensor:
    """(N, num_classes) float targets: 1 at action id - 1 for each box's actions."""
    targets = torch.zeros(len(actions), num_classes)
    for row, ids in enumerate(actions):
        for action_id in ids:
            if not 1 <= action_id <= num_classes:
                raise DatasetError(f"action id {action_id} is outside the label map's 1..{num_classes}")
            targets[row, action_id - 1] = 1.0
    return targets


def training_targets(keyframe: Keyframe, num_classes: int, proposal_iou: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes (K, 4) normalised, targets (K, C)): the groundtruth boxes, then each proposal whose best IoU
    with a groundtruth box exceeds `proposal_iou`, with that box's actions."""
    boxes = torch.from_numpy(keyframe.boxes)
    targets = multi_hot(keyframe.actions, num_classes)
    if len(keyframe.proposals) and len(boxes):
        proposals = torch.from_numpy(keyframe.proposals[:, :4])
        best, match = box_iou(proposals, boxes).max(dim=1)
        extra = best > proposal_iou
        boxes = torch.cat([boxes, proposals[extra]])
        targets = torch.cat([targets, targets[match[extra]]])
    return boxes, targets


def eval_boxes(keyframe: Keyframe, det: DetectionConfig) -> np.ndarray:
    """(K, 4) normalised boxes to score on a keyframe: proposals >= test_score, or the groundtruth boxes."""
    if det.test_boxes == "groundtruth":
        return keyframe.boxes
    return keyframe.proposals[keyframe.proposals[:, 4] >= det.test_score, :4]


class DetectionBatch(NamedTuple):
    clips: torch.Tensor  # (B, 3, T, H, W)
    boxes: torch.Tensor  # (B, N, 4) in the clips' pixels, padded with zeros
    box_mask: torch.Tensor  # (B, N) bool
    labels: torch.Tensor  # (B, N, C) multi-hot (test batches: zeros)
    keys: list[str]


def pad_boxes(per_clip: list[torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip (K_i, width) rows -> (B, max K_i, width) zero-padded and the (B, max K_i) mask of real rows."""
    slots = max([len(rows) for rows in per_clip] + [1])
    padded = torch.zeros(len(per_clip), slots, width)
    mask = torch.zeros(len(per_clip), slots, dtype=torch.bool)
    for i, rows in enumerate(per_clip):
        padded[i, :len(rows)] = rows
        mask[i, :len(rows)] = True
    return padded, mask


def _collate(examples) -> DetectionBatch:
    clips, boxes, labels, keys = zip(*examples)
    padded_boxes, mask = pad_boxes(list(boxes), 4)
    padded_labels, _ = pad_boxes(list(labels), labels[0].shape[1])
    return DetectionBatch(torch.stack(clips), padded_boxes, mask, padded_labels, list(keys))


def _training_keyframes(samples):
    for sample in samples:
        yield from keyframes_of(sample, labelled_only=True)


def _training_views(clip: ClipConfig, det: DetectionConfig, num_classes: int, seed: int, start_batch: int = 0,
                    batch_size: int = 1):
    """Each keyframe example's view. As the classification loader (`pipelines.data.loader._decoded`), the
    n-th example of a stream draws from a generator of (seed, stream, n), so a stream resumed at batch
    `start_batch` skips the examples already trained on before decoding them and gives the ones after
    exactly the views of an uninterrupted epoch."""
    def stage(keyframes):
        stream, workers = _stream_worker(start_batch)
        skip = _batches_of_stream(stream, workers, start_batch) * batch_size
        for index, keyframe in enumerate(keyframes):
            if index < skip:
                continue
            generator = _sample_generator(seed, stream, index)
            boxes, targets = training_targets(keyframe, num_classes, det.train_proposal_iou)
            index_frames = clip_frames(keyframe.frame, keyframe.frames, clip.num_frames, clip.sampling_rate)
            frames = decode_frames(keyframe.media, index_frames, threads=LOADER_DECODE_THREADS)
            video, pixel_boxes, kept = train_view(frames, boxes, crop=clip.crop_size,
                                                  jitter_scales=tuple(det.jitter_scales), flip=clip.horizontal_flip,
                                                  generator=generator, box_jitter=det.box_jitter)
            yield normalise(video, clip.mean, clip.std, clip.channel_order), pixel_boxes, targets[kept], keyframe.key
    return stage


def train_loader(urls: list[str], clip: ClipConfig, det: DetectionConfig, *, num_classes: int, batch_size: int,
                 steps_per_epoch: int, shuffle_buffer: int, seed: int, loader_workers: int = 0, start_batch: int = 0):
    """Endless resampled stream of this rank's shards -> keyframe examples -> shuffled -> views -> batches,
    cut at `steps_per_epoch` batches (shared among DataLoader workers), as the classification loader; from
    batch `start_batch` on (a mid-epoch resume: the batches after it are those of the whole epoch)."""
    if not urls:
        raise ValueError("this rank has no training shards; use fewer workers or more shards")
    if not 0 <= start_batch <= steps_per_epoch:
        raise ValueError(f"start_batch {start_batch} is outside the epoch's {steps_per_epoch} batches")

    def shard_seed() -> int:
        return _stream_worker(start_batch)[0]

    dataset = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=shard_seed, deterministic=True),
        tar_samples,
        _training_keyframes,
        _shuffled(shuffle_buffer, seed, start_batch=start_batch),
        _training_views(clip, det, num_classes, seed, start_batch, batch_size),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
        _epoch_share(steps_per_epoch, start_batch),
    )
    # A generator of its own, as the classification loader: iter() must not advance torch's global one.
    return wds.WebLoader(dataset, batch_size=None, num_workers=loader_workers,
                         generator=torch.Generator().manual_seed(seed))


@dataclass
class EvalBatch:
    """Clips of one view size with the boxes to score; `frames[i]` is (video_id, t) of clip i, `normalised`
    its boxes as the prediction file writes them, `groundtruth` its annotated rows (for validation)."""

    batch: DetectionBatch
    frames: list[tuple[str, int]]
    normalised: list[np.ndarray]
    groundtruth: list[Keyframe]


def eval_batches(urls: list[str], clip: ClipConfig, det: DetectionConfig, *, stride: int,
                 batch_size: int) -> Iterator[EvalBatch]:
    """Every keyframe of `urls` once, in order, as the whole frame at test scale with its test boxes;
    clips of one batch share a view size (a batch ends where the size changes)."""
    pending: list[tuple[torch.Tensor, torch.Tensor, np.ndarray, Keyframe]] = []
    if not urls:  # a rank without val shards (more ranks than shards) still takes part in the gather
        return

    def flush() -> EvalBatch:
        clips, boxes, normalised, keyframes = zip(*pending)
        padded, mask = pad_boxes(list(boxes), 4)
        batch = DetectionBatch(torch.stack(clips), padded, mask, torch.zeros(*mask.shape, 0), [k.key for k in keyframes])
        pending.clear()
        return EvalBatch(batch, [(k.video_id, k.t) for k in keyframes], list(normalised), list(keyframes))

    for sample in read_samples(urls):
        for keyframe in keyframes_of(sample, labelled_only=False):
            boxes = eval_boxes(keyframe, det)
            index = clip_frames(keyframe.frame, keyframe.frames, clip.num_frames, clip.sampling_rate)
            frames = decode_frames(keyframe.media, index, threads=LOADER_DECODE_THREADS)
            video, pixel_boxes = eval_view(frames, torch.from_numpy(boxes), short_side=clip.test_short_side,
                                           stride=stride)
            example = (normalise(video, clip.mean, clip.std, clip.channel_order), pixel_boxes, boxes, keyframe)
            if pending and (len(pending) >= batch_size or pending[0][0].shape != example[0].shape):
                yield flush()
            pending.append(example)
    if pending:
        yield flush()
