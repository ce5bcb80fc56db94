"""Multiscale Vision Transformers (MViT v1, MViTv2) for video and images, in pure PyTorch."""

from .config import BlockSpec, MViTConfig
from .heads import ClassificationHead, RoIHead
from .model import MultiScaleAttention, MultiScaleBlock, MViT, PatchEmbed
from .registry import create_model, get_config, list_models

__all__ = [
    "BlockSpec",
    "ClassificationHead",
    "MViT",
    "MViTConfig",
    "MultiScaleAttention",
    "MultiScaleBlock",
    "PatchEmbed",
    "RoIHead",
    "create_model",
    "get_config",
    "list_models",
]
