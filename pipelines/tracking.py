"""MLflow tracking for every stage, behind a small protocol: the training driver opens (or re-opens) the
run, rank 0 logs to it; evaluate and register log into the same run.

One MLflow run per training job: its id is stored next to the checkpoints (`<run dir>/mlflow_run_id`), so
a restarted worker group, or a rerun of the same command, keeps logging into the same run.

Clients are passed around, never installed globally: MLflow's fluent API (log_model, register_model,
pyfunc.load_model), which only reads the process-wide tracking URI, runs inside `fluent(uri)`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipelines.config import REDACTED, flatten, split_credentials, to_yaml
from pipelines.data import storage

# With no tracking URI configured or exported, runs go to a SQLite store under the directory the command
# runs in, made absolute on the driver (Ray workers run elsewhere) so that every stage and rank agrees.
LOCAL_STORE_DIR = Path(".state") / "mlflow"


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else the local store ./.state/mlflow/mlflow.db
    experiment: str = "mvit"
    artifact_location: str = ""  # for a new experiment only ("" = the server's default)


class TrackingError(RuntimeError):
    pass


def default_local_uri() -> str:
    """The local store used when nothing is configured: `sqlite:////<cwd>/.state/mlflow/mlflow.db`."""
    return f"sqlite:///{(LOCAL_STORE_DIR / 'mlflow.db').absolute()}"


def resolve_uri(configured: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_local_uri()


def _local_store_dir(uri: str) -> Path | None:
    """The folder of a SQLite store (`sqlite:////abs/dir/mlflow.db` -> /abs/dir), else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    return None


# MLflow's own settings for authenticating to a tracking server (read by its REST client at each request).
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
CREDENTIAL_ENV = (USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV)


def connect(configured: str = "") -> str:
    """Set this process up to talk to the tracking server, and return its URI *without credentials*: the
    one to print, store in results and hand to MLflow clients.

    The server is `configured` (a config's mlflow.tracking_uri), else $MLFLOW_TRACKING_URI, else the local
    store (`default_local_uri`). Credentials written into a URI (`http://user:password@host:5000`) are moved into
    MLflow's own mechanism, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in this process's
    environment (they win over values already there): urllib cannot open such a URI, and MLflow's errors
    would print it. $MLFLOW_TRACKING_URI itself is rewritten without them, so child processes and Ray
    runtime envs never see them. A URI without credentials (e.g. one read back from a stage result) uses
    whatever MLflow finds: those variables, ~/.mlflow/credentials or MLFLOW_TRACKING_TOKEN.
    An http(s) server is checked at once (`check_server`)."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if from_env:
        os.environ["MLFLOW_TRACKING_URI"] = adopt_credentials(from_env)
    uri = adopt_credentials(resolve_uri(configured))
    check_server(uri)
    return uri


def adopt_credentials(uri: str) -> str:
    """`uri` without `user:password@`; those move into MLflow's variables of this process's environment."""
    clean, user, password = split_credentials(uri)
    if user:
        os.environ[USERNAME_ENV] = user
    if password and password != REDACTED:  # a URI read back from a redacted record carries no password
        os.environ[PASSWORD_ENV] = password
    return clean


def credentials() -> dict[str, str]:
    """The MLflow credentials of this process's environment, for processes that did not inherit it (Ray
    workers started earlier or elsewhere): passed in memory, never in a runtime env (the Ray dashboard
    shows those in plain text)."""
    return {name: os.environ[name] for name in CREDENTIAL_ENV if os.environ.get(name)}


def use_credentials(creds: dict[str, str]) -> None:
    """In a worker: authenticate as the driver does (see `credentials`)."""
    os.environ.update({name: value for name, value in creds.items() if name in CREDENTIAL_ENV})


def _auth_header() -> dict[str, str]:
    """The Authorization header MLflow's REST client would send (same sources, same precedence)."""
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    if creds.username and creds.password:
        token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if os.environ.get(TOKEN_ENV):
        return {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}
    return {}


def _get(url: str, timeout: float, headers: dict[str, str]) -> int:
    """HTTP status of GET `url`; raises OSError/URLError when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with a message saying what to do, where MLflow's client would retry for minutes:
    the server must answer /health, and accept this process's credentials (a search of one experiment;
    /health itself needs none). `uri` carries no credentials (see `connect`), so messages can name it."""
    if not uri.startswith(("http://", "https://")):
        return
    base = uri.rstrip("/")
    try:
        status = _get(base + "/health", timeout, {})
        if status == 200:
            status = _get(base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout, _auth_header())
            if status in (401, 403):
                raise TrackingError(_refused(uri, status))
            return  # any other answer is the server's own business, reported by MLflow's client
        problem = f"HTTP {status}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise TrackingError(
        f"the MLflow tracking server at {uri} does not answer ({problem}); start one (`mvit stack up`) "
        "or set mlflow.tracking_uri / MLFLOW_TRACKING_URI to a server that runs"
    )


