"""Scheduling of the preprocessing job's Ray Data map: every worker takes a part from the start.

Ray Data's default per-operator resource reservation starts a lone map operator's tasks one at a time
until it has seen output, which left one of two workers idle through the whole first part of a job.
The job's map goes through `_start_all_workers_at_once`; this checks that it still does what it says
with the Ray Data installed (its scheduler changes between releases).
"""

from __future__ import annotations

import time

import pytest
from ray.data import DataContext

from pipelines.preprocess.job import _start_all_workers_at_once

pytestmark = pytest.mark.integration

TASK_SECONDS = 1.5


def _run_two_parts() -> list[dict]:
    import ray

    def _timed_part(row: dict) -> dict:  # nested: pickled by value (workers cannot import test modules)
        started = time.time()
        time.sleep(TASK_SECONDS)
        return {"started": started, "ended": time.time()}

    dataset = ray.data.from_items([{"part": 0}, {"part": 1}], override_num_blocks=2)
    mapped = dataset.map(_timed_part, num_cpus=1, compute=ray.data.TaskPoolStrategy(size=2))
    _start_all_workers_at_once(mapped)
    return list(mapped.iter_rows())


def test_two_workers_start_their_first_parts_together(ray_session):
    _run_two_parts()  # warm-up: two worker processes exist, as they do a few seconds into a real job
    rows = _run_two_parts()
    first, second = sorted(row["started"] for row in rows)
    assert DataContext.get_current().op_resource_reservation_enabled  # only that dataset's copy changed
    # With reservation on, the second task starts ~1 s (Ray Data's resource refresh) or a whole task later.
    assert second - first < TASK_SECONDS / 2, (
        f"the second worker started {second - first:.2f} s after the first: Ray Data held the map to one task"
    )
