"""The part worker, run in a Ray task: one part's inputs -> finished shards, quarantine entries and index
lines, committed by a small `_parts/<part>.json` record once every tar of the part is in place."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pipelines.data import storage
from pipelines.data.shards import IMAGE_KEY, INDEX_FIELDS, MEDIA_KEY, SHARD_DIR, QuarantineEntry, ShardInfo
from pipelines.data.sources import VideoRecord, dataset_path
from pipelines.detection.keyframes import COUNTS_FIELD as KEYFRAME_COUNTS
from pipelines.detection.keyframes import labelled_keyframes, place_keyframes
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.plan import Part

PARTS_DIR = "_parts"
UNEXPECTED = "error"  # quarantine reason of an exception that is not a VideoError (a bug, not a bad video)


@dataclass
class PartResult:
    """What one part produced; also its commit record (`_parts/<part_id>.json`), which resume reads."""

    part_id: str
    fingerprint: str  # of the job's inputs and config: a record of another job is not reused
    inputs: int
    shards: list[ShardInfo]
    quarantine: list[QuarantineEntry]
    index: list[dict]  # one line of index.jsonl per written sample
    bytes_in: int  # source bytes read (whole files, or the ranges of seekable reads)

    def to_json(self) -> str:
        data = asdict(self)
        data["quarantine"] = [q.to_dict() for q in self.quarantine]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "PartResult":
        data = json.loads(text)
        return cls(data["part_id"], data["fingerprint"], int(data["inputs"]),
                   [ShardInfo(**s) for s in data["shards"]],
                   [QuarantineEntry.from_dict(q) for q in data["quarantine"]], data["index"], int(data["bytes_in"]))


def part_record_uri(output: str, part_id: str) -> str:
    return storage.join(output, PARTS_DIR, f"{part_id}.json")


def _encode_video(record: VideoRecord, data: bytes | io.BufferedReader, cfg: PreprocessConfig) -> tuple[bytes, dict]:
    """Streamed decode -> trim -> upright -> resize -> constant fps -> re-encode; VideoError if unusable."""
    from pipelines.data.video import VideoError, transcode

    media, meta = transcode(
        data, short_side=cfg.short_side, min_short_side=cfg.min_short_side, start_s=record.start_s,
        end_s=record.end_s, fps=cfg.fps, max_frames=cfg.max_frames, threads=cfg.cpus_per_task,
        codec=cfg.codec, crf=cfg.crf, gop=cfg.gop, qscale=cfg.qscale,
    )
    if meta["frames"] < cfg.min_frames:
        raise VideoError("too few frames", f"{meta['frames']} < min_frames={cfg.min_frames}")
    return media, {**meta, "codec": cfg.codec}


def _encode_image(data: bytes, cfg: PreprocessConfig) -> tuple[bytes, dict]:
    from pipelines.data.images import encode_image

    return encode_image(data, short_side=cfg.short_side, min_short_side=cfg.min_short_side, quality=cfg.image_quality)


def _class_field(record: VideoRecord, label_map: dict[str, int]) -> bytes:
    """`cls`: the class id; for a multi-label record (AVA) the sorted ids joined by commas."""
    return ",".join(str(i) for i in sorted(label_map[n] for n in record.labels)).encode()


def process_part(
    part: Part, label_map: dict[str, int], cfg: PreprocessConfig, fingerprint: str,
    on_video: Callable[[int], None] | None = None,
) -> PartResult:
    """Runs in a Ray task: turn one part into finished shards (idempotent: same part -> same bytes).

    A video that cannot be used is quarantined with its reason; a storage failure (after botocore's
    retries) is not the video's fault, so it fails the task instead and a rerun resumes from here.
    `on_video(i)` is called after the i-th input (the memory benchmark samples RSS there).
    """
    import webdataset as wds

    from pipelines.data.video import VideoError

    quarantine: list[QuarantineEntry] = []
    index: list[dict] = []  # one line per written sample, for `mvit shards stats|verify`
    shards: list[ShardInfo] = []
    bytes_in = 0
    # A scratch folder of its own per attempt: a task of a killed driver may still be running this part
    # when the rerun starts it again, and the two must not write into (or delete) one folder. Folders
    # that earlier attempts of this (output, part) left behind are cleared (an orphan whose folder goes
    # fails, which costs nothing: no driver waits for its result). Shard names and bytes do not depend on it.
    output_id = hashlib.sha1(f"{cfg.output}|{fingerprint}".encode()).hexdigest()[:12]
    prefix = f"mvit-part-{output_id}-{part.part_id}-"
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    reader: io.BufferedReader | None = None  # the current source, when it is read by ranges
    try:
        closed: list[tuple[str, int]] = []
        counts: dict[str, int] = {}

        def on_close(path: str) -> None:
            closed.append((path, counts.pop(path, 0)))

        # mtime=0 and fixed owner make the tar bytes (and sha256) a function of the samples alone.
        writer = wds.ShardWriter(
            str(scratch / f"{part.part_id}-%02d.tar"),
            maxcount=cfg.max_samples_per_shard or 10**9,
            maxsize=cfg.target_shard_bytes,
            post=on_close,
            verbose=0,
            mtime=0,
        )
        source, data = None, b""
        for position, record in enumerate(part.records):
            if on_video is not None and position:
                on_video(position)
            if record.source != source:  # consecutive records of one file (AVA chunks) read it once
                bytes_in += _close_reader(reader)
                reader = None
                try:
                    source, data = record.source, _read_source(record, cfg)
                except FileNotFoundError:
                    quarantine.append(QuarantineEntry(record.source, "missing file", key=record.key,
                                                      keyframes=labelled_keyframes(record.extra)))
                    source, data = None, b""
                    continue
                if isinstance(data, bytes):
                    bytes_in += len(data)
                else:
                    reader = data
            image = record.media == "image"
            try:
                media, video_meta = _encode_image(data, cfg) if image else _encode_video(record, data, cfg)
            except VideoError as exc:
                quarantine.append(QuarantineEntry(record.source, exc.reason, key=record.key, detail=exc.detail,
                                                  keyframes=labelled_keyframes(record.extra)))
                continue
            except storage.READ_ERRORS:
                raise  # a ranged read failed after its retries: storage's fault, not the video's (a rerun resumes)
            except Exception as exc:  # noqa: BLE001 - one bad video must never end the job
                quarantine.append(QuarantineEntry(record.source, UNEXPECTED, key=record.key,
                                                  detail=f"{type(exc).__name__}: {exc}",
                                                  keyframes=labelled_keyframes(record.extra)))
                continue
            meta = {"source": dataset_path(record), "label": record.label, "labels": list(record.labels),
                    "split": record.split, "media": record.media, "start_s": record.start_s,
                    "end_s": record.end_s, **video_meta}
            if record.extra:
                meta["extra"] = record.extra
            if "keyframes" in record.extra and not image:  # AVA: each keyframe's stored frame (see detection/keyframes.py)
                meta["extra"], meta[KEYFRAME_COUNTS] = place_keyframes(
                    record.extra, first_frame_s=video_meta["first_frame_s"], fps=video_meta["fps"],
                    frames=video_meta["frames"])
            writer.write({
                "__key__": record.key,
                IMAGE_KEY if image else MEDIA_KEY: media,
                "json": json.dumps(meta, sort_keys=True).encode(),
                "cls": _class_field(record, label_map),
            })
            counts[writer.fname] = counts.get(writer.fname, 0) + 1
            index.append({"key": record.key, "shard": Path(writer.fname).name, "bytes": len(media),
                          **{k: meta[k] for k in INDEX_FIELDS},
                          **{k: meta[k] for k in (KEYFRAME_COUNTS,) if k in meta}})
        writer.close()
        bytes_in += _close_reader(reader)
        reader = None
        if on_video is not None:
            on_video(len(part.records))
        for path, count in closed:
            if count == 0:
                continue
            url = f"{SHARD_DIR}/{Path(path).name}"
            with open(path, "rb") as handle:
                sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
            storage.upload_file(path, storage.join(cfg.output, url))
            shards.append(ShardInfo(url=url, split=part.split, num_samples=count, bytes=os.path.getsize(path),
                                    sha256=sha256))
    finally:
        _close_reader(reader)
        shutil.rmtree(scratch, ignore_errors=True)
    for entry in index:
        entry["shard"] = f"{SHARD_DIR}/{entry['shard']}"
    result = PartResult(part.part_id, fingerprint, len(part.records), shards, quarantine, index, bytes_in)
    # The record is the commit point of a part: written after every one of its tars is in place.
    storage.write_bytes(part_record_uri(cfg.output, part.part_id), result.to_json().encode())
    return result


def _read_source(record: VideoRecord, cfg: PreprocessConfig) -> bytes | io.BufferedReader:
    """The source's bytes, or for a time range of a big file a seekable reader (the caller closes it)."""
    if record.start_s is not None and record.media != "image" and storage.size(record.source) >= cfg.stream_min_bytes:
        return storage.open_seekable(record.source)
    return storage.read_bytes(record.source)


def _close_reader(reader: io.BufferedReader | None) -> int:
    """Close a seekable source reader (None: nothing to do); returns the bytes it fetched."""
    if reader is None:
        return 0
    reader.close()
    return reader.raw.bytes_read


def process_part_row(row: dict, *, label_map: dict[str, int], cfg: PreprocessConfig, fingerprint: str) -> dict:
    """The Ray Data map function (named, so workers show up as `ray::Map(process_part_row)`); parts and
    results travel as JSON (Arrow string columns) rather than pickled dataclasses."""
    return {"result": process_part(Part.from_json(row["part"]), label_map, cfg, fingerprint).to_json()}
