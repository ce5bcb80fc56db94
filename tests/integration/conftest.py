"""Session fixtures: ONE local S3 server + MLflow server (`mvit stack`) and ONE Ray instance for the
whole integration suite; both are torn down (process groups killed) at the end of the session."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import boto3
import pytest

from pipelines import stack as local_stack
from pipelines.data.synthetic import SyntheticSpec, class_names, generate


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    info = local_stack.up(state)
    saved = {k: os.environ.get(k) for k in info.env()}
    os.environ.update(info.env())
    yield info
    local_stack.down(state)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_session(services):
    import ray

    from pipelines.raycluster import runtime_env

    # 4 logical CPUs on a 2-core machine: 2 training workers plus Ray Data / Train bookkeeping. The
    # dashboard serves the state API Ray Train polls; its own free port keeps parallel sessions apart.
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=local_stack.free_port(), runtime_env=runtime_env())
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(services):
    return boto3.client("s3", endpoint_url=services.s3_endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def raw_videos_s3(services, s3, tmp_path_factory) -> dict:
    """8 classes x 10 synthetic videos uploaded to s3://mvit/raw/, with a CSV that fixes the split
    (8 train + 2 val per class) and one extra row pointing at a file that does not exist."""
    local = tmp_path_factory.mktemp("raw")
    spec = SyntheticSpec(classes=8, videos_per_class=10, frames=16, size=48, seed=1)
    generate(local, spec)
    rows = []
    for name in class_names(spec.classes):
        for i, path in enumerate(sorted((local / name).glob("*.mp4"))):
            key = f"raw/{name}/{path.name}"
            s3.upload_file(str(path), "mvit", key)
            rows.append((f"{name}/{path.name}", name, "val" if i >= 8 else "train"))
    rows.append(("left_speed1/does_not_exist.mp4", "left_speed1", "train"))
    csv_path = local / "labels_with_split.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    s3.upload_file(str(csv_path), "mvit", "raw/labels.csv")
    return {"csv": "s3://mvit/raw/labels.csv", "train": 64, "val": 16, "missing": 1, "local": Path(local)}
