"""`mvit submit --address http://HEAD:8265 [--working-dir .] [--follow] -- <mvit subcommand and args>`:
run an `mvit` stage as a Ray job on a cluster (the client: pipelines/jobclient.py)."""

from __future__ import annotations

import argparse
import sys

from pipelines.jobclient import DEFAULT_PYTHON, connect, follow, job_message, resolve_address, submit_job, tail


def _env_pairs(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item!r} must be KEY=VALUE")
        env[key] = value
    return env


def _mvit_args(command: list[str]) -> list[str]:
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if args and args[0] == "mvit":
        args = args[1:]
    if not args:
        raise ValueError("nothing to run: give the mvit subcommand after `--`, e.g. `mvit submit --address "
                         "http://HEAD:8265 -- train configs/demo.yaml dataset=s3://bucket/dataset`")
    if args[0] in ("submit", "jobs"):
        raise ValueError(f"`mvit {args[0]}` talks to a cluster from outside; it makes no sense as a Ray job")
    return args


def run(ns: argparse.Namespace) -> int:
    args = _mvit_args(ns.command)
    client = connect(ns.address)
    job_id = submit_job(client, args, working_dir=None if ns.no_working_dir else ns.working_dir,
                        extra_env=_env_pairs(ns.env), submission_id=ns.submission_id,
                        entrypoint_num_cpus=ns.entrypoint_num_cpus, python=ns.python)
    address = resolve_address(ns.address)
    print(f"[submit] submitted {job_id} to {address}", file=sys.stderr, flush=True)
    print(job_id, flush=True)
    if not ns.follow:
        print(f"[submit] follow it with: mvit jobs logs {job_id} --address {address} --follow", file=sys.stderr)
        return 0
    status = follow(client, job_id)
    if status == "SUCCEEDED":
        print(f"[submit] job {job_id} SUCCEEDED", file=sys.stderr, flush=True)
        return 0
    logs = client.get_job_logs(job_id)
    print(f"\n[submit] job {job_id} {status}: {job_message(client, job_id)}\n--- last lines of its log ---\n"
          f"{tail(logs)}", file=sys.stderr, flush=True)
    return 1


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "submit",
        help="run an mvit subcommand as a Ray job on a cluster",
        description="Submit `mvit <subcommand> [args]` (everything after `--`) as a Ray job through the head's "
        "job server. The working dir is uploaded; storage and MLflow settings (AWS_*, MLFLOW_*) are forwarded "
        "from this environment. The Ray auth token, if the cluster uses one, comes from RAY_AUTH_TOKEN, "
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. Prints the submission id.",
    )
    p.add_argument("--address", default=None, help="the head's job server, http://HEAD:8265 "
                   "(default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="checkout uploaded as the job's working dir (default: .)")
    p.add_argument("--no-working-dir", action="store_true", help="upload nothing: run the code of the cluster image")
    p.add_argument("--follow", action="store_true", help="stream the job's log; exit non-zero if the job fails")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the job")
    p.add_argument("--submission-id", default=None, help="job id to use (default: generated)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    p.add_argument("--python", default=DEFAULT_PYTHON, help="interpreter on the cluster (default: python)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- <mvit subcommand> [args]")
    p.set_defaults(func=run)
    return p
