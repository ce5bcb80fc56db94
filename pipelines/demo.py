"""`make demo`: the workflow of configs/demo.yaml on its synthetic motion set (videos -> shards -> 2-worker
DDP training -> evaluation -> registry), all local (embedded Ray, local files, a SQLite MLflow store under
the work dir), then the registered model, loaded back from the registry as a user would, names held-out
videos. Ends with one JSON line."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from pipelines.commands.predict import predict
from pipelines.config import print_effective
from pipelines.data.synthetic import SyntheticSpec, generate
from pipelines.workflow.config import load_workflow_config
from pipelines.workflow.runner import latest_results, run_workflow

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def demo_overrides(workdir: Path, fast: bool) -> list[str]:
    """Where the demo's workflow keeps everything: one folder, with its own MLflow store."""
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    overrides = [f"workflow.state_dir={workdir}", f"workflow.raw_dir={workdir / 'videos'}",
                 f"workflow.dataset={workdir / 'dataset'}", f"workflow.storage_path={workdir / 'runs'}"]
    for stage in ("train", "evaluate", "register"):
        overrides += [f"{stage}.mlflow.tracking_uri={tracking_uri}",
                      f"{stage}.mlflow.artifact_location={workdir / 'mlartifacts'}"]
    if fast:
        overrides += ["workflow.synthetic.videos_per_class=30", "train.epochs=3"]
    return overrides


def heldout_check(model_uri: str, tracking_uri: str, workdir: Path, classes: int) -> tuple[int, int]:
    """(correct, total) of the registered model on videos it never saw (another seed)."""
    heldout = generate(workdir / "heldout", SyntheticSpec(classes=classes, videos_per_class=2, seed=1000))
    with heldout.open(newline="") as handle:
        truth = {str(heldout.parent / row["path"]): row["label"] for row in csv.DictReader(handle)}
    predictions = predict(model_uri, sorted(truth), tracking_uri)
    return sum(p["label"] == truth[p["video"]] for p in predictions), len(truth)


def run_demo(workdir: Path, fast: bool = False) -> dict:
    workdir = workdir.absolute()
    started = time.monotonic()
    cfg = load_workflow_config(RECIPE, demo_overrides(workdir, fast))
    print_effective("workflow", cfg.settings)
    summary = run_workflow(cfg, config_path=str(RECIPE))

    tracking_uri = cfg.register.mlflow.tracking_uri
    alias_uri = f"models:/{cfg.register.model_name}@{cfg.register.alias}"
    correct, total = heldout_check(alias_uri, tracking_uri, workdir, cfg.settings.synthetic.classes)
    print(f"[demo] {alias_uri} named {correct}/{total} held-out videos correctly", flush=True)
    print(f"\nMLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
          "  then open http://127.0.0.1:5000", flush=True)
    results = latest_results(cfg.settings)
    evaluation, dataset = results["evaluation"], results["dataset"]
    return {
        "val_top1": round(evaluation["top1"], 4),
        "val_top5": round(evaluation["top5"], 4),
        "val_videos": evaluation["videos"],
        "num_samples": dataset["num_samples"],
        "mlflow_run_id": summary["mlflow_run_id"],
        "model_uri": summary["model_uri"],
        "champion_uri": alias_uri,
        "tracking_uri": tracking_uri,
        "heldout_correct": correct,
        "heldout_videos": total,
        "seconds": round(time.monotonic() - started, 1),
    }
