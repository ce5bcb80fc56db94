"""Typed settings of AVA detection training and testing (`train.detection.*`; stored in every checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field

TEST_BOXES = ("proposals", "groundtruth")


@dataclass
class DetectionConfig:
    """Used when the dataset is an AVA one (its manifest says source_format ava); ignored otherwise."""

    # Training boxes: every groundtruth box, plus each person proposal whose IoU with a groundtruth box is
    # above this (it takes that box's actions), as the AVA recipe trains.
    train_proposal_iou: float = 0.9
    # Testing boxes: the person proposals scoring >= test_score (the paper's protocol), or the groundtruth
    # boxes ("groundtruth": an upper bound that leaves person detection out).
    test_boxes: str = "proposals"
    test_score: float = 0.8
    # Training views: short side uniform in [min, max], then a clip.crop_size square crop (flip: clip.horizontal_flip).
    jitter_scales: list[int] = field(default_factory=lambda: [256, 320])
    box_jitter: float = 0.0  # training: each box edge moves by N(0, box_jitter x the box's size) (0: off)
    # The optimizer (the AVA recipe: SGD, momentum 0.9, Nesterov) is train.optim's, as for classification.

    def validate(self) -> None:
        if self.test_boxes not in TEST_BOXES:
            raise ValueError(f"config key 'detection.test_boxes' must be one of {TEST_BOXES}, got {self.test_boxes!r}")
        if len(self.jitter_scales) != 2 or not 0 < self.jitter_scales[0] <= self.jitter_scales[1]:
            raise ValueError(f"config key 'detection.jitter_scales' must be [min, max] with 0 < min <= max, "
                             f"got {self.jitter_scales}")
        if not 0 <= self.train_proposal_iou <= 1 or not 0 <= self.test_score <= 1:
            raise ValueError("config keys 'detection.train_proposal_iou' and 'detection.test_score' must be in [0, 1]")
