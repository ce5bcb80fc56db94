"""Planning, on the driver: list the inputs, reject what is already known bad, give labels stable ids,
and cut the records of each split into *parts* (deterministic: same inputs -> same parts)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from pipelines.data import storage
from pipelines.data.identity import record_identity, shard_order
from pipelines.data.shards import DatasetError, QuarantineEntry
from pipelines.data.sources import VideoRecord, detect_format, load_records
from pipelines.data.splits import assign_splits
from pipelines.detection.keyframes import action_label_map, labelled_keyframes
from pipelines.preprocess.config import PreprocessConfig


@dataclass
class Part:
    part_id: str
    split: str
    records: list[VideoRecord]

    @classmethod
    def from_json(cls, text: str) -> "Part":
        data = json.loads(text)
        return cls(data["part_id"], data["split"], [VideoRecord(**r) for r in data["records"]])


@dataclass
class Plan:
    """What a preprocessing job will write: the usable records cut into parts, the rejected inputs, the
    label ids, and the fingerprint of all of it (what the output is a function of)."""

    records: list[VideoRecord]
    rejected: list[QuarantineEntry]
    label_map: dict[str, int]
    inputs: int
    fingerprint: str
    parts: list[Part]
    source_format: str = ""  # the format read (what `auto` resolved to); the manifest records it


def make_plan(cfg: PreprocessConfig) -> Plan:
    """List the inputs of `cfg.source`, drop duplicates and unknown labels (as rejected), assign splits
    and label ids, and cut the records into parts. AVA's label ids are its action ids - 1, from the whole
    action list (the detection head has one output per action id, whether or not the data holds it)."""
    fmt = cfg.source_format if cfg.source_format != "auto" else detect_format(cfg.source)
    options = dataclasses.asdict(cfg.ava) if fmt == "ava" else {}
    records, rejected = load_records(cfg.source, fmt, cfg.source_root or None, **options)
    rejected = list(rejected)
    inputs = len(records) + len(rejected)

    unique: dict[str, VideoRecord] = {}
    for record in records:
        if record.key in unique:
            rejected.append(QuarantineEntry(record.source, f"duplicate id (key {record.key} already used)",
                                            keyframes=labelled_keyframes(record.extra)))
        else:
            unique[record.key] = record
    records = list(unique.values())
    if cfg.labels_file:
        label_map = read_label_file(cfg.labels_file)
        known = [r for r in records if all(name in label_map for name in r.labels)]
        rejected += [
            QuarantineEntry(r.source, f"unknown label '{next(n for n in r.labels if n not in label_map)}' "
                                      f"(not in labels_file {cfg.labels_file})", keyframes=labelled_keyframes(r.extra))
            for r in records if not all(name in label_map for name in r.labels)
        ]
        records = known
    elif fmt == "ava":
        label_map = action_label_map(cfg.source, cfg.ava.action_list)
    else:
        label_map = {name: i for i, name in enumerate(sorted({n for r in records for n in r.labels}))}
    records = assign_splits(records, cfg.val_fraction)  # per class, after unknown labels are dropped
    return Plan(records, rejected, label_map, inputs, fingerprint(records, label_map, cfg), plan_parts(records, cfg),
                fmt)


def fingerprint(records: list[VideoRecord], label_map: dict[str, int], cfg: PreprocessConfig) -> str:
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
