"""Node loss on a local multi-node Ray cluster, run as its own process by test_train_multinode.py (a Ray
cluster of its own cannot live in the test process, which holds the session's Ray).

    python tests/integration/multinode_driver.py WORKDIR

Starts `ray.cluster_utils.Cluster`: a head node without CPUs (the driver and Ray Train's controller) and
two worker nodes of one CPU each, so each training worker sits on a node of its own. Then, on a tiny
synthetic set:
  1. fixed:   num_workers=2; once a step checkpoint is committed, one worker node is removed, and a
              new one added a few seconds later (the resources return): the run must finish on 2 workers.
  2. elastic: min_workers=1, num_workers=2; one worker node is removed and none comes back: the run
              must finish on the remaining node, accumulating 2 micro-batches per step.
Prints one JSON line per scenario: {"scenario", "result" (TrainResult), "seconds", "removed_at_step"}.
MLflow: $MLFLOW_TRACKING_URI (the test's server).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

FAST_FAILURE_DETECTION = {  # the GCS notices a removed node in ~1 s instead of ~15 s
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 2,
}
COMMON = [
    "model=mvit_debug", "epochs=2", "batch_size=2", "log_every_steps=1", "checkpoint_every_steps=2",
    "cpus_per_worker=1", "max_failures=3", "system_metrics_interval_s=0", "clip.num_frames=8",
    "clip.sampling_rate=2", "clip.crop_size=32", "clip.train_crop=random", "clip.horizontal_flip=false",
    "optim.lr_batch=4", "optim.warmup_epochs=1",
]


def _latest_checkpoint_step(run_dir: Path) -> int:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return int(latest["checkpoint_dir_name"].removeprefix("checkpoint_step")) if latest else 0


def _scenario(cluster, name: str, dataset: Path, workdir: Path, extra: list[str], replace_node: bool) -> dict:
    from pipelines.config import load_config
    from pipelines.train.config import TrainConfig
    from pipelines.train.job import run as train

    cfg = load_config(TrainConfig, None, [f"dataset={dataset}", f"storage_path={workdir / 'runs'}",
                                          f"run_name={name}", "mlflow.experiment=multinode", *COMMON, *extra])
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = train(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = repr(exc)

    started = time.monotonic()
    job = threading.Thread(target=fit)
    job.start()
    run_dir = workdir / "runs" / name
    while (step := _latest_checkpoint_step(run_dir)) == 0:
        if not job.is_alive() or time.monotonic() - started > 300:
            raise RuntimeError(f"{name}: no checkpoint before the node was to be removed: {outcome}")
        time.sleep(0.1)
    victim = sorted(cluster.worker_nodes, key=lambda node: node.node_id)[-1]
    print(f"[multinode] {name}: removing node {victim.node_id[:8]} after the checkpoint at step {step}", flush=True)
    cluster.remove_node(victim, allow_graceful=False)
    if replace_node:
        time.sleep(5)  # the run must wait for resources, not fail
        cluster.add_node(num_cpus=1)
        print(f"[multinode] {name}: added a node", flush=True)
    job.join(timeout=900)
    if "error" in outcome or job.is_alive():
        raise RuntimeError(f"{name}: training failed: {outcome.get('error', 'still running after 900 s')}")
    return {"scenario": name, "result": asdict(outcome["result"]), "seconds": round(time.monotonic() - started, 1),
            "removed_at_step": step}


def main(workdir: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.config import load_config
    from pipelines.data.synthetic import SyntheticSpec, generate
    from pipelines.preprocess.config import PreprocessConfig
    from pipelines.preprocess.job import run as preprocess
    from pipelines.raycluster import runtime_env
    from pipelines.stack import free_port

    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": free_port(), "include_dashboard": False, "_system_config": FAST_FAILURE_DETECTION,
    })
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, runtime_env=runtime_env(), log_to_driver=True)
        print(f"[multinode] cluster of {len(cluster.worker_nodes)} worker nodes up in "
              f"{time.monotonic() - started:.1f}s", flush=True)
        dataset = workdir / "ds"
        generate(workdir / "videos", SyntheticSpec(classes=4, videos_per_class=8, frames=16, size=48, seed=7))
        preprocess(load_config(PreprocessConfig, None, [
            f"source={workdir}/videos/labels.csv", f"output={dataset}", "short_side=36", "fps=0",
            "max_samples_per_shard=6", "val_fraction=0.25",
        ]))
        fixed = _scenario(cluster, "fixed", dataset, workdir, ["num_workers=2"], replace_node=True)
        print(json.dumps(fixed), flush=True)
        elastic = _scenario(cluster, "elastic", dataset, workdir, ["num_workers=2", "min_workers=1"],
                            replace_node=False)
        print(json.dumps(elastic), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"[multinode] done in {time.monotonic() - started:.1f}s", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
