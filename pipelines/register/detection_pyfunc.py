"""The MLflow pyfunc model of an AVA detector: a video, a keyframe time and optional person boxes -> the
boxes with their action scores.

Input DataFrame, one row per keyframe:
  video      path or s3:// URI of a video (a movie, a clip: any length)
  timestamp  the keyframe, in seconds from the start of that video
  boxes      optional: person boxes "[[x1, y1, x2, y2], ...]" normalised to [0, 1] (from a person detector, as
             the recipe tests on detector boxes); missing, None or empty: one box over the whole frame
Output DataFrame, one row per (input row, box): `row` (the input row's position), `video`, `timestamp`,
`box`, `top5_labels` / `top5_scores` (highest first) and `scores` (every action's sigmoid score, by
ascending action id). The registered model's signature takes `boxes` as a JSON string; the Python
model also takes lists.

The clip is cut as in training and evaluation: the video is decoded around the keyframe, resampled to
the frame rate the model was trained at (the dataset's stored fps, kept in the serving checkpoint), and
`num_frames` frames every `sampling_rate` frames centred on the keyframe are taken (clamped to the video);
the whole frame is resized to the test scale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

TOP_K = 5


def is_detector(state: dict[str, Any]) -> bool:
    """A checkpoint of the AVA detector (config head "roi")."""
    return (state.get("config") or {}).get("head") == "roi"


def keyframe_clip(data: bytes, timestamp: float, *, num_frames: int, sampling_rate: int, fps: float) -> np.ndarray:
    """(num_frames, H, W, 3) uint8: the clip centred on `timestamp` (seconds) of a video, at `fps`
    (0: the video's own rate), decoding only the seconds around it."""
    from pipelines.data.video import VideoError, decode, resample_fps
    from pipelines.detection.data import clip_frames

    rate = fps
    if not rate:
        rate = decode(data, max_frames=1).fps
    half = (num_frames * sampling_rate // 2 + 1) / rate
    try:
        decoded = decode(data, start_s=max(0.0, timestamp - half), end_s=timestamp + half + 1.0 / rate)
    except VideoError as exc:
        raise ValueError(f"no frames around {timestamp} s ({exc}); is the timestamp inside the video?") from None
    frames = resample_fps(decoded.frames, decoded.times, rate)
    keyframe = min(len(frames) - 1, max(0, round((timestamp - float(decoded.times[0])) * rate)))
    return frames[clip_frames(keyframe, len(frames), num_frames, sampling_rate)]


def _boxes(value: Any) -> np.ndarray:
    """A row's `boxes` cell (JSON string, list, or missing: None / NaN / "" / empty) -> (K, 4) float64 (returned as given); missing
    is one box over the whole frame. (pandas turns a None next to strings into NaN.)"""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else None
    if value is None or (isinstance(value, float) and np.isnan(value)) or len(value) == 0:
        return np.asarray([[0.0, 0.0, 1.0, 1.0]])
    return np.asarray([list(b) for b in value], dtype=np.float64)


class MViTActionDetector(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipelines.artifact import TrainedModel, read_local

        state = read_local(context.artifacts["checkpoint"])
        trained = TrainedModel.from_state(state)
        self.model, self.clip = trained.model, trained.clip
        self.actions = {index: name for name, index in trained.label_map.items()}
        self.fps = float(state.get("fps") or 0)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        from pipelines.data import storage
        from pipelines.detection.boxes import eval_view, normalise

        missing = {"video", "timestamp"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input needs columns 'video' and 'timestamp' (seconds), and optionally 'boxes'; "
                             f"missing {sorted(missing)}")
        rows = []
        for position, (_, item) in enumerate(model_input.iterrows()):
            video, timestamp = str(item["video"]), float(item["timestamp"])
            if not storage.exists(video):
                raise FileNotFoundError(f"video {video} does not exist")
            boxes = _boxes(item.get("boxes") if "boxes" in model_input.columns else None)
            if (boxes.ndim != 2 or boxes.shape[1] != 4 or (boxes < 0).any() or (boxes > 1).any()
                    or (boxes[:, 2:] < boxes[:, :2]).any()):
                raise ValueError(f"row {position}: boxes must be [[x1, y1, x2, y2], ...] normalised to [0, 1] "
                                 f"with x1 <= x2 and y1 <= y2, got {boxes.tolist()}")
            frames = keyframe_clip(storage.read_bytes(video), timestamp, num_frames=self.clip.num_frames,
                                   sampling_rate=self.clip.sampling_rate, fps=self.fps)
            view, pixel_boxes = eval_view(frames, torch.from_numpy(boxes), short_side=self.clip.test_short_side,
                                          stride=self.model.feature_stride)
            with torch.no_grad():
                scores = self.model(normalise(view, self.clip.mean, self.clip.std, self.clip.channel_order)[None], pixel_boxes[None]).sigmoid()
            for box, row in zip(boxes.tolist(), scores.tolist()):
                order = sorted((i for i in self.actions), key=lambda i: -row[i])[:TOP_K]
                rows.append({"row": position, "video": video, "timestamp": timestamp, "box": box,
                             "top5_labels": [self.actions[i] for i in order],
                             "top5_scores": [row[i] for i in order],
                             "scores": [row[i] for i in sorted(self.actions)]})
        return pd.DataFrame(rows)


def example_and_fps(dataset: str, directory: Path) -> tuple[pd.DataFrame, float]:
    """An input example from the dataset's first val (else train) keyframe: its chunk written as a video
    file, the keyframe's time in that file and its groundtruth boxes; and the dataset's stored fps."""
    from pipelines.data.shards import MEDIA_KEY, read_manifest, read_samples, sample_metadata

    manifest = read_manifest(dataset)
    split = "val" if manifest.shard_urls(dataset, "val") else "train"
    for sample in read_samples(manifest.shard_urls(dataset, split)):
        meta = sample_metadata(sample)
        keyframe = next((k for k in meta.get("extra", {}).get("keyframes", ()) if k["boxes"]), None)
        if keyframe is None:
            continue
        path = directory / f"{sample['__key__']}.mp4"
        path.write_bytes(sample[MEDIA_KEY])
        fps = float(meta["fps"])
        example = pd.DataFrame({"video": [str(path)], "timestamp": [keyframe["frame"] / fps],
                                "boxes": [json.dumps(keyframe["boxes"])]})
        return example, fps
    raise ValueError(f"{dataset} has no keyframe with boxes to use as an example")
