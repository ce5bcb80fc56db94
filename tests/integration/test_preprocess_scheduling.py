"""Scheduling of the preprocessing job's Ray Data map: every worker takes a part from the start.

Ray Data's default per-operator resource reservation starts a lone map operator's tasks one at a time
until it has seen output, which left one of two workers idle through the whole first part of a job.
The job runs its map under `_all_workers_from_the_start`; this checks that setting still does what it
says with the Ray Data installed (its scheduler changes between releases).
"""

from __future__ import annotations

import time

import pytest

from pipelines.preprocess.job import _all_workers_from_the_start

pytestmark = pytest.mark.integration

TASK_SECONDS = 1.5


def _run_two_parts() -> list[dict]:
    import ray

    def _timed_part(row: dict) -> dict:  # nested: pickled by value (workers cannot import test modules)
        started = time.time()
        time.sleep(TASK_SECONDS)
        return {"started": started, "ended": time.time()}

    with _all_workers_from_the_start():
        dataset = ray.data.from_items([{"part": 0}, {"part": 1}], override_num_blocks=2)
        mapped = dataset.map(_timed_part, num_cpus=1, compute=ray.data.TaskPoolStrategy(size=2))
        return list(mapped.iter_rows())


def test_two_workers_start_their_first_parts_together(ray_session):
    _run_two_parts()  # warm-up: two worker processes exist, as they do a few seconds into a real job
    rows = _run_two_parts()
    first, second = sorted(row["started"] for row in rows)
    # With reservation on, the second task starts ~1 s (Ray Data's resource refresh) or a whole task later.
    assert second - first < TASK_SECONDS / 2, (
        f"the second worker started {second - first:.2f} s after the first: Ray Data held the map to one task"
    )