def _refused(uri: str, status: int) -> str:
    user = os.environ.get(USERNAME_ENV)
    who = f"the credentials of user {user!r}" if user else "requests without credentials"
    return (f"the MLflow tracking server at {uri} refused {who} (HTTP {status}); set {USERNAME_ENV} and "
            f"{PASSWORD_ENV} (or {TOKEN_ENV}), or put user:password@ in the tracking URI")


def client(uri: str):
    import mlflow

    store = _local_store_dir(uri)
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
    return mlflow.MlflowClient(uri)


@contextlib.contextmanager
def fluent(uri: str) -> Iterator[None]:
    """MLflow's fluent API (which reads only the process-wide tracking URI) pointed at `uri` for the
    duration of the block, then back to what it was."""
    # MLflow's own scoped setter (not exported; pinned in constraints.txt) restores the previous value even
    # when that was "unset", which the public get/set pair cannot express. Its setter also writes (and on
    # restore deletes) $MLFLOW_TRACKING_URI, which every later stage of this process reads: put it back.
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    exported = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported


def ensure_experiment(mlflow_client, mlflow_cfg) -> str:
    found = mlflow_client.get_experiment_by_name(mlflow_cfg.experiment)
    if found is not None:
        return found.experiment_id
    location = mlflow_cfg.artifact_location or None
    store = _local_store_dir(mlflow_client.tracking_uri)
    if location is None and store is not None:
        # next to the SQLite file (MLflow's default, ./mlruns, would land wherever the command runs)
        location = (store / "artifacts").as_uri()
    return mlflow_client.create_experiment(mlflow_cfg.experiment, artifact_location=location)


def open_run(cfg, manifest, run_dir: str, uri: str) -> str:
    """Create the job's run on the server at `uri` (see `connect`), or return the one an earlier attempt of
    the same job created."""
    import mlflow

    mlflow_client = client(uri)
    id_uri = storage.join(run_dir, "mlflow_run_id")
    if storage.exists(id_uri):
        run_id = storage.read_bytes(id_uri).decode().strip()
        try:
            mlflow_client.get_run(run_id)
            mlflow_client.set_terminated(run_id, status="RUNNING")
            print(f"[train] resuming MLflow run {run_id}", flush=True)
            return run_id
        except mlflow.exceptions.MlflowException:
            print(f"[train] MLflow run {run_id} from {id_uri} is gone; starting a new run", flush=True)
    experiment_id = ensure_experiment(mlflow_client, cfg.mlflow)
    run = mlflow_client.create_run(
        experiment_id,
        run_name=cfg.resolved_run_name(),
        tags={"mvit.stage": "train", "mvit.dataset": cfg.dataset, "mvit.dataset_digest": manifest.digest()},
    )
    run_id = run.info.run_id
    params = flatten(cfg)
    keys = sorted(params)
    for start in range(0, len(keys), 100):  # log_batch takes at most 100 params per call
        chunk = keys[start : start + 100]
        mlflow_client.log_batch(run_id, params=[mlflow.entities.Param(k, params[k][:6000]) for k in chunk])
    log_config(mlflow_client, run_id, "train", cfg)
    _log_dataset(mlflow_client, run_id, cfg.dataset, manifest)
    storage.write_bytes(id_uri, run_id.encode())
    return run_id


def log_config(mlflow_client, run_id: str, stage: str, cfg) -> None:
    """The stage's effective config as `config/<stage>_config.yaml` in the run (it holds no credentials:
    those come from the environment, never from config)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{stage}_config.yaml"
        path.write_text(to_yaml(cfg))
        mlflow_client.log_artifact(run_id, str(path), artifact_path="config")


def _log_dataset(mlflow_client, run_id: str, prefix: str, manifest) -> None:
    """Dataset lineage: the shard table (url, split, counts, sha256) as the run's training input."""
    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    table = pd.DataFrame([vars(s) for s in manifest.shards]).astype({"num_samples": "float64", "bytes": "float64"})
    dataset = mlflow.data.from_pandas(table, source=prefix, name=f"shards-{manifest.digest()}")
    tags = [InputTag("mlflow.data.context", "training"), InputTag("manifest_digest", manifest.digest())]
    mlflow_client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


