"""The MLflow pyfunc model: a DataFrame with a `video` column (path or s3:// URI) -> top-5 labels/scores."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

TOP_K = 5


class MViTVideoClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipelines.artifact import TrainedModel, read_local

        state = read_local(context.artifacts["checkpoint"])
        trained = TrainedModel.from_state(state)
        self.model, self.clip, self.labels = trained.model, trained.clip, trained.labels
        self.views = int(state.get("temporal_views", 1))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        from pipelines.data import storage
        from pipelines.data.clips import eval_views

        if "video" not in model_input.columns:
            raise ValueError(f"input needs a 'video' column of paths or URIs; got columns {list(model_input.columns)}")
        rows = []
        for video in model_input["video"]:
            if not storage.exists(str(video)):
                raise FileNotFoundError(f"video {video} does not exist")
            clips = eval_views(storage.read_bytes(str(video)), self.clip, self.views)
            with torch.no_grad():
                probs = self.model(clips).softmax(-1).mean(0)
            scores, index = probs.topk(min(TOP_K, len(self.labels)))
            labels = [self.labels[i] for i in index.tolist()]
            rows.append({"label": labels[0], "top5_labels": labels, "top5_scores": [float(s) for s in scores]})
        return pd.DataFrame(rows)
