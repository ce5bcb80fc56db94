"""Detection as a training task: what the training loop asks of a dataset when it is an AVA one.

The loop (pipelines/train/loop.py) stays one loop for both tasks; where classification and detection
differ it asks the task: the head and its size, the examples in an epoch, the loader, the loss of a
batch, and the per-epoch validation (the optimizer is train.optim's for both). `detection_task(...)` returns None for any other
dataset, and the loop then runs its classification code unchanged.
"""

from __future__ import annotations

import torch

from pipelines.data.clips import ClipConfig
from pipelines.data.shards import DatasetError, Manifest
from pipelines.detection.config import DetectionConfig
from pipelines.detection.data import DetectionBatch, train_loader
from pipelines.detection.keyframes import split_keyframes
from pipelines.detection.loss import action_loss
from pipelines.detection.scoring import evaluation_categories, gather, score_keyframes, validation_map
from pipelines.scoring import precision_context

HEAD = "roi"


def is_detection_dataset(manifest: Manifest) -> bool:
    """An AVA dataset (preprocessing records the format it read in the manifest)."""
    return manifest.config.get("source_format") == "ava"


class DetectionTask:
    head = HEAD  # mvit.create_model(..., head="roi"): the detector

    def __init__(self, dataset: str, manifest: Manifest, clip: ClipConfig, det: DetectionConfig):
        self.dataset, self.manifest, self.clip, self.det = dataset, manifest, clip, det
        self.label_map = manifest.label_map
        self.num_classes = max(self.label_map.values()) + 1  # one output per action id (index = id - 1)
        self.action_ids = sorted(index + 1 for index in self.label_map.values())
        self._check_context()
        self.categories, self.categories_from = evaluation_categories(manifest)

    def _check_context(self) -> None:
        """A clip centred on a keyframe at a chunk's edge must lie inside the chunk: half its span fits the
        context preprocessing kept on both sides (otherwise its frames would be clamped to the cut)."""
        fps = float(self.manifest.config.get("fps") or 0)
        context = float(self.manifest.config.get("ava", {}).get("context_s", 0))
        if not fps:
            return  # stored at each source's own rate: checked nowhere, see the preprocess recipe
        half_span = (self.clip.num_frames * self.clip.sampling_rate // 2) / fps
        if half_span > context + 1e-9:
            raise DatasetError(
                f"clip {self.clip.num_frames}x{self.clip.sampling_rate} at the dataset's {fps:g} fps reaches "
                f"{half_span:.2f} s from its keyframe, beyond the {context:g} s of context the chunks of "
                f"{self.dataset} keep (preprocess.ava.context_s): preprocess with ava.context_s >= {half_span:.2f}")

    def describe(self) -> str:
        return (f"AVA detection: {self.num_classes} action outputs, frame-mAP over {len(self.categories)} classes "
                f"({self.categories_from}), test boxes: {self.det.test_boxes}")

    def train_examples(self) -> int:
        """Training keyframes with groundtruth: the examples of one epoch."""
        return split_keyframes(self.dataset, "train")

    def train_loader(self, urls: list[str], *, batch_size: int, steps_per_epoch: int, shuffle_buffer: int, seed: int,
                     loader_workers: int, start_batch: int = 0):
        return train_loader(urls, self.clip, self.det, num_classes=self.num_classes, batch_size=batch_size,
                            steps_per_epoch=steps_per_epoch, shuffle_buffer=shuffle_buffer, seed=seed,
                            loader_workers=loader_workers, start_batch=start_batch)

    def loss(self, model: torch.nn.Module, batch: DetectionBatch, device: torch.device,
             precision: str) -> tuple[torch.Tensor, list[str]]:
        """The batch's loss (forward included) and its keyframe keys."""
        mask = batch.box_mask.to(device)
        with precision_context(precision, device):
            logits = model(batch.clips.to(device), batch.boxes.to(device), mask)
        return action_loss(logits, batch.labels.to(device)[mask]), batch.keys

    def validate(self, model: torch.nn.Module, urls: list[str], *, device: torch.device, batch_size: int,
                 precision: str) -> dict[str, float]:
        """`val/frame_map` over every rank's share of the val keyframes, against the samples' groundtruth."""
        scored, truth = score_keyframes(model, urls, self.clip, self.det, device=device, batch_size=batch_size,
                                        precision=precision)
        scored, truth = gather(scored), gather(truth)
        if not truth:
            return {}
        result = validation_map(scored, truth, self.categories, self.action_ids)
        return {"val/frame_map": result.mean_ap}


def detection_task(dataset: str, manifest: Manifest, clip: ClipConfig, det: DetectionConfig) -> DetectionTask | None:
    """The detection task for an AVA dataset, None for any other (the loop then classifies)."""
    return DetectionTask(dataset, manifest, clip, det) if is_detection_dataset(manifest) else None