@dataclass(frozen=True)
class Attempt:
    """One start of a training job's worker group: the first, or a restart from a checkpoint."""

    world_size: int
    accumulation: str  # micro-batches each rank accumulates per optimizer step ("2", or "1-2" when uneven)
    global_batch: int  # clips per optimizer step (always the recipe's)
    batch_plan: str  # e.g. "3 workers x 1-2 micro-batches of 8 = global batch 32"
    from_step: int  # the step it starts after (0: from scratch)
    from_epoch: int | None = None  # the epoch of the checkpoint it resumed from (None: from scratch)
    steps_redone: int = 0  # steps an earlier attempt had logged after that checkpoint, trained again

    def describe(self) -> str:
        start = "from scratch" if self.from_epoch is None else f"from the checkpoint at step {self.from_step}"
        return f"{self.batch_plan}, {start}" + (f", {self.steps_redone} steps redone" if self.steps_redone else "")


def evaluation_tags(split: str, dataset_digest: str, views: str) -> dict[str, str]:
    """The run tags that say what the run's latest `eval/<split>/*` metrics were measured on (logged by
    `mvit evaluate` with them; `mvit register` compares models only when these agree)."""
    return {f"mvit.eval.{split}.dataset_digest": dataset_digest,
            f"mvit.eval.{split}.views": views}  # "<temporal>x<spatial>"


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int, tags: dict[str, str] | None = None) -> None: ...
    def log_metrics_once(self, metrics: dict[str, float], step: int) -> None: ...
    def last_step(self, key: str) -> int: ...
    def mark_resumed(self, epoch: int) -> None: ...
    def start_attempt(self, attempt: Attempt) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...


class NullTracker:
    """What ranks other than 0 get: side effects happen on rank 0 only."""

    def log_metrics(self, metrics: dict[str, float], step: int, tags: dict[str, str] | None = None) -> None:
        pass

    def log_metrics_once(self, metrics: dict[str, float], step: int) -> None:
        pass

    def last_step(self, key: str) -> int:
        return 0

    def mark_resumed(self, epoch: int) -> None:
        pass

    def start_attempt(self, attempt: Attempt) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass


class MlflowTracker:
    def __init__(self, uri: str, run_id: str):
        self.client = client(uri)
        self.uri = uri
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int, tags: dict[str, str] | None = None) -> None:
        """`metrics` at `step`, and `tags` in the same request."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, tags=[RunTag(k, v) for k, v in (tags or {}).items()])

    def log_metrics_once(self, metrics: dict[str, float], step: int) -> None:
        """Log unless the run already holds these metrics at `step` (a restart redoing an epoch)."""
        if metrics and not any(s == step for s, _ in self.history(next(iter(metrics)))):
            self.log_metrics(metrics, step)

    def mark_resumed(self, epoch: int) -> None:
        """Tags that tell, in the MLflow UI, that this run went on from a checkpoint after a failure."""
        restarts = int(self.client.get_run(self.run_id).data.tags.get("mvit.restarts", 0)) + 1
        self.client.set_tag(self.run_id, "mvit.restarts", str(restarts))
        self.client.set_tag(self.run_id, "mvit.resumed_from_epoch", str(epoch))

    def start_attempt(self, attempt: Attempt) -> None:
        """Tags for each start of the worker group (`mvit.attempt.N`, the world sizes so far, and for a
        restart `mvit.restarts`, `mvit.resumed_from_step`, `mvit.steps_redone`), so the run's page tells
        every restart and world-size change."""
        tags = self.client.get_run(self.run_id).data.tags
        number = sum(1 for key in tags if key.startswith("mvit.attempt.")) + 1
        sizes = [s for s in tags.get("mvit.world_sizes", "").split(",") if s] + [str(attempt.world_size)]
        updates = {f"mvit.attempt.{number}": attempt.describe(), "mvit.world_size": str(attempt.world_size),
                   "mvit.world_sizes": ",".join(sizes), "mvit.accumulation": attempt.accumulation,
                   "mvit.global_batch": str(attempt.global_batch)}
        if attempt.from_epoch is not None:
            self.mark_resumed(attempt.from_epoch)
            updates |= {"mvit.resumed_from_step": str(attempt.from_step), "mvit.steps_redone": str(attempt.steps_redone)}
        for key, value in updates.items():
            self.client.set_tag(self.run_id, key, value)

    def last_step(self, key: str) -> int:
        """The highest step at which the run holds `key` (0: none)."""
        return max((s for s, _ in self.history(key)), default=0)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path=artifact_path)

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str, interval_s: float) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network; GPU when present) of this machine logged into
    `run_id` every `interval_s` seconds for the duration of the block (nothing when `interval_s` <= 0).
    A restarted worker group continues the run's sample count rather than starting again at 0."""
    if interval_s <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
