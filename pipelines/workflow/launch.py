"""Run one stage for an asset: in this process, or as a Ray job on the cluster in `workflow.ray_address`.

In-process, a stage uses the Ray this process is connected to (or starts an embedded one, see
pipelines/raycluster.py). As a Ray job, the stage is the same `mvit <stage>` command a user would submit
(`python -m pipelines.cli <stage> key=value ...` with the effective config spelled out as overrides), run
through the submit client of `mvit submit`; its result is the JSON line the command prints last.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pipelines.config import StageResult, print_effective, redact
from pipelines.stages import STAGES
from pipelines.workflow.config import WorkflowSettings


class StageError(RuntimeError):
    """A stage failed; the message names the stage, where it ran and the end of its log."""


def config_overrides(cfg: Any) -> list[str]:
    """A typed config as `dotted.key=<JSON value>` overrides that load back to an equal config
    (JSON is valid YAML, which OmegaConf's dotlist parser reads: strings stay quoted strings), with
    passwords in URIs redacted: this is a job's command line, which the cluster shows to anyone (the job
    takes them from the cluster's environment)."""

    def walk(data: dict, prefix: str):
        for key, value in data.items():
            if isinstance(value, dict) and value:
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={json.dumps(value)}"

    return list(walk(redact(dataclasses.asdict(cfg)), ""))


def last_json_object(logs: str) -> dict:
    """The result line a stage command prints last (one JSON object on one line)."""
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    raise StageError("the job finished but printed no JSON result line; see its log")


def run_as_ray_job(stage: str, cfg: Any, settings: WorkflowSettings) -> StageResult:
    from pipelines import jobclient

    args = [stage, *config_overrides(cfg)]
    client = jobclient.connect(settings.ray_address)
    job_id = jobclient.submit_job(client, args, working_dir=settings.working_dir,
                               metadata={"mvit.workflow_stage": stage})
    print(f"[workflow] {stage}: Ray job {job_id} on {settings.ray_address}", flush=True)
    status = jobclient.follow(client, job_id, timeout_s=settings.job_timeout_s or None)
    logs = client.get_job_logs(job_id)
    if status != "SUCCEEDED":
        raise StageError(f"{stage} as Ray job {job_id} on {settings.ray_address} ended {status}:\n"
                         f"{jobclient.job_message(client, job_id)}\n--- last lines of its log ---\n{jobclient.tail(logs)}")
    return STAGES[stage].result.from_dict(last_json_object(logs))


def run_stage(stage: str, cfg: Any, settings: WorkflowSettings) -> StageResult:
    """The stage's typed result, either way it runs (in-process it is the function behind `mvit <stage>`)."""
    print_effective(stage, cfg)
    if settings.ray_address:
        return run_as_ray_job(stage, cfg, settings)
    return STAGES[stage].run(cfg)
