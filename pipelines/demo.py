"""`make demo`: synthetic videos -> shards -> 2-worker DDP training -> evaluation -> registry, all local
(embedded Ray, local files, a SQLite MLflow store), ending with one JSON line."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from pipelines.commands.predict import predict
from pipelines.config import load_config, print_effective
from pipelines.data.synthetic import SyntheticSpec, generate
from pipelines.evaluate.job import EvaluateConfig
from pipelines.evaluate.job import run as evaluate
from pipelines.preprocess.job import PreprocessConfig
from pipelines.preprocess.job import run as preprocess
from pipelines.register.job import RegisterConfig
from pipelines.register.job import run as register
from pipelines.train.config import TrainConfig
from pipelines.train.job import run as train

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def run_demo(workdir: Path, fast: bool = False) -> dict:
    workdir = workdir.absolute()
    started = time.monotonic()
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow_keys = [f"mlflow.tracking_uri={tracking_uri}", f"mlflow.artifact_location={workdir / 'mlartifacts'}"]
    spec = SyntheticSpec(classes=8, videos_per_class=30 if fast else 100, seed=0)
    videos = workdir / "videos"
    if not (videos / "labels.csv").exists():
        generate(videos, spec)

    pre_cfg = load_config(PreprocessConfig, RECIPE, [f"source={videos / 'labels.csv'}", f"output={workdir / 'dataset'}"],
                          section="preprocess")
    print_effective("preprocess", pre_cfg)
    manifest = preprocess(pre_cfg)

    train_overrides = [f"dataset={pre_cfg.output}", f"storage_path={workdir / 'runs'}", *mlflow_keys]
    if fast:
        train_overrides.append("epochs=3")
    train_cfg = load_config(TrainConfig, RECIPE, train_overrides, section="train")
    print_effective("train", train_cfg)
    trained = train(train_cfg)

    eval_cfg = load_config(EvaluateConfig, RECIPE, [f"dataset={pre_cfg.output}", f"checkpoint={trained.checkpoint}",
                                                     f"mlflow_run_id={trained.mlflow_run_id}", *mlflow_keys],
                           section="evaluate")
    print_effective("evaluate", eval_cfg)
    report = evaluate(eval_cfg)

    reg_cfg = load_config(RegisterConfig, RECIPE, [f"checkpoint={trained.checkpoint}", f"dataset={pre_cfg.output}",
                                                   f"mlflow_run_id={trained.mlflow_run_id}", "model_name=mvit-demo",
                                                   f"temporal_views={eval_cfg.temporal_views}", *mlflow_keys],
                          section="register")
    registered = register(reg_cfg)

    # Videos the model never saw (another seed): the registered model, loaded back from the registry the
    # way a user would, must name their classes.
    heldout = generate(workdir / "heldout", SyntheticSpec(classes=spec.classes, videos_per_class=2, seed=1000))
    with heldout.open(newline="") as handle:
        truth = {str(heldout.parent / row["path"]): row["label"] for row in csv.DictReader(handle)}
    predictions = predict(registered["alias_uri"], sorted(truth), tracking_uri)
    heldout_correct = sum(p["label"] == truth[p["video"]] for p in predictions)
    print(f"[demo] {registered['alias_uri']} named {heldout_correct}/{len(truth)} held-out videos correctly", flush=True)

    print(f"\nMLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
          "  then open http://127.0.0.1:5000", flush=True)
    return {
        "val_top1": round(report["top1"], 4),
        "val_top5": round(report["top5"], 4),
        "val_videos": report["videos"],
        "num_samples": manifest.num_samples,
        "mlflow_run_id": trained.mlflow_run_id,
        "model_uri": registered["model_uri"],
        "champion_uri": registered["alias_uri"],
        "tracking_uri": tracking_uri,
        "heldout_correct": heldout_correct,
        "heldout_videos": len(truth),
        "seconds": round(time.monotonic() - started, 1),
    }
