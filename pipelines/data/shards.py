"""The preprocessed-dataset contract (README: "The dataset contract"): `<out>/shards/*.tar`, `manifest.json`,
`quarantine.jsonl`. Readers go through `read_manifest`, which refuses a prefix without a manifest
(an incomplete or still-running preprocessing job) instead of reading half a dataset."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipelines.data import storage

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
SHARD_DIR = "shards"
MEDIA_KEY = "mp4"  # video samples
IMAGE_KEY = "jpg"  # image samples (ImageNet-style sources, for the image MViT)
# One JSON line per sample (key, shard, label, split, frames, fps, size, bytes): what `mvit shards stats`
# reads instead of the media, and what `mvit shards verify` checks the shards against.
INDEX = "index.jsonl"
INDEX_FIELDS = ("labels", "split", "media", "frames", "fps", "width", "height")


class DatasetError(ValueError):
    """A preprocessed dataset prefix is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class QuarantineEntry:
    """One line of quarantine.jsonl: an input that did not become a sample, and why."""

    source: str
    reason: str
    key: str = ""  # the sample key it would have had ("" when rejected before a key was made)
    detail: str = ""
    # AVA: the annotated keyframes this entry loses (a missing movie, a chunk that did not decode, a keyframe
    # whose every row was rejected); 0 for a rejected row and for other sources (pipelines/detection/keyframes.py).
    keyframes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON line: `source` and `reason` always, `key`, `detail` and `keyframes` when known."""
        data: dict[str, Any] = {"source": self.source}
        if self.key:
            data["key"] = self.key
        data["reason"] = self.reason
        if self.detail:
            data["detail"] = self.detail
        if self.keyframes:
            data["keyframes"] = self.keyframes
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuarantineEntry":
        return cls(str(data["source"]), str(data["reason"]), str(data.get("key", "")), str(data.get("detail", "")),
                   int(data.get("keyframes", 0)))


@dataclass
class ShardInfo:
    url: str  # relative to the dataset prefix
    split: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    num_samples: int
    label_map: dict[str, int]
    shards: list[ShardInfo]
    config: dict[str, Any]
    input_fingerprint: str
    inputs: int
    quarantined: int
    splits: dict[str, int] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = {
            "format_version": self.format_version,
            "num_samples": self.num_samples,
            "inputs": self.inputs,
            "quarantined": self.quarantined,
            "splits": self.splits,
            "label_map": self.label_map,
            "input_fingerprint": self.input_fingerprint,
            "config": self.config,
            "shards": [vars(s) for s in self.shards],
        }
        return json.dumps(data, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> "Manifest":
        try:
            data = json.loads(text)
            shards = [ShardInfo(**s) for s in data["shards"]]
            return cls(
                num_samples=int(data["num_samples"]),
                label_map={str(k): int(v) for k, v in data["label_map"].items()},
                shards=shards,
                config=data.get("config", {}),
                input_fingerprint=data["input_fingerprint"],
                inputs=int(data.get("inputs", data["num_samples"])),
                quarantined=int(data.get("quarantined", 0)),
                splits=data.get("splits", {}),
                format_version=int(data["format_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{where} is not a valid manifest ({type(exc).__name__}: {exc})") from None

    def digest(self) -> str:
        """Content digest used as the dataset's identity in MLflow lineage."""
        return hashlib.sha256(json.dumps([vars(s) for s in self.shards], sort_keys=True).encode()).hexdigest()[:16]

    def shard_urls(self, prefix: str, split: str) -> list[str]:
        return [storage.join(prefix, s.url) for s in self.shards if s.split == split]

    def split_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards if s.split == split)

    @property
    def labels(self) -> list[str]:
        return [name for name, _ in sorted(self.label_map.items(), key=lambda kv: kv[1])]


def read_manifest(prefix: str) -> Manifest:
    uri = storage.join(prefix, MANIFEST)
    try:
        present = storage.exists(uri)
    except Exception as exc:  # noqa: BLE001 - turn any storage failure into an actionable message
        raise DatasetError(f"cannot read {uri}: {exc}") from None
    if not present:
        if not _prefix_exists(prefix):
            raise DatasetError(
                f"dataset {prefix} does not exist: check the path (or bucket and prefix), or create it with "
                f"`mvit preprocess ... output={prefix}`"
            )
        raise DatasetError(
            f"{prefix} has no {MANIFEST}: it is not a preprocessed dataset, or its preprocessing did not "
            "finish (rerun `mvit preprocess` with the same output to resume it)"
        )
    manifest = Manifest.from_json(storage.read_bytes(uri).decode(), where=uri)
    if manifest.format_version > FORMAT_VERSION:
        raise DatasetError(f"{uri} has format_version {manifest.format_version}; this code reads <= {FORMAT_VERSION}")
    return manifest


def _prefix_exists(prefix: str) -> bool:
    """Whether anything is stored under `prefix` (a local folder, or an S3 bucket holding keys under it)."""
    if not storage.is_s3(prefix):
        return storage.local_path(prefix).exists()
    try:
        storage.check_reachable(prefix)
        return next(iter(storage.list_files(prefix)), None) is not None
    except storage.StorageError:
        return False


def stored_fps(prefix: str, manifest: Manifest, split: str = "train") -> float:
    """The frame rate of the stored videos of `split` (what a model trained on them takes as its time
    scale): the preprocessing `fps`, or for a dataset that kept its sources' rates (fps 0) the median rate
    of the split's samples in index.jsonl. 0.0 when neither is known (images; a dataset without an index)."""
    configured = float(manifest.config.get("fps") or 0)
    if configured > 0:
        return configured
    index = storage.join(prefix, INDEX)
    if not storage.exists(index):
        return 0.0
    rates = sorted(float(entry.get("fps") or 0) for entry in map(json.loads, storage.read_bytes(index).splitlines())
                   if entry.get("split") == split and entry.get("fps"))
    return rates[len(rates) // 2] if rates else 0.0


def sample_metadata(sample: dict) -> dict:
    return json.loads(sample["json"])


def _opened(shards: Iterable[dict]) -> Iterator[dict]:
    # Shards open through `storage` (local files; s3:// with boto3: any endpoint, botocore's retries)
    # rather than webdataset's gopen, which shells out to an `aws` CLI for s3:// and would have to be
    # patched process-wide to do otherwise.
    for shard in shards:
        yield {**shard, "stream": storage.open_read(shard["url"])}


def tar_samples(shards: Iterable[dict]) -> Iterator[dict]:
    """WebDataset pipeline stage: shard dicts (`{"url": ...}`) -> samples (`{"__key__": ..., field: bytes}`)."""
    import webdataset as wds

    return wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(_opened(shards)))


def read_samples(urls: list[str]) -> Iterator[dict]:
    """Every sample of the shards `urls`, once, in order."""
    import webdataset as wds

    return iter(wds.DataPipeline(wds.SimpleShardList(urls), tar_samples))
