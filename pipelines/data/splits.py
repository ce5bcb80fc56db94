"""Train/val assignment for records whose source has no split column: stratified per class,
deterministic, and a function of the data alone (labels, files under the source root, keys), never of
where the raw files lie.

The unit assigned is a file (`dataset_path`): records cut from one file (AVA chunks of a movie, two
Kinetics rows cutting one full video) share a split, so no video is seen in training and validation.
Each file belongs to one stratum (a class); in each stratum of n files, `validation_count(n, f)` go to
val: round(f * n), but at least 1 when n >= 2 (every class is validated) and at most n - 1 (every class
is trained on); a class with a single file trains. Which files go is decided by a hash of their sample
key: the files of a class with the lowest hashes are its validation files. Adding a file to a class
therefore changes only that class's choice, and by at most the new file plus one whose place it takes
or that the count adds.

Multi-label records (AVA-style `labels`): a file's stratum is its rarest label, i.e. the one carried by
the fewest files (ties: the first by name). Rare classes then get their validation files first; the
per-stratum guarantee above does not extend to every label a file carries, which no assignment of
whole files can promise in general.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import defaultdict

from pipelines.data.sources.base import VideoRecord, dataset_path


def validation_count(files: int, val_fraction: float) -> int:
    """How many of a class's `files` go to val: within one file of val_fraction * files."""
    if files < 2 or val_fraction <= 0:
        return 0
    return min(files - 1, max(1, math.floor(val_fraction * files + 0.5)))


def _by_file(records: list[VideoRecord]) -> dict[str, list[VideoRecord]]:
    files: dict[str, list[VideoRecord]] = defaultdict(list)
    for record in records:
        files[dataset_path(record)].append(record)
    return files


def _strata(files: dict[str, list[VideoRecord]]) -> dict[str, list[str]]:
    """stratum (a class name; "" for a file without labels) -> its files."""
    labels_of = {path: sorted({label for record in records for label in record.labels}) for path, records in files.items()}
    files_with: dict[str, int] = defaultdict(int)
    for labels in labels_of.values():
        for label in labels:
            files_with[label] += 1
    strata: dict[str, list[str]] = defaultdict(list)
    for path, labels in labels_of.items():
        rarest = min(labels, key=lambda label: (files_with[label], label)) if labels else ""
        strata[rarest].append(path)
    return strata


def _hash_rank(records: list[VideoRecord]) -> tuple[str, str]:
    """A file's place in its class's draw: a hash of its (first) sample key, which does not depend on
    where the file lies or on which other files exist."""
    key = min(record.key for record in records)
    return hashlib.sha256(key.encode("utf-8")).hexdigest(), key


def assign_splits(records: list[VideoRecord], val_fraction: float) -> list[VideoRecord]:
    """`records` in the same order, those without a split given "train" or "val" (see the module
    docstring); records with a split keep it."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = _by_file([record for record in records if not record.split])
    validation: set[str] = set()
    for paths in _strata(files).values():
        ranked = sorted(paths, key=lambda path: _hash_rank(files[path]))
        validation.update(ranked[: validation_count(len(paths), val_fraction)])
    return [
        record if record.split else dataclasses.replace(record, split="val" if dataset_path(record) in validation else "train")
        for record in records
    ]
