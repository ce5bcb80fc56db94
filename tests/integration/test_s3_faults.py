"""Transient S3 errors (503 SlowDown, 500, connection resets) on every S3 call are retried by botocore's
retry configuration: preprocessing from and to S3, and verifying the result, still succeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipelines.commands.shards import verify
from pipelines.data import storage
from pipelines.data.shards import read_manifest
from tests.faulty_s3 import FAULTS, FaultyS3Proxy

pytestmark = pytest.mark.integration

OUT = "s3://mvit/faults/dataset"


def test_preprocess_and_verify_through_failing_s3(services, raw_videos_s3, monkeypatch):
    with FaultyS3Proxy(services.s3_endpoint) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "RAY_AUTH_MODE": "disabled"}
        done = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "preprocess", f"source={raw_videos_s3['csv']}", f"output={OUT}",
             "short_side=36", "fps=0", "max_samples_per_shard=16", "ray.num_cpus=2"],
            env=env, capture_output=True, text=True, timeout=400,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["num_samples"] == raw_videos_s3["train"] + raw_videos_s3["val"]
        assert result["quarantined"] == raw_videos_s3["missing"]  # only the row without a file

        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage._client.cache_clear()
        try:
            report = verify(OUT, decode_fraction=0.2)
        finally:
            monkeypatch.setenv("AWS_ENDPOINT_URL", services.s3_endpoint)
            storage._client.cache_clear()
        injected = dict(proxy.injected)
    assert report["ok"], report["problems"]
    assert report["samples"] == result["num_samples"]
    # every kind of fault was injected, many times, and yet nothing failed
    assert all(injected.get(kind, 0) >= 5 for kind in FAULTS), injected
    assert read_manifest(OUT).num_samples == result["num_samples"]  # straight from the server, no proxy
