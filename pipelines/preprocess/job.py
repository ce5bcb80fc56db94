"""The preprocessing job: annotations -> WebDataset shards + manifest.json + quarantine.jsonl.

Plan on the driver, work in Ray Data tasks, commit on the driver:
  1. plan (plan.py): list inputs (adapters), reject what is already known bad, give labels stable ids, cut
     the sorted inputs of each split into *parts* (deterministic: same inputs -> same parts);
  2. Ray Data maps each part to its shards (worker.py): read -> decode (PyAV) -> resize -> re-encode -> tar;
     a part's tars are uploaded under their final names only when complete, then a small
     `_parts/<part>.json` record marks the part done (resume skips parts with a record);
  3. quarantine.jsonl, index.jsonl, then manifest.json last: a prefix without a manifest is incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass

from pipelines.config import StageResult
from pipelines.data import storage
from pipelines.data.shards import INDEX, MANIFEST, QUARANTINE, SHARD_DIR, DatasetError, Manifest
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.plan import Part, make_plan
from pipelines.preprocess.worker import PARTS_DIR, UNEXPECTED, PartResult, part_record_uri, process_part_row
from pipelines.raycluster import ensure_ray


@dataclass
class PreprocessResult(StageResult):
    output: str  # the dataset prefix (holds manifest.json)
    num_samples: int
    quarantined: int
    shards: int
    digest: str  # the manifest's content digest (the dataset's identity in lineage)

    @classmethod
    def of(cls, output: str, manifest: Manifest) -> "PreprocessResult":
        return cls(output, manifest.num_samples, manifest.quarantined, len(manifest.shards), manifest.digest())


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


def _load_done(cfg: PreprocessConfig, parts: list[Part], fingerprint: str) -> dict[str, PartResult]:
    """Parts an earlier run finished for the same inputs and config, with every shard still in place.
    A part that met an unexpected error (a bug, not a bad video) is not trusted and is redone."""
    committed = {uri for uri, _ in storage.list_files(storage.join(cfg.output, PARTS_DIR))}
    if not committed:
        return {}
    present = {uri for uri, _ in storage.list_files(storage.join(cfg.output, SHARD_DIR))}
    done: dict[str, PartResult] = {}
    for part in parts:
        uri = part_record_uri(cfg.output, part.part_id)
        if uri not in committed:
            continue
        record = PartResult.from_json(storage.read_bytes(uri).decode())
        if (
            record.fingerprint == fingerprint
            and all(storage.join(cfg.output, s.url) in present for s in record.shards)
            and not any(q.reason == UNEXPECTED for q in record.quarantine)
        ):
            done[part.part_id] = record
    return done


class _Progress:
    def __init__(self, total_parts: int, total_videos: int):
        self.total_parts, self.total_videos = total_parts, total_videos
        self.parts = self.videos = self.quarantined = self.bytes_out = 0
        self.start = time.monotonic()

    def update(self, result: PartResult) -> None:
        self.parts += 1
        self.videos += result.inputs
        self.quarantined += len(result.quarantine)
        self.bytes_out += sum(s.bytes for s in result.shards)
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
    plan = make_plan(cfg)
    label_map, fingerprint, parts, inputs = plan.label_map, plan.fingerprint, plan.parts, plan.inputs

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

    done = _load_done(cfg, parts, fingerprint)
    # Largest parts first (by source bytes): the job then ends on small parts, and workers finish
    # closer together than in planning order (the output does not depend on the order).
    todo = sorted((p for p in parts if p.part_id not in done), key=lambda p: -sum(r.size for r in p.records))
    print(
        f"[preprocess] {inputs} inputs ({len(plan.rejected)} rejected while listing), {len(label_map)} labels, "
        f"{len(parts)} parts ({len(done)} already done)",
        flush=True,
    )
    progress = _Progress(len(todo), sum(len(p.records) for p in todo))
    results = list(done.values())
    if todo:
        import ray

        ensure_ray(cfg.ray)
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
            result = PartResult.from_json(row["result"])
            results.append(result)
            progress.update(result)

    results.sort(key=lambda r: r.part_id)
    shards = [s for r in results for s in r.shards]
    quarantine = plan.rejected + [q for r in results for q in r.quarantine]
    quarantine.sort(key=lambda q: (q.source, q.key))
    splits: dict[str, int] = {}
    for shard in shards:
        splits[shard.split] = splits.get(shard.split, 0) + shard.num_samples
    manifest = Manifest(
        num_samples=sum(s.num_samples for s in shards),
        label_map=label_map,
        shards=shards,
        config={**dataclasses.asdict(cfg), "source_format": plan.source_format},  # what `auto` read it as
        input_fingerprint=fingerprint,
        inputs=inputs,
        quarantined=len(quarantine),
        splits=splits,
    )
    unexpected = [q for q in quarantine if q.reason == UNEXPECTED]
    if len(unexpected) > cfg.max_error_fraction * max(1, inputs):
        raise RuntimeError(
            f"{len(unexpected)} of {inputs} inputs failed with an unexpected error (more than max_error_fraction="
            f"{cfg.max_error_fraction}): a bug or a broken environment rather than bad videos. First: "
            f"{unexpected[0].source}: {unexpected[0].detail}. Finished parts are kept; rerun the same "
            "command once fixed (parts with errors are redone)."
        )
    if manifest.num_samples + manifest.quarantined != inputs:
        raise RuntimeError(
            f"accounting error: {manifest.num_samples} samples + {manifest.quarantined} quarantined != {inputs} inputs"
        )
    storage.write_bytes(
        storage.join(cfg.output, QUARANTINE), "".join(json.dumps(q.to_dict()) + "\n" for q in quarantine).encode()
    )
    index = sorted((entry for r in results for entry in r.index), key=lambda e: (e["shard"], e["key"]))
    storage.write_bytes(storage.join(cfg.output, INDEX), "".join(json.dumps(e) + "\n" for e in index).encode())
    storage.write_bytes(manifest_uri, manifest.to_json().encode())
    print(
        f"[preprocess] wrote {len(shards)} shards, {manifest.num_samples} samples {splits}, "
        f"{manifest.quarantined} quarantined -> {cfg.output}",
        flush=True,
    )
    return manifest
