"""`mvit predict MODEL_URI INPUT...`: classify videos with a registered model (MLflow pyfunc) on Ray Data.

MODEL_URI is anything `mlflow.pyfunc.load_model` takes, e.g. `models:/mvit-demo@champion`. Each INPUT is a
video file, a folder or s3:// prefix (every video under it), or a CSV with a `video` (or `path`) column.
With --output the predictions table (key, video, label, top5_labels, top5_scores, error) is written as
Parquet or CSV and a summary line printed; without it, one JSON line per video.
"""

from __future__ import annotations

import argparse
import json

from pipelines.raycluster import RayConfig


def predict(model_uri: str, videos: list[str], tracking_uri: str = "") -> list[dict]:
    """One dict per video (video, label, top5_labels, top5_scores, error), in input order."""
    from pipelines.register.batch import predict_table

    table = predict_table(model_uri, videos, tracking_uri=tracking_uri)
    return [
        {"video": row.video, "label": row.label, "top5_labels": list(row.top5_labels),
         "top5_scores": [round(float(s), 6) for s in row.top5_scores], **({"error": row.error} if row.error else {})}
        for row in table.itertuples()
    ]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="classify videos with a registered model (batch, on Ray Data)",
                       description=__doc__.splitlines()[0])
    p.add_argument("model_uri", help="e.g. models:/mvit-demo@champion or runs:/<run id>/model")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, folders / s3:// prefixes of videos, or CSVs with a video (or path) column")
    p.add_argument("--output", default="", help="write the predictions table here (.parquet or .csv, local or s3://)")
    p.add_argument("--workers", type=int, default=1, help="model replicas (Ray Data actors, 1 CPU each; default 1)")
    p.add_argument("--batch-size", type=int, default=4, help="videos per batch handed to an actor")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--ray-address", default="", help="a Ray cluster (auto, ray://...); default: an embedded Ray")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.register.batch import predict_table, write_table

    table = predict_table(args.model_uri, args.inputs, tracking_uri=args.tracking_uri, workers=args.workers,
                          batch_size=args.batch_size, ray_config=RayConfig(address=args.ray_address))
    errors = int((table["error"] != "").sum())
    if args.output:
        write_table(table, args.output)
        print(json.dumps({"output": args.output, "videos": len(table), "errors": errors}), flush=True)
    else:
        for row in table.to_dict("records"):
            row["top5_scores"] = [round(float(s), 6) for s in row["top5_scores"]]
            print(json.dumps(row), flush=True)
    return 1 if errors == len(table) else 0
