"""`mvit jobs list|status|logs|stop`: the Ray jobs of a cluster, through the same client as `mvit submit`
(same address resolution and token handling)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from pipelines import jobclient


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _describe(job) -> dict:
    return {
        "submission_id": job.submission_id,
        "status": jobclient.status_name(job.status),
        "entrypoint": job.entrypoint,
        "message": job.message or "",
        "start_time": _when(job.start_time),
        "end_time": _when(job.end_time),
        "metadata": dict(job.metadata or {}),
    }


def run(ns: argparse.Namespace) -> int:
    client = jobclient.connect(ns.address)
    if ns.action == "list":
        jobs = sorted((_describe(j) for j in client.list_jobs() if j.submission_id),
                      key=lambda j: j["start_time"])
        if ns.json:
            print(json.dumps(jobs))
            return 0
        print(f"{'SUBMISSION ID':<32} {'STATUS':<10} {'STARTED':<19}  ENTRYPOINT")
        for job in jobs:
            entry = job["entrypoint"] if len(job["entrypoint"]) <= 90 else job["entrypoint"][:87] + "..."
            print(f"{job['submission_id']:<32} {job['status']:<10} {job['start_time']:<19}  {entry}")
        return 0
    if not ns.job_id:
        raise ValueError(f"`mvit jobs {ns.action}` needs a submission id (see `mvit jobs list`)")
    if ns.action == "status":
        info = _describe(client.get_job_info(ns.job_id))
        print(json.dumps(info) if ns.json else f"{info['submission_id']}: {info['status']} {info['message']}".strip())
        return 0 if info["status"] != "FAILED" else 1
    if ns.action == "logs":
        if ns.follow:
            status = jobclient.follow(client, ns.job_id)
            return 0 if status == "SUCCEEDED" else 1
        sys.stdout.write(client.get_job_logs(ns.job_id))
        return 0
    stopped = client.stop_job(ns.job_id)
    status = jobclient.wait(client, ns.job_id, timeout_s=60) if stopped else jobclient.status_of(client, ns.job_id)
    print(f"{ns.job_id}: {'stop requested, now ' if stopped else 'already ended: '}{status}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("jobs", help="list, inspect, tail or stop Ray jobs on a cluster",
                       description="Ray jobs of the cluster at --address (default: $RAY_API_SERVER_ADDRESS).")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="submission id (status, logs, stop)")
    p.add_argument("--address", default=None, help="the head's job server, http://HEAD:8265")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends (exit 1 if it fails)")
    p.add_argument("--json", action="store_true", help="list/status: print JSON")
    p.set_defaults(func=run)
    return p
