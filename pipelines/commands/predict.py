"""`mvit predict MODEL_URI VIDEO...`: classify video files with a registered model (MLflow pyfunc).

MODEL_URI is anything `mlflow.pyfunc.load_model` takes, e.g. `models:/mvit-demo@champion`; videos are
local paths or s3:// URIs. Prints one JSON line per video with the top-5 labels and scores.
"""

from __future__ import annotations

import argparse
import json

from pipelines import tracking


def predict(model_uri: str, videos: list[str], tracking_uri: str = "") -> list[dict]:
    import mlflow
    import pandas as pd

    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_server(uri)
    with tracking.fluent(uri):
        model = mlflow.pyfunc.load_model(model_uri)
    out = model.predict(pd.DataFrame({"video": videos}))
    return [
        {"video": video, "label": row["label"], "top5_labels": list(row["top5_labels"]),
         "top5_scores": [round(float(s), 6) for s in row["top5_scores"]]}
        for video, (_, row) in zip(videos, out.iterrows())
    ]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="classify video files with a registered model",
                       description=__doc__.splitlines()[0])
    p.add_argument("model_uri", help="e.g. models:/mvit-demo@champion or runs:/<run id>/model")
    p.add_argument("videos", nargs="+", help="video files (local paths or s3:// URIs)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    for result in predict(args.model_uri, args.videos, args.tracking_uri):
        print(json.dumps(result), flush=True)
    return 0
