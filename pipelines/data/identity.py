"""What a preprocessed dataset is a function of: its records as named inside the dataset (keys, paths
under the source root, labels, time ranges), never where the raw files lie (a local folder or an
s3:// prefix, which only the manifest's config records). Shard order and the input fingerprint are
computed from these names, so the same raw set preprocessed from two folders gives the same shards."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from pipelines.data.sources.base import VideoRecord, dataset_path

# Config fields that say where inputs lie, not what they are (the label map, not the labels file's
# path, is what the samples depend on).
LOCATION_FIELDS = ("source", "source_root", "labels_file")


def shard_order(record: VideoRecord) -> tuple[str, float, str]:
    """Sort key of records within a split. Annotation files are usually grouped by label; ordering by a
    hash of the file's dataset path instead spreads every label over every shard, so a shard-level
    shuffle buffer already sees mixed labels. Records cut from one file (AVA chunks) stay next to each
    other, so a task reads that file once."""
    return hashlib.sha1(dataset_path(record).encode()).hexdigest(), record.start_s or 0.0, record.key


def record_identity(record: VideoRecord) -> dict[str, Any]:
    """The record's fields minus `source` (where it is read from), with `path` filled in."""
    fields = dataclasses.asdict(record)
    fields.pop("source")
    fields["path"] = dataset_path(record)
    return fields
