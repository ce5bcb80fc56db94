"""Typed config of `mvit preprocess` (annotations or a folder -> shards + manifest)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import MISSING

from pipelines.data.identity import LOCATION_FIELDS
from pipelines.data.video import CODECS
from pipelines.raycluster import RayConfig


@dataclass
class AvaOptions:
    """AVA only: how the annotated 900..1800 s of each movie is cut into samples (see pipelines/data/sources/ava.py)."""

    chunk_s: float = 60.0  # seconds of movie per sample (900: one sample per movie)
    # extra seconds on both sides, so that clips centred on edge keyframes fit: at least half a clip's span
    # (16x4 at 30 fps: 1.07 s; 32x3: 1.6 s; 64x3: 3.2 s); training checks it against its clip
    context_s: float = 1.5
    action_list: str = "ava_action_list_v2.2.pbtxt"  # in the annotations folder
    window_s: list[int] = field(default_factory=lambda: [900, 1800])  # annotated movie seconds [start, end]
    # person proposals per split, "{split}" replaced (e.g. SlowFast's "ava_{split}_predicted_boxes.csv");
    # "" = none (training then uses groundtruth boxes only, and evaluation needs test_boxes=groundtruth)
    proposals: str = ""


@dataclass
class PreprocessConfig:
    source: str = MISSING  # annotations or a folder, local or s3:// (see pipelines/data/sources)
    output: str = MISSING  # dataset prefix, local or s3://bucket/prefix
    source_format: str = "auto"  # auto | folder | imagefolder | csv | kinetics | ssv2 | ava
    source_root: str = ""  # where the videos are for annotation files (default: the annotations' folder)
    short_side: int = 320  # resize so the short side is this (never upscaled, see min_short_side)
    min_short_side: int = 0  # videos smaller than this are upscaled to it (0: never upscale)
    fps: float = 30.0  # re-encode at this constant frame rate (0: keep the source's frames as they are)
    codec: str = "h264"  # h264 | mjpeg: stored format, chosen by `make bench BENCH=preprocess` (README)
    crf: int = 23  # h264 quality
    gop: int = 16  # h264: short GOP, so a clip needs little decoding before its first frame
    qscale: int = 5  # mjpeg quality (2 best .. 31 worst)
    max_error_fraction: float = 0.05  # more inputs than this failing with an unexpected error fails the job
    max_task_retries: int = 3  # a part whose worker keeps dying (e.g. out of memory) ends the job after this
    labels_file: str = ""  # fixed label set: one name per line (id = line number) or a JSON {name: id};
    # rows with other labels are quarantined. "" = every label found, ids in sorted order.
    min_frames: int = 1  # fewer decoded frames than this -> quarantined
    max_frames: int = 0  # keep at most this many frames per video (0: all)
    val_fraction: float = 0.0  # for sources without a split column: share of val, per class (pipelines/data/splits.py)
    target_shard_bytes: int = 1_000_000_000
    # Inputs with a time range (AVA chunks, trimmed clips) in files at least this big are read by seeking
    # (ranged reads of the index and the range) instead of downloaded whole: a 2 GB movie cut into
    # chunks then costs its chunks' bytes, not 2 GB of worker memory per part.
    stream_min_bytes: int = 256_000_000
    max_samples_per_shard: int = 0  # 0: limited by target_shard_bytes only
    image_quality: int = 90  # JPEG quality of image samples (imagefolder)
    ava: AvaOptions = field(default_factory=AvaOptions)
    num_workers: int = 0  # concurrent Ray tasks (0: as many as Ray's CPUs allow)
    cpus_per_task: int = 1  # CPUs Ray reserves per task; the decoder uses as many threads
    ray: RayConfig = field(default_factory=RayConfig)

    # How the work is run, not what it writes: the input fingerprint and the workflow's config hash leave
    # these out, so changing them neither invalidates a finished dataset nor restarts a resumed one.
    NOT_AFFECTING_OUTPUT: ClassVar[tuple[str, ...]] = ("num_workers", "cpus_per_task", "ray", "stream_min_bytes")

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"config key 'val_fraction' must be in [0, 1), got {self.val_fraction}")
        if self.short_side < 2:
            raise ValueError(f"config key 'short_side' must be >= 2, got {self.short_side}")
        if self.cpus_per_task < 1:
            raise ValueError(f"config key 'cpus_per_task' must be >= 1, got {self.cpus_per_task}")
        if self.codec not in CODECS:
            raise ValueError(f"config key 'codec' must be one of {CODECS}, got {self.codec!r}")

    def output_affecting(self) -> dict[str, Any]:
        """The fields that change what gets written (not where it goes, where the inputs lie, nor how the
        work is run); the records and label ids cover what is read."""
        data = dataclasses.asdict(self)
        for name in (*self.NOT_AFFECTING_OUTPUT, "output", *LOCATION_FIELDS):
            data.pop(name)
        return data
