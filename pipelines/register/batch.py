"""Batch scoring with a registered model: videos (files, a folder or s3:// prefix, or a CSV listing them)
-> a predictions table (key, video, label, top-5 labels and scores, error), on Ray Data.

Each Ray Data actor loads the model once (`mlflow.pyfunc.load_model`) and streams its videos through it
(pipelines/register/pyfunc.py); one actor by default, `workers` for more. A video that cannot be read or
decoded gets its `error` and no labels; the others are scored.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import PurePosixPath

import pandas as pd

from pipelines import tracking
from pipelines.data import storage
from pipelines.raycluster import RayConfig, ensure_ray

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")
CSV_COLUMNS = ("video", "path")  # the column of a CSV that names the videos (the first one present)
COLUMNS = ["key", "video", "label", "top5_labels", "top5_scores", "error"]


def _schema():
    import pyarrow as pa

    return pa.schema([("order", pa.int64()), ("key", pa.string()), ("video", pa.string()), ("label", pa.string()),
                      ("top5_labels", pa.list_(pa.string())), ("top5_scores", pa.list_(pa.float64())),
                      ("error", pa.string())])


def list_videos(inputs: list[str]) -> list[dict[str, str]]:
    """[{"key", "video"}] for every input: a video file (key: as given), a folder or s3:// prefix (every
    video under it; key: its relative path) or a .csv with a `video` or `path` column (relative entries
    are under the CSV's folder; key: the entry)."""
    rows: list[dict[str, str]] = []
    for item in inputs:
        found = _from_csv(item) if item.lower().endswith(".csv") else _from_location(item)
        if not found:
            raise FileNotFoundError(f"{item} names no video: give video files ({', '.join(VIDEO_SUFFIXES)}), a folder "
                                    "or s3:// prefix holding some, or a CSV with a video/path column")
        rows += found
    return rows


def _from_location(item: str) -> list[dict[str, str]]:
    if item.lower().endswith(VIDEO_SUFFIXES) and storage.exists(item):
        return [{"key": item, "video": storage.absolute(item)}]
    prefix = storage.absolute(item).rstrip("/")
    return [{"key": uri[len(prefix) + 1:], "video": uri} for uri, _ in storage.list_files(prefix)
            if uri.lower().endswith(VIDEO_SUFFIXES)]


def _from_csv(item: str) -> list[dict[str, str]]:
    if not storage.exists(item):
        raise FileNotFoundError(f"CSV {item} does not exist")
    reader = csv.DictReader(io.StringIO(storage.read_bytes(item).decode()))
    column = next((c for c in CSV_COLUMNS if c in (reader.fieldnames or [])), None)
    if column is None:
        raise ValueError(f"CSV {item} needs a column named {' or '.join(CSV_COLUMNS)}; it has {reader.fieldnames}")
    folder = str(PurePosixPath(storage.absolute(item)).parent) if not storage.is_s3(item) else item.rsplit("/", 1)[0]
    rows = []
    for record in reader:
        entry = (record[column] or "").strip()
        if entry:
            absolute = storage.is_s3(entry) or entry.startswith("/")
            rows.append({"key": entry, "video": entry if absolute else storage.join(folder, entry)})
    return rows


class VideoScorer:
    """A Ray Data actor: the model loaded once, then batches of {key, video} rows -> predictions."""

    def __init__(self, model_uri: str, tracking_uri: str, credentials: dict[str, str]):
        import mlflow

        tracking.use_credentials(credentials)  # passed in memory: the actor may not share the driver's env
        with tracking.fluent(tracking_uri):
            self.classifier = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()

    def __call__(self, batch: pd.DataFrame):
        import pyarrow as pa

        from pipelines.data.video import VideoError

        out = []
        for video in batch["video"]:
            try:
                out.append({**self.classifier.classify(str(video)), "error": ""})
            except (VideoError, OSError) as exc:  # this video's fault (or gone): record it, score the others
                out.append({"label": "", "top5_labels": [], "top5_scores": [], "error": f"{type(exc).__name__}: {exc}"})
        rows = pd.concat([batch.reset_index(drop=True), pd.DataFrame(out)], axis=1)
        # Typed, so that a batch of failures alone (empty lists) has the same schema as the others.
        return pa.Table.from_pandas(rows, schema=_schema(), preserve_index=False)


def predict_table(model_uri: str, inputs: list[str], *, tracking_uri: str = "", workers: int = 1, batch_size: int = 4,
                  ray_config: RayConfig | None = None) -> pd.DataFrame:
    """The predictions of `model_uri` (e.g. models:/NAME@champion) for every video of `inputs`, in input
    order: columns COLUMNS (top5_* are lists)."""
    import ray.data

    uri = tracking.connect(tracking_uri)
    rows = [{"order": i, **row} for i, row in enumerate(list_videos(inputs))]
    ensure_ray(ray_config or RayConfig())
    scored = ray.data.from_items(rows).map_batches(
        VideoScorer, fn_constructor_args=(model_uri, uri, tracking.credentials()), batch_size=batch_size,
        batch_format="pandas", concurrency=workers, num_cpus=1,
    )
    records = sorted(scored.take_all(), key=lambda row: row["order"])
    return pd.DataFrame([{name: list(row[name]) if name.startswith("top5") else row[name] for name in COLUMNS}
                         for row in records], columns=COLUMNS)


def write_table(table: pd.DataFrame, output: str) -> None:
    """The table as Parquet (`.parquet`: list columns kept) or CSV (top-5 lists as JSON), local or s3://."""
    buffer = io.BytesIO()
    if output.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _schema()
        pq.write_table(pa.Table.from_pylist(table.to_dict("records"), schema=schema.remove(schema.get_field_index("order"))),
                       buffer)
    elif output.endswith(".csv"):
        flat = table.assign(**{name: table[name].map(json.dumps) for name in ("top5_labels", "top5_scores")})
        flat.to_csv(buffer, index=False)
    else:
        raise ValueError(f"--output {output}: name a .parquet or .csv file")
    storage.write_bytes(storage.absolute(output), buffer.getvalue())
