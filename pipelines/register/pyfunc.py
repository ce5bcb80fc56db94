"""The MLflow pyfunc model: a DataFrame with a `video` column (path or s3:// URI) -> top-5 labels/scores."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

TOP_K = 5


class MViTVideoClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from pipelines.evaluate.job import model_from_checkpoint

        state = torch.load(context.artifacts["checkpoint"], map_location="cpu", weights_only=True)
        self.model, train_cfg = model_from_checkpoint(state)
        self.clip = train_cfg.clip
        self.views = int(state.get("temporal_views", 1))
        self.labels = [name for name, _ in sorted(state["label_map"].items(), key=lambda kv: kv[1])]

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
