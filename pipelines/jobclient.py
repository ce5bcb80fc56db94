"""The Ray Jobs client used by `mvit submit`, `mvit jobs` and the workflow's cluster mode: the head's
address, token authentication, submitting an `mvit` subcommand as a job, following it to its end.

Submitting runs an `mvit` stage as a Ray job through Ray's `JobSubmissionClient`. The job's runtime env
uploads the working dir (so the cluster runs this checkout's code: the entrypoint is `python -m
pipelines.cli ...`, which imports from the job's working dir first) and carries the storage / tracking
settings named in pipelines/raycluster.py FORWARDED_ENV. Values are never printed, only the names.

Token authentication (local clusters of Ray >= 2.59 turn it on by default): the client sends
`Authorization: Bearer <token>` with every request (`JobSubmissionClient(headers=...)`, which Ray's own
header logic leaves alone when one is given). The token is found where Ray looks for it (RAY_AUTH_TOKEN,
the file named by RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) whatever this process's RAY_AUTH_MODE says:
that variable describes a *local* Ray (the Makefile and the tests set it to `disabled` for the embedded
instance), not the cluster we talk to.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from pipelines.config import redact
from pipelines.provenance import CODE_VERSION_ENV, code_version
from pipelines.raycluster import runtime_env

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Never uploaded with the working dir (Ray also skips what .gitignore lists).
EXCLUDES = [".git", ".venv", ".state", "demo-out", "bench-out", "test-artifacts", "mlruns", "mlartifacts",
            "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache"]
# The stage keeps its own ray.init(runtime_env=...) inside the job; its env vars are the same ones the job
# carries, and Ray refuses to merge equal keys unless told that the driver's may override the job's.
MERGE_ENV = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
DEFAULT_PYTHON = "python"


class ClusterError(RuntimeError):
    """The job server cannot be used (unreachable, refused the token, a job did not end in time)."""


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = os.environ["RAY_ADDRESS"]
    if not address:
        raise ValueError("no Ray job server given: pass --address http://HEAD:8265 (the head's dashboard port) "
                         "or set RAY_API_SERVER_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"--address {address!r} must be the head's dashboard URL, e.g. http://HEAD:8265")
    return address.rstrip("/")


def auth_token() -> str | None:
    """The Ray auth token configured here, looked up in the order Ray's own loader uses (RAY_AUTH_TOKEN, the
    file named by RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token; the first line of a file, trimmed).

    Not through `ray._raylet.AuthenticationTokenLoader`: it caches the token process-wide and from then on
    hands it out whatever the auth mode, so a process that submits jobs *and* runs an embedded Ray with auth
    disabled (the workflow, the tests) would start demanding tokens from its own raylet and hang."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    named = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    if named:
        token = _first_line(Path(named))
        if not token:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH={named} cannot be read or is empty; point it at the token file")
        return token
    return _first_line(Path(os.environ.get("HOME") or "~").expanduser() / ".ray" / "auth_token") or None


def _first_line(path: Path) -> str:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ""
    return lines[0].strip() if lines else ""


def auth_headers() -> dict[str, str]:
    """The Authorization header of Ray's token auth, or {} when no token is configured here."""
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str | None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    try:
        client = JobSubmissionClient(address, headers=auth_headers())
        client.list_jobs()  # the version check is open to everyone; this request proves the token works
    except AuthenticationError as exc:
        raise ClusterError(
            f"the Ray cluster at {address} refused the request ({str(exc).splitlines()[0]}). It uses token "
            "authentication: put its token (`ray get-auth-token` on the head) in RAY_AUTH_TOKEN, in a file "
            "named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token"
        ) from None
    except ConnectionError:
        raise ClusterError(f"no Ray job server answers at {address}: is the head running, and is that its "
                              "dashboard port (default 8265)?") from None
    return client


def entrypoint(mvit_args: list[str], python: str = DEFAULT_PYTHON) -> str:
    """The job's command line, which the Ray dashboard and Jobs API show to anyone: passwords in URIs of
    `key=value` arguments are redacted (the job finds them in the cluster's environment: a `user:***@`
    URI takes its password from MLFLOW_TRACKING_PASSWORD there, see pipelines/tracking.py)."""
    return shlex.join([python, "-m", "pipelines.cli", *map(_redacted_argument, mvit_args)])


def _redacted_argument(arg: str) -> str:
    key, sep, value = arg.partition("=")
    return f"{key}={redact(value)}" if sep else redact(arg)


def job_runtime_env(working_dir: str | None, extra_env: dict[str, str] | None = None) -> dict:
    # The job records the submitting checkout's commit: its working dir is uploaded without .git.
    env = {**runtime_env()["env_vars"], CODE_VERSION_ENV: code_version(), **MERGE_ENV, **(extra_env or {})}
    renv: dict = {"env_vars": env}
    if working_dir:
        path = Path(working_dir).resolve()
        if not (path / "pipelines" / "cli.py").is_file():
            raise ValueError(f"--working-dir {working_dir} is not a checkout of this project (no pipelines/cli.py)")
        renv["working_dir"] = str(path)
        renv["excludes"] = list(EXCLUDES)
    return renv


def submit_job(client, mvit_args: list[str], *, working_dir: str | None = ".", extra_env: dict[str, str] | None = None,
               submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
               metadata: dict[str, str] | None = None, python: str = DEFAULT_PYTHON) -> str:
    renv = job_runtime_env(working_dir, extra_env)
    forwarded = sorted(k for k in renv["env_vars"] if k not in MERGE_ENV and k != CODE_VERSION_ENV)
    print(f"[submit] {entrypoint(mvit_args, python)}  (code {renv['env_vars'][CODE_VERSION_ENV]})", file=sys.stderr,
          flush=True)
    print(f"[submit] env forwarded (names only): {', '.join(forwarded) or 'none'}; working_dir: "
          f"{renv.get('working_dir', 'none (the cluster image code)')}", file=sys.stderr, flush=True)
    return client.submit_job(entrypoint=entrypoint(mvit_args, python), runtime_env=renv, submission_id=submission_id,
                             entrypoint_num_cpus=entrypoint_num_cpus, metadata=metadata or {})


def status_name(status) -> str:
    """A JobStatus (an enum in Ray's client, a plain string in some of its replies) as its name."""
    return str(getattr(status, "value", status))


def status_of(client, job_id: str) -> str:
    return status_name(client.get_job_status(job_id))


def wait(client, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = status_of(client, job_id)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"Ray job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def follow(client, job_id: str, timeout_s: float | None = None, out=None) -> str:
    """Stream the job's log to `out` (stdout) until it ends; return its final status."""
    out = out or sys.stdout

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    started = time.monotonic()
    try:
        asyncio.run(asyncio.wait_for(stream(), timeout=timeout_s))
    except TimeoutError:
        raise ClusterError(f"Ray job {job_id} still running after {timeout_s:.0f}s") from None
    # The log socket closes when the driver exits; the status may take a moment to turn terminal.
    left = None if timeout_s is None else max(timeout_s - (time.monotonic() - started), 10.0)
    return wait(client, job_id, timeout_s=left)


def job_message(client, job_id: str) -> str:
    info = client.get_job_info(job_id)
    return (info.message or "").strip().splitlines()[0] if info.message else ""


def tail(logs: str, lines: int = 40) -> str:
    return "\n".join(logs.rstrip().splitlines()[-lines:])
