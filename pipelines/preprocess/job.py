"""The preprocessing job: annotations -> WebDataset shards + manifest.json + quarantine.jsonl.

Plan on the driver, work in Ray Data tasks, commit on the driver:
  1. list inputs (adapters), reject what is already known bad, give labels stable ids;
  2. cut the sorted inputs of each split into *parts* (deterministic: same inputs -> same parts);
  3. Ray Data maps each part to its shards: read -> decode (PyAV) -> resize -> re-encode -> tar;
     a part's tars are uploaded under their final names only when complete, then a small
     `_parts/<part>.json` record marks the part done (resume skips parts with a record);
  4. quarantine.jsonl, then manifest.json last: a prefix without a manifest is incomplete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import MISSING

from pipelines.data import storage
from pipelines.data.shards import (
    INDEX,
    IMAGE_KEY,
    INDEX_FIELDS,
    MANIFEST,
    MEDIA_KEY,
    QUARANTINE,
    SHARD_DIR,
    DatasetError,
    Manifest,
    ShardInfo,
)
from pipelines.data.identity import LOCATION_FIELDS, record_identity, shard_order
from pipelines.data.sources import Rejected, VideoRecord, dataset_path, detect_format, load_records
from pipelines.data.splits import assign_splits
from pipelines.data.video import CODECS
from pipelines.raycluster import RayConfig, ensure_ray

PARTS_DIR = "_parts"
UNEXPECTED = "error"  # quarantine reason of an exception that is not a VideoError (a bug, not a bad video)


@dataclass
class AvaOptions:
    """AVA only: how the annotated 900..1800 s of each movie is cut into samples."""

    chunk_s: float = 60.0  # seconds of movie per sample (900: one sample per movie)
    context_s: float = 1.5  # extra seconds on both sides, so clips centred on edge keyframes fit
    action_list: str = "ava_action_list_v2.2.pbtxt"  # in the annotations folder


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
        """The fields that change what gets written (workers, Ray address and where inputs lie do not)."""
        data = dataclasses.asdict(self)
        for name in ("num_workers", "cpus_per_task", "ray", "output", "stream_min_bytes", *LOCATION_FIELDS):
            data.pop(name)
        return data


@dataclass
class Part:
    part_id: str
    split: str
    records: list[VideoRecord]

    @classmethod
    def from_json(cls, text: str) -> "Part":
        data = json.loads(text)
        return cls(data["part_id"], data["split"], [VideoRecord(**r) for r in data["records"]])


def _fingerprint(records: list[VideoRecord], label_map: dict[str, int], cfg: PreprocessConfig) -> str:
    """What the output is a function of: the records (in any order), the label ids, the config."""
    payload = json.dumps(
        {"records": [record_identity(r) for r in sorted(records, key=lambda r: r.key)],
         "label_map": label_map, "config": cfg.output_affecting()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def read_label_file(uri: str) -> dict[str, int]:
    """A fixed label set: a JSON object {name: id}, or text with one name per line (id = line index)."""
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"labels_file {uri} does not exist") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
            label_map = {str(k): int(v) for k, v in data.items()}
        except (ValueError, TypeError) as exc:
            raise DatasetError(f"labels_file {uri}: not a JSON object of name -> integer id ({exc})") from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
        label_map = {name: i for i, name in enumerate(names)}
        if len(label_map) != len(names):
            raise DatasetError(f"labels_file {uri} lists a label more than once")
    if not label_map:
        raise DatasetError(f"labels_file {uri} holds no labels")
    if sorted(label_map.values()) != list(range(len(label_map))):
        raise DatasetError(f"labels_file {uri}: ids must be 0..{len(label_map) - 1}, each once")
    return label_map


def plan_parts(records: list[VideoRecord], cfg: PreprocessConfig) -> list[Part]:
    """Cut each split's records (in `shard_order`) into parts of <= target_shard_bytes of source and
    <= max_samples_per_shard samples."""
    parts: list[Part] = []
    for split in sorted({r.split for r in records}):
        current: list[VideoRecord] = []
        used = 0
        for record in sorted((r for r in records if r.split == split), key=shard_order):
            full_by_count = cfg.max_samples_per_shard and len(current) >= cfg.max_samples_per_shard
            if current and (full_by_count or used + record.size > cfg.target_shard_bytes):
                parts.append(Part(f"{split}-{len(parts):05d}", split, current))
                current, used = [], 0
            current.append(record)
            used += record.size
        if current:
            parts.append(Part(f"{split}-{len(parts):05d}", split, current))
    return parts


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
) -> dict:
    """Runs in a Ray task: turn one part into finished shards (idempotent: same part -> same bytes).

    A video that cannot be used is quarantined with its reason; a storage failure (after botocore's
    retries) is not the video's fault, so it fails the task instead and a rerun resumes from here.
    `on_video(i)` is called after the i-th input (the memory benchmark samples RSS there).
    """
    import webdataset as wds

    from pipelines.data.video import VideoError

    quarantine: list[dict] = []
    index: list[dict] = []  # one line per written sample, for `mvit shards stats|verify`
    shards: list[dict] = []
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
                    quarantine.append({"source": record.source, "key": record.key, "reason": "missing file", "detail": ""})
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
                quarantine.append({"source": record.source, "key": record.key, "reason": exc.reason, "detail": exc.detail})
                continue
            except storage.READ_ERRORS:
                raise  # a ranged read failed after its retries: storage's fault, not the video's (a rerun resumes)
            except Exception as exc:  # noqa: BLE001 - one bad video must never end the job
                quarantine.append({"source": record.source, "key": record.key, "reason": UNEXPECTED,
                                   "detail": f"{type(exc).__name__}: {exc}"})
                continue
            meta = {"source": dataset_path(record), "label": record.label, "labels": list(record.labels),
                    "split": record.split, "media": record.media, "start_s": record.start_s,
                    "end_s": record.end_s, **video_meta}
            if record.extra:
                meta["extra"] = record.extra
            writer.write({
                "__key__": record.key,
                IMAGE_KEY if image else MEDIA_KEY: media,
                "json": json.dumps(meta, sort_keys=True).encode(),
                "cls": _class_field(record, label_map),
            })
            counts[writer.fname] = counts.get(writer.fname, 0) + 1
            index.append({"key": record.key, "shard": Path(writer.fname).name, "bytes": len(media),
                          **{k: meta[k] for k in INDEX_FIELDS}})
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
            shards.append({"url": url, "split": part.split, "num_samples": count,
                           "bytes": os.path.getsize(path), "sha256": sha256})
    finally:
        _close_reader(reader)
        shutil.rmtree(scratch, ignore_errors=True)
    for entry in index:
        entry["shard"] = f"{SHARD_DIR}/{entry['shard']}"
    result = {
        "part_id": part.part_id,
        "fingerprint": fingerprint,
        "inputs": len(part.records),
        "shards": shards,
        "quarantine": quarantine,
        "index": index,
        "bytes_in": bytes_in,
    }
    # The record is the commit point of a part: written after every one of its tars is in place.
    storage.write_bytes(storage.join(cfg.output, PARTS_DIR, f"{part.part_id}.json"), json.dumps(result).encode())
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
    """The Ray Data map function (named, so workers show up as `ray::Map(process_part_row)`)."""
    return {"result": process_part(Part.from_json(row["part"]), label_map, cfg, fingerprint)}


def _start_all_workers_at_once(dataset) -> None:
    """Turn off Ray Data's per-operator resource reservation for this dataset's execution only.

    With it on (Ray's default), a lone map operator starts with one task (`backpressured:tasks(
    ResourceBudget)` in Ray Data's progress log) and adds more only after its next resource refresh or
    its first output: on the benchmark the second worker idled through the whole first part (~5 s of a
    35 s job), on real parts it would be minutes. Reservation shares resources between operators;
    this job has one, whose outputs are a few hundred bytes per part, and its TaskPoolStrategy caps the
    worker count anyway. Set on the dataset's own context copy, so nothing else in the process changes.
    """
    context = dataset.context
    if hasattr(context, "op_resource_reservation_enabled"):  # a Ray without the flag: nothing to do
        context.op_resource_reservation_enabled = False


def _load_done(cfg: PreprocessConfig, parts: list[Part], fingerprint: str) -> dict[str, dict]:
    """Parts an earlier run finished for the same inputs and config, with every shard still in place.
    A part that met an unexpected error (a bug, not a bad video) is not trusted and is redone."""
    committed = {uri for uri, _ in storage.list_files(storage.join(cfg.output, PARTS_DIR))}
    if not committed:
        return {}
    present = {uri for uri, _ in storage.list_files(storage.join(cfg.output, SHARD_DIR))}
    done: dict[str, dict] = {}
    for part in parts:
        uri = storage.join(cfg.output, PARTS_DIR, f"{part.part_id}.json")
        if uri not in committed:
            continue
        record = json.loads(storage.read_bytes(uri))
        if (
            record.get("fingerprint") == fingerprint
            and all(storage.join(cfg.output, s["url"]) in present for s in record["shards"])
            and not any(q["reason"] == UNEXPECTED for q in record["quarantine"])
        ):
            done[part.part_id] = record
    return done


class _Progress:
    def __init__(self, total_parts: int, total_videos: int):
        self.total_parts, self.total_videos = total_parts, total_videos
        self.parts = self.videos = self.quarantined = self.bytes_out = 0
        self.start = time.monotonic()

    def update(self, result: dict) -> None:
        self.parts += 1
        self.videos += result["inputs"]
        self.quarantined += len(result["quarantine"])
        self.bytes_out += sum(s["bytes"] for s in result["shards"])
        elapsed = time.monotonic() - self.start
        rate = self.videos / elapsed if elapsed > 0 else 0.0
        eta = (self.total_videos - self.videos) / rate if rate else float("nan")
        print(
            f"[preprocess] parts {self.parts}/{self.total_parts}  videos {self.videos}/{self.total_videos}  "
            f"{rate:.1f} videos/s  out {self.bytes_out / 1e6:.1f} MB  quarantined {self.quarantined}  ETA {eta:.0f}s",
            flush=True,
        )


def run(cfg: PreprocessConfig) -> Manifest:
    # Ray Data tasks do not run in the caller's directory: local paths are resolved here, once.
    cfg = dataclasses.replace(cfg, **{key: storage.absolute(getattr(cfg, key))
                                      for key in ("source", "output", "source_root", "labels_file")})
    storage.check_reachable(cfg.output)
    fmt = cfg.source_format if cfg.source_format != "auto" else detect_format(cfg.source)
    options = dataclasses.asdict(cfg.ava) if fmt == "ava" else {}
    records, rejected = load_records(cfg.source, fmt, cfg.source_root or None, **options)
    inputs = len(records) + len(rejected)

    unique: dict[str, VideoRecord] = {}
    for record in records:
        if record.key in unique:
            rejected.append(Rejected(record.source, f"duplicate id (key {record.key} already used)"))
        else:
            unique[record.key] = record
    records = list(unique.values())
    if cfg.labels_file:
        label_map = read_label_file(cfg.labels_file)
        known = [r for r in records if all(name in label_map for name in r.labels)]
        rejected += [
            Rejected(r.source, f"unknown label '{next(n for n in r.labels if n not in label_map)}' "
                               f"(not in labels_file {cfg.labels_file})")
            for r in records if not all(name in label_map for name in r.labels)
        ]
        records = known
    else:
        label_map = {name: i for i, name in enumerate(sorted({n for r in records for n in r.labels}))}
    records = assign_splits(records, cfg.val_fraction)
    fingerprint = _fingerprint(records, label_map, cfg)

    manifest_uri = storage.join(cfg.output, MANIFEST)
    if storage.exists(manifest_uri):
        existing = Manifest.from_json(storage.read_bytes(manifest_uri).decode(), where=manifest_uri)
        if existing.input_fingerprint == fingerprint:
            print(f"[preprocess] {cfg.output} is complete for these inputs and config; nothing to do", flush=True)
            return existing
        raise DatasetError(
            f"{cfg.output} already holds a dataset made from other inputs or another config; "
            "write to a new output prefix (nothing there was changed)"
        )

    parts = plan_parts(records, cfg)
    done = _load_done(cfg, parts, fingerprint)
    # Largest parts first (by source bytes): the job then ends on small parts, and workers finish
    # closer together than in planning order (the output does not depend on the order).
    todo = sorted((p for p in parts if p.part_id not in done), key=lambda p: -sum(r.size for r in p.records))
    print(
        f"[preprocess] {inputs} inputs ({len(rejected)} rejected while listing), {len(label_map)} labels, "
        f"{len(parts)} parts ({len(done)} already done)",
        flush=True,
    )
    progress = _Progress(len(todo), sum(len(p.records) for p in todo))
    results = list(done.values())
    if todo:
        import ray

        ensure_ray(cfg.ray)
        # Parts travel as JSON (an Arrow string column) rather than pickled dataclasses.
        items = [{"part": json.dumps(dataclasses.asdict(p))} for p in todo]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        # One task per part. Ray retries a task whose worker died; a retried part rewrites the same bytes
        # under the same names. Retries are bounded (Ray Data's default is forever), so an input that
        # kills every worker it meets ends the job with an error instead of looping.
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for max_retries yet; passing it the old way warns.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            mapped = dataset.map(
                process_part_row,
                fn_kwargs={"label_map": label_map, "cfg": cfg, "fingerprint": fingerprint},
                num_cpus=cfg.cpus_per_task,
                compute=ray.data.TaskPoolStrategy(size=cfg.num_workers or None),
                max_retries=cfg.max_task_retries,
            )
        _start_all_workers_at_once(mapped)
        for row in mapped.iter_rows():
            results.append(row["result"])
            progress.update(row["result"])

    results.sort(key=lambda r: r["part_id"])
    shards = [ShardInfo(**s) for r in results for s in r["shards"]]
    quarantine = [{"source": q.source, "reason": q.reason} for q in rejected]
    quarantine += [q for r in results for q in r["quarantine"]]
    quarantine.sort(key=lambda q: (q["source"], q.get("key", "")))
    splits: dict[str, int] = {}
    for shard in shards:
        splits[shard.split] = splits.get(shard.split, 0) + shard.num_samples
    manifest = Manifest(
        num_samples=sum(s.num_samples for s in shards),
        label_map=label_map,
        shards=shards,
        config=dataclasses.asdict(cfg),
        input_fingerprint=fingerprint,
        inputs=inputs,
        quarantined=len(quarantine),
        splits=splits,
    )
    unexpected = [q for q in quarantine if q["reason"] == UNEXPECTED]
    if len(unexpected) > cfg.max_error_fraction * max(1, inputs):
        raise RuntimeError(
            f"{len(unexpected)} of {inputs} inputs failed with an unexpected error (more than max_error_fraction="
            f"{cfg.max_error_fraction}): a bug or a broken environment rather than bad videos. First: "
            f"{unexpected[0]['source']}: {unexpected[0]['detail']}. Finished parts are kept; rerun the same "
            "command once fixed (parts with errors are redone)."
        )
    if manifest.num_samples + manifest.quarantined != inputs:
        raise RuntimeError(
            f"accounting error: {manifest.num_samples} samples + {manifest.quarantined} quarantined != {inputs} inputs"
        )
    storage.write_bytes(
        storage.join(cfg.output, QUARANTINE), "".join(json.dumps(q) + "\n" for q in quarantine).encode()
    )
    index = sorted((entry for r in results for entry in r.get("index", [])), key=lambda e: (e["shard"], e["key"]))
    storage.write_bytes(storage.join(cfg.output, INDEX), "".join(json.dumps(e) + "\n" for e in index).encode())
    storage.write_bytes(manifest_uri, manifest.to_json().encode())
    print(
        f"[preprocess] wrote {len(shards)} shards, {manifest.num_samples} samples {splits}, "
        f"{manifest.quarantined} quarantined -> {cfg.output}",
        flush=True,
    )
    return manifest
