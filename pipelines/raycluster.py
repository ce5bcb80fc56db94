"""Connecting to Ray: an embedded local instance by default, or a cluster address from the config."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipelines.config import split_credentials

# Settings a Ray worker on a *cluster* needs to reach the same storage and tracking server as the driver.
# Credentials are deliberately not among them: a runtime env is shown in plain text by the Ray dashboard
# and the Jobs API, so cluster nodes get theirs from an instance role or a Kubernetes Secret (infra/).
# Workers of an embedded Ray inherit the driver's whole environment anyway.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
)


@dataclass
class RayConfig:
    address: str = ""  # "" = start an embedded local Ray; "auto" or "ray://host:10001" = a cluster
    num_cpus: int = 0  # embedded Ray only; 0 = every core of this machine


# Ray Train V2 reroutes print() in workers through its logger *and* the original stream, so every line of
# the training loop would reach the driver twice; plain prints are already streamed by log_to_driver.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def forwarded_env() -> dict[str, str]:
    """The FORWARDED_ENV settings of this process, URIs without `user:password@` (the cluster's own
    environment or a Secret holds its credentials, e.g. MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    return {name: split_credentials(os.environ[name])[0] for name in FORWARDED_ENV if os.environ.get(name)}


# An embedded Ray is one machine: nothing can be preempted, and Ray Train's preemption watcher (an actor
# restarted forever, whose arguments live in the object store) only makes Ray's core worker log an
# ERROR line on every run (ray-project/ray#53727). On a cluster it stays on: it drains workers of nodes
# that are about to go away.
EMBEDDED_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def runtime_env(embedded: bool = False) -> dict:
    """The runtime env every job of ours runs with: storage/tracking settings of the driver, no secrets."""
    return {"env_vars": {**WORKER_ENV, **(EMBEDDED_ENV if embedded else {}), **forwarded_env()}}


def quiet_train_worker_logs() -> None:
    """Called first in a training worker: Ray Train's per-report INFO lines ("Reporting training result N:
    TrainingReport(...)", "Checkpoint successfully created at: Checkpoint(filesystem=s3, path=bucket/...)",
    a path without its scheme that cannot be pasted anywhere) go; the loop prints its own progress and the
    job prints the checkpoint URI it finished with. Warnings and errors still show."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution").setLevel(logging.WARNING)


def ensure_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # A stage submitted as a Ray job (`mvit submit`) runs with RAY_ADDRESS set by Ray Jobs: it joins that
    # cluster, whose GCS holds the job's working_dir package.
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    # A local embedded instance needs no token; a real cluster keeps whatever auth it was set up with.
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = {"runtime_env": runtime_env(embedded=not address), "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
        return
    # The dashboard also serves Ray's state API, which Ray Train's placement-group cleaner polls: without
    # it the driver log fills with "Failed to query Ray Train Controller actor state" warnings.
    # address="local": a new instance of our own, never a cluster someone else `ray start`-ed on this machine
    # (which ray.init() without an address joins).
    context = ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=True,
                       dashboard_host="127.0.0.1", **kwargs)
    if context.dashboard_url:
        print(f"[ray] embedded Ray started; dashboard at http://{context.dashboard_url}", flush=True)
