"""Named variants (docs/reference.md) and ``create_model`` / ``list_models``.

A variant is one row: a name and the few config fields where it differs from MViT-B 16x4.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .config import MViTConfig
from .detection import MViTDetector
from .model import MViT

_B24 = dict(depths=(2, 3, 16, 3), pool_kernel=None, drop_path_rate=0.3)  # Q pooled at 2, 5, 21; kernel s+1

_VARIANTS: dict[str, dict[str, Any]] = {
    # MViT v1, Kinetics (arXiv 2104.11227)
    "mvit_b_16x4": dict(),
    "mvit_b_32x3": dict(input_size=(32, 224, 224)),
    "mvit_b_64x3": dict(input_size=(64, 224, 224)),
    "mvit_b24_32x3": dict(input_size=(32, 224, 224), **_B24),
    # MViT-S (paper Table 3c; no official config or checkpoint was released). Reconstruction: it "operates at a
    # lower spatial resolution and lacks the first high-resolution stage": a 3x8x8 cube, stride 2x8x8, to 128
    # channels (8x28x28 tokens), then 3 stages 128 -> 256 -> 512 of 3, 7 and 6 blocks, K/V pooled to the same
    # 7x7 grid as MViT-B (adaptive K/V stride 1x4x4). Counted: 26,038,032 params (paper 26.1M, -0.2%) and
    # 30.05 fvcore GFLOPs; the paper's 32.9 is 9% higher, presumably counted with another tool - the width /
    # depth / resolution layout is the one that reproduces the parameter count.
    "mvit_s_16x4": dict(
        embed_dim=128,
        depths=(3, 7, 6),
        patch_kernel=(3, 8, 8),
        patch_stride=(2, 8, 8),
        patch_padding=(1, 0, 0),
        kv_stride=(1, 4, 4),
    ),
    # MViT v1 image model, ImageNet-1K: the 2-D analogue of B-16
    "mvit_b16_in1k": dict(
        input_size=(224, 224),
        patch_kernel=(7, 7),
        patch_stride=(4, 4),
        patch_padding=(3, 3),
        q_stride=(2, 2),
        kv_stride=(4, 4),
        pool_kernel=(3, 3),
        sep_pos_embed=False,
        num_classes=1000,
        drop_path_rate=0.1,
        head_dropout=0.0,  # the official IN-1K config (configs/ImageNet/MVIT_B_16_CONV.yaml) has no head dropout
    ),
    # MViTv2 (arXiv 2112.01526)
    "mvitv2_s_16x4": dict(version=2),
    "mvitv2_b_32x3": dict(version=2, input_size=(32, 224, 224), depths=(2, 3, 16, 3), drop_path_rate=0.3),
    # Tiny variants for tests and the demo: 8x32x32 clips -> 4x8x8 tokens, widths 32 -> 64 -> 128.
    "mvit_debug": dict(
        embed_dim=32,
        depths=(1, 2, 1),
        input_size=(8, 32, 32),
        kv_stride=(1, 4, 4),
        num_classes=10,
        drop_path_rate=0.1,
        head_dropout=0.0,
    ),
    # The image variant's 2-D path (joint position embedding, 2-D pooling) at debug size: 32x32 images ->
    # 8x8 tokens, widths 32 -> 64 -> 128 (for tests and the image training path on CPU).
    "mvit_image_debug": dict(
        embed_dim=32,
        depths=(1, 2, 1),
        input_size=(32, 32),
        patch_kernel=(7, 7),
        patch_stride=(4, 4),
        patch_padding=(3, 3),
        q_stride=(2, 2),
        kv_stride=(2, 2),
        pool_kernel=(3, 3),
        sep_pos_embed=False,
        num_classes=10,
        drop_path_rate=0.1,
        head_dropout=0.0,
    ),
    "mvitv2_debug": dict(
        version=2,
        embed_dim=32,
        depths=(1, 2, 1),
        input_size=(8, 32, 32),
        kv_stride=(1, 4, 4),
        num_classes=10,
        drop_path_rate=0.1,
        head_dropout=0.0,
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(_VARIANTS)


def get_config(name: str, **overrides: Any) -> MViTConfig:
    if name not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return MViTConfig().replace(**{**_VARIANTS[name], **overrides})


# Fields that may differ between a named variant and a checkpoint of it: sizes the weights are resampled
# for, the head (re-initialised on request), regularisation, the recipe, and the older zoo layout flag.
_NOT_ARCHITECTURE = {"input_size", "num_classes", "drop_path_rate", "head_dropout", "zero_decay_pos_cls", "kv_pool_stride1",
                     "head"}


def build_model(cfg: MViTConfig) -> nn.Module:
    """The model a config describes: the classifier, or the AVA detector for ``head="roi"``."""
    return MViTDetector(cfg) if cfg.head == "roi" else MViT(cfg)


def _architecture_differences(a: MViTConfig, b: MViTConfig) -> list[str]:
    return [k for k, v in a.to_dict().items() if k not in _NOT_ARCHITECTURE and getattr(b, k) != v]


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike | dict | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a named variant, optionally loading weights.

    ``overrides`` are :class:`MViTConfig` fields (e.g. ``input_size=(T, H, W)``, ``drop_path_rate``).
    ``checkpoint`` is a path (or an already loaded dict) in any layout :mod:`mvit.checkpoint` reads.
    With a checkpoint and ``num_classes=None`` the checkpoint's head size is kept; with a different
    ``num_classes`` the head is re-initialised with a warning. ``head="roi"`` builds the AVA detector
    (:class:`~mvit.detection.MViTDetector`); a classification checkpoint (e.g. Kinetics) then initialises
    its backbone. Without ``head``, our own checkpoints keep the head they were saved with.
    """
    if checkpoint is None:
        cfg = get_config(name, **overrides)
        if num_classes is not None:
            cfg = cfg.replace(num_classes=num_classes)
        return build_model(cfg)

    from . import checkpoint as ckpt_mod

    state, ckpt_cfg, source = ckpt_mod.read_checkpoint(checkpoint)
    base = get_config(name)
    if ckpt_cfg is not None:  # our own format carries its config; the name must describe the same model
        differ = _architecture_differences(base, ckpt_cfg)
        if differ:
            raise ValueError(
                f"checkpoint {source} holds another architecture than {name!r}: "
                + ", ".join(f"{k}={getattr(ckpt_cfg, k)!r} (model: {getattr(base, k)!r})" for k in differ)
            )
        base = ckpt_cfg
    state = ckpt_mod.to_mvit_keys(state, source=source)
    head_classes = ckpt_mod.head_size(state)
    cfg = base.replace(**overrides)
    if ckpt_cfg is None and "kv_pool_stride1" not in overrides and ckpt_mod.is_old_zoo_layout(state, cfg):
        cfg = cfg.replace(kv_pool_stride1=False)  # the older 16x4 zoo file: no stride-1 K/V pooling
    if num_classes is None:
        num_classes = head_classes if head_classes is not None else cfg.num_classes
    cfg = cfg.replace(num_classes=num_classes)
    model = build_model(cfg)
    ckpt_mod.load_state(model, state, source=source)
    return model

