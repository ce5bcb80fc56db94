"""Connecting to Ray: an embedded local instance by default, or a cluster address from the config."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Environment a Ray worker needs to reach the same storage and tracking server as the driver.
# Credentials are forwarded through the runtime env (process environment), never logged.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
)


@dataclass
class RayConfig:
    address: str = ""  # "" = start an embedded local Ray; "auto" or "ray://host:10001" = a cluster
    num_cpus: int = 0  # embedded Ray only; 0 = every core of this machine


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def ensure_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # A local embedded instance needs no token; a real cluster keeps whatever auth it was set up with.
    if not cfg.address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = {"runtime_env": {"env_vars": forwarded_env()}, "log_to_driver": True}
    if cfg.address:
        ray.init(address=cfg.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False, **kwargs)
