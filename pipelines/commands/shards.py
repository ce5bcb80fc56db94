"""`mvit shards verify|stats PREFIX`: check a preprocessed dataset against its manifest, or summarise it.

verify re-reads every shard: bytes and sha256 against the manifest, sample count and keys against the
index, every sample's fields (`__key__`, media, json, cls within the label map), and decodes a sample of
the media. It exits non-zero and names each problem. stats reads only manifest, index and quarantine.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import random
import statistics
import tarfile

from pipelines.data import storage
from pipelines.data.shards import IMAGE_KEY, INDEX, MEDIA_KEY, QUARANTINE, Manifest, read_manifest


def _read_lines(prefix: str, name: str) -> list[dict]:
    uri = storage.join(prefix, name)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


class _HashingReader(io.RawIOBase):
    """Counts and hashes the bytes a streaming consumer (tarfile) reads, so a shard is read once, never
    held whole in memory (shards are ~1 GB)."""

    def __init__(self, stream):
        self.stream, self.sha256, self.bytes = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.stream.read(len(buffer))
        self.sha256.update(chunk)
        self.bytes += len(chunk)
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _shard_samples(reader: _HashingReader):
    """(key, {field: bytes}) of one tar in order, grouped the way WebDataset groups them (key = name up
    to the first dot)."""
    key, fields = None, {}
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name_key, _, field = member.name.partition(".")
            if key is not None and name_key != key:
                yield key, fields
                fields = {}
            key = name_key
            fields[field] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields
    reader.drain()


def _decode_media(media_key: str, data: bytes) -> int:
    """Decode a sample's media; the number of frames it holds (1 for an image)."""
    from pipelines.data.images import decode_image
    from pipelines.data.video import decode

    if media_key == IMAGE_KEY:
        decode_image(data)
        return 1
    return decode(data).frames.shape[0]


def verify(prefix: str, decode_fraction: float = 0.05, seed: int = 0) -> dict:
    from pipelines.data.video import VideoError

    manifest = read_manifest(prefix)
    index = collections.defaultdict(set)
    for entry in _read_lines(prefix, INDEX):
        index[entry["shard"]].add(entry["key"])
    rng = random.Random(seed)
    problems: list[str] = []
    samples = decoded = 0
    ids = set(manifest.label_map.values())
    for shard in manifest.shards:
        uri = storage.join(prefix, shard.url)
        try:
            reader = _HashingReader(storage.open_read(uri))
        except FileNotFoundError:
            problems.append(f"{shard.url}: missing")
            continue
        keys = set()
        wanted = max(1, round(decode_fraction * shard.num_samples))
        stream = reader.stream
        try:
            for position, (key, fields) in enumerate(_shard_samples(reader)):
                keys.add(key)
                media_key = IMAGE_KEY if IMAGE_KEY in fields else MEDIA_KEY
                missing = {media_key, "json", "cls"} - set(fields)
                if missing:
                    problems.append(f"{shard.url}/{key}: missing field(s) {sorted(missing)}")
                    continue
                try:
                    classes = [int(c) for c in fields["cls"].split(b",") if c]  # "" : a multi-label sample without labels
                    meta = json.loads(fields["json"])
                except (ValueError, UnicodeDecodeError) as exc:
                    problems.append(f"{shard.url}/{key}: unreadable cls or json ({exc})")
                    continue
                if not set(classes) <= ids:
                    problems.append(f"{shard.url}/{key}: cls {fields['cls'].decode()} is not in the label map")
                # the first sample of every shard, then a random share of the rest
                if position == 0 or rng.random() < (wanted - 1) / max(1, shard.num_samples - 1):
                    try:
                        frames = _decode_media(media_key, fields[media_key])
                        decoded += 1
                        if frames != meta.get("frames", frames):
                            problems.append(f"{shard.url}/{key}: decodes to {frames} frames, json says {meta['frames']}")
                    except VideoError as exc:
                        problems.append(f"{shard.url}/{key}: media does not decode ({exc})")
        except tarfile.TarError as exc:
            problems.append(f"{shard.url}: not a readable tar ({exc})")
            continue
        finally:
            stream.close()
        samples += len(keys)
        if reader.bytes != shard.bytes or reader.sha256.hexdigest() != shard.sha256:
            problems.append(f"{shard.url}: bytes/sha256 differ from the manifest (corrupted or replaced)")
        if len(keys) != shard.num_samples:
            problems.append(f"{shard.url}: {len(keys)} samples, manifest says {shard.num_samples}")
        if index and keys != index.get(shard.url, set()):
            problems.append(f"{shard.url}: sample keys differ from {INDEX}")
    quarantined = len(_read_lines(prefix, QUARANTINE))
    if samples != manifest.num_samples:
        problems.append(f"{samples} samples in the shards, manifest says {manifest.num_samples}")
    if quarantined != manifest.quarantined:
        problems.append(f"{quarantined} lines in {QUARANTINE}, manifest says {manifest.quarantined}")
    if manifest.num_samples + manifest.quarantined != manifest.inputs:
        problems.append(f"{manifest.num_samples} samples + {manifest.quarantined} quarantined != {manifest.inputs} inputs")
    return {"prefix": prefix, "ok": not problems, "shards": len(manifest.shards), "samples": samples,
            "decoded": decoded, "quarantined": quarantined, "problems": problems}


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    return {"min": min(values), "mean": round(statistics.fmean(values), 3), "max": max(values)}


