"""The MLflow pyfunc model: a DataFrame with a string column `video` (a path or s3:// URI) -> per video the
top-1 `label`, `top5_labels` and `top5_scores` (softmax averaged over the temporal views).

A video is streamed, never decoded whole: its frames are put on the training clips' frame rate, the
views chosen, and only their frames decoded at the test resolution (pipelines/data/clips.py
`video_views`), so a long 1080p60 video costs the memory of a few small clips.
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

TOP_K = 5
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "video")]),
    outputs=Schema([ColSpec("string", "label"), ColSpec(Array("string"), "top5_labels"),
                    ColSpec(Array("double"), "top5_scores")]),
)


class MViTVideoClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipelines.artifact import TrainedModel, read_local

        state = read_local(context.artifacts["checkpoint"])
        trained = TrainedModel.from_state(state)
        self.model, self.clip, self.labels = trained.model, trained.clip, trained.labels
        self.views = int(state.get("temporal_views") or 0) or None  # None: the recipe's
        self.fps, self.stored_short_side = trained.lineage.fps, trained.lineage.short_side

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if "video" not in model_input.columns:
            raise ValueError(f"input needs a 'video' column of paths or URIs; got columns {list(model_input.columns)}")
        return pd.DataFrame([self.classify(str(video)) for video in model_input["video"]])

    def classify(self, video: str) -> dict:
        """Top-5 of one video (a local path or s3:// URI); FileNotFoundError / VideoError when unusable."""
        import torch

        from pipelines.data import storage
        from pipelines.data.clips import video_views

        if not storage.exists(video):
            raise FileNotFoundError(f"video {video} does not exist")
        with storage.open_seekable(video) as source:
            clips = video_views(source, self.clip, self.views, self.fps, self.stored_short_side)
        with torch.no_grad():
            probs = self.model(clips).softmax(-1).mean(0)
        scores, index = probs.topk(min(TOP_K, len(self.labels)))
        labels = [self.labels[i] for i in index.tolist()]
        return {"label": labels[0], "top5_labels": labels, "top5_scores": [float(s) for s in scores]}
