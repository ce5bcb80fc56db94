"""Multiscale Vision Transformers (MViT v1, MViTv2) for video and images, in pure PyTorch."""

from .config import BlockSpec, MViTConfig
from .detection import MViTDetector, rois_from_padded
from .heads import ClassificationHead, RoIHead
from .model import MultiScaleAttention, MultiScaleBlock, MViT, PatchEmbed
from .registry import build_model, create_model, get_config, list_models

__all__ = [
    "BlockSpec",
    "ClassificationHead",
    "MViT",
    "MViTConfig",
    "MViTDetector",
    "MultiScaleAttention",
    "MultiScaleBlock",
    "PatchEmbed",
    "RoIHead",
    "build_model",
    "create_model",
    "get_config",
    "list_models",
    "rois_from_padded",
]