def stats(prefix: str) -> dict:
    manifest: Manifest = read_manifest(prefix)
    index = _read_lines(prefix, INDEX)
    per_label: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.Counter())
    for entry in index:
        for name in entry["labels"]:
            per_label[name][entry["split"]] += 1
    resolutions = collections.Counter(f"{e['width']}x{e['height']}" for e in index)
    reasons = collections.Counter(q["reason"].split(" (")[0] for q in _read_lines(prefix, QUARANTINE))
    shard_bytes = [s.bytes for s in manifest.shards]
    keyframes = {}
    if manifest.config.get("source_format") == "ava":  # where every annotated keyframe went
        from pipelines.detection.keyframes import keyframe_ledger

        keyframes = {"keyframes": keyframe_ledger(prefix).to_dict()}
    return {
        "prefix": prefix,
        "inputs": manifest.inputs,
        "samples": manifest.num_samples,
        "quarantined": manifest.quarantined,
        "splits": manifest.splits,
        "labels": len(manifest.label_map),
        "per_label": {label: dict(per_label.get(label, {})) for label in manifest.labels},
        "duration_s": _summary([e["frames"] / e["fps"] for e in index if e.get("fps")]),
        "frames": _summary([e["frames"] for e in index]),
        "fps": dict(collections.Counter(str(e["fps"]) for e in index)),
        "resolutions": dict(resolutions.most_common(10)),
        "sample_bytes": _summary([e["bytes"] for e in index]),
        "shards": len(manifest.shards),
        "shard_bytes": _summary(shard_bytes),
        "total_bytes": sum(shard_bytes),
        "quarantine_reasons": dict(reasons.most_common()),
        **keyframes,
    }


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("shards", help="verify or summarise a preprocessed dataset", description=__doc__.splitlines()[0])
    actions = p.add_subparsers(dest="action", required=True)
    v = actions.add_parser("verify", help="re-read every shard and check it against the manifest")
    v.add_argument("prefix")
    v.add_argument("--decode-fraction", type=float, default=0.05, help="share of samples whose media is decoded (>= 1 per shard)")
    s = actions.add_parser("stats", help="per-label counts, durations, resolutions, quarantine reasons "
                                                "(AVA: the keyframe ledger)")
    s.add_argument("prefix")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.action == "verify":
        report = verify(args.prefix, args.decode_fraction)
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    print(json.dumps(stats(args.prefix), indent=1))
    return 0
