"""MViT configuration: a few plain fields, and every per-block value derived from them in one place.

The official SlowFast configs spell the per-block values out as list-encoded strides
(``POOL_Q_STRIDE: [[1, 1, 2, 2], ...]``, ``DIM_MUL: [[1, 2.0], ...]``). Every published variant follows
the same rule, so here a variant is described by its stage depths and a handful of switches, and
:meth:`MViTConfig.__post_init__` derives the per-block table (:class:`BlockSpec`) exactly as the
official builder does:

* a new stage starts at every stage boundary: heads double there and Q is pooled with ``q_stride``;
* v1 doubles the width at the *output* of the block before a boundary (in the MLP, the skip goes through
  ``proj``); v2 doubles it *inside* the attention of the boundary block (``qkv`` maps d -> 3 d_out);
* the K/V stride is adaptive: it starts at ``kv_stride`` and is divided by the Q stride at every
  boundary (never below 1), so K/V always pool to the same token grid;
* pooling kernels are ``pool_kernel`` (3x3x3 for most variants) or ``stride + 1`` when it is ``None``;
  a pooling op whose kernel and stride are all 1 is left out, as in the official code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

Size = tuple[int, ...]
HEADS = ("cls", "roi")  # MViTConfig.head


@dataclass(frozen=True)
class BlockSpec:
    """Everything one MultiScaleBlock needs. Derived, never written by hand."""

    dim_in: int
    dim_out: int
    attn_dim: int  # width of q/k/v: dim_out in v2 (width change inside attention), else dim_in
    num_heads: int
    q_stride: Size
    q_kernel: Size | None  # None: Q is not pooled in this block
    kv_stride: Size
    kv_kernel: Size | None  # None: K/V are not pooled in this block
    grid_in: Size  # token grid entering the block at the config's input_size (sizes the v2 rel-pos tables)
    drop_path: float


@dataclass(frozen=True)
class MViTConfig:
    """Fields that describe a variant. ``blocks`` and ``grid`` are derived; don't pass them."""

    version: int = 1  # 1: MViT (abs. pos embed); 2: MViTv2 (rel. pos, residual pooling, width change in attention)
    embed_dim: int = 96
    num_heads: int = 1
    depths: Size = (1, 2, 11, 2)  # blocks per stage
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # Input: (T, H, W) for video, (H, W) for images. Sizes the position embeddings / rel-pos tables; other
    # input sizes the strides divide work too (embeddings are interpolated).
    input_size: Size = (16, 224, 224)
    in_chans: int = 3
    patch_kernel: Size = (3, 7, 7)
    patch_stride: Size = (2, 4, 4)
    patch_padding: Size = (1, 3, 3)
    q_stride: Size = (1, 2, 2)  # Q pooling stride at each stage boundary
    kv_stride: Size = (1, 8, 8)  # initial adaptive K/V pooling stride
    pool_kernel: Size | None = (3, 3, 3)  # None: kernel = stride + 1 (where stride > 1)
    # Pool K/V where the adaptive stride has reached 1 (with a kernel > 1). False reproduces the older
    # SlowFast 16x4 zoo file, whose last stage had no pool_k/pool_v.
    kv_pool_stride1: bool = True
    sep_pos_embed: bool = True  # v1 video: separable spatial/temporal/class position embeddings
    num_classes: int = 400
    # No weight decay on position embeddings / class token / rel-pos tables (see MViT.no_weight_decay).
    # False as in every official config (SlowFast ZERO_DECAY_POS_CLS: False); 1-D parameters are exempt anyway.
    zero_decay_pos_cls: bool = False
    drop_path_rate: float = 0.2
    head_dropout: float = 0.5
    norm_eps: float = 1e-6
    # "cls": the class-token classifier (logits per clip); "roi": the AVA detector, RoIAlign on the last
    # stage's token map (logits per person box, see mvit/detection.py). Same backbone and state-dict keys.
    head: str = "cls"

    # derived
    blocks: tuple[BlockSpec, ...] = field(init=False, repr=False, compare=False)
    grid: Size = field(init=False, repr=False, compare=False)  # token grid after the patch embedding

    def __post_init__(self) -> None:
        nd = len(self.input_size)
        if nd not in (2, 3):
            raise ValueError(f"input_size must be (T, H, W) or (H, W), got {self.input_size}")
        for name in ("patch_kernel", "patch_stride", "patch_padding", "q_stride", "kv_stride"):
            if len(getattr(self, name)) != nd:
                raise ValueError(f"{name}={getattr(self, name)} must have {nd} entries like input_size")
        if self.pool_kernel is not None and len(self.pool_kernel) != nd:
            raise ValueError(f"pool_kernel={self.pool_kernel} must have {nd} entries like input_size")
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {self.version}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "roi" and nd != 3:
            raise ValueError("the RoI head (head='roi') is for video input (T, H, W)")
        if self.version == 2 and nd != 3:
            raise ValueError("MViTv2 relative position embeddings are implemented for video (T, H, W) only")

        depth = sum(self.depths)
        boundaries = set()
        acc = 0
        for d in self.depths[:-1]:
            acc += d
            boundaries.add(acc)

        def kernel_for(stride: Size) -> Size:
            return tuple(self.pool_kernel) if self.pool_kernel is not None else tuple(s + 1 if s > 1 else s for s in stride)

        def width(i: int) -> int:  # width after i boundaries have been crossed (block index i)
            return self.embed_dim * 2 ** sum(1 for b in boundaries if b <= i)

        grid = tuple(s // p for s, p in zip(self.input_size, self.patch_stride))
        object.__setattr__(self, "grid", grid)
        ones = (1,) * nd
        kv = tuple(self.kv_stride)
        heads = self.num_heads
        dim = self.embed_dim
        specs = []
        for i in range(depth):
            boundary = i in boundaries
            if boundary:
                heads *= 2
                kv = tuple(max(k // q, 1) for k, q in zip(kv, self.q_stride))
            q_stride = tuple(self.q_stride) if boundary else ones
            if self.version == 2:
                dim_out = width(i)
                attn_dim = dim_out
                q_pooled = True  # v2 pools Q (stride 1 or not) in every block
            else:
                dim_out = width(i + 1)
                attn_dim = dim
                q_pooled = boundary
            q_kernel = kernel_for(q_stride) if q_pooled else None
            if q_kernel is not None and math.prod(q_kernel) == 1 and math.prod(q_stride) == 1:
                q_kernel = None
            kv_kernel: Size | None = kernel_for(kv)
            if math.prod(kv_kernel) == 1 and math.prod(kv) == 1:
                kv_kernel = None
            if kv == ones and not self.kv_pool_stride1:
                kv_kernel = None
            drop_path = self.drop_path_rate * i / (depth - 1) if depth > 1 else 0.0
            specs.append(
                BlockSpec(
                    dim_in=dim,
                    dim_out=dim_out,
                    attn_dim=attn_dim,
                    num_heads=heads,
                    q_stride=q_stride,
                    q_kernel=q_kernel,
                    kv_stride=kv,
                    kv_kernel=kv_kernel,
                    grid_in=grid,
                    drop_path=drop_path,
                )
            )
            grid = tuple(g // s for g, s in zip(grid, q_stride))
            dim = dim_out
        object.__setattr__(self, "blocks", tuple(specs))

    # --- helpers -------------------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return len(self.input_size) == 3

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def num_features(self) -> int:
        return self.blocks[-1].dim_out

    @property
    def input_multiple(self) -> Size:
        """Input sizes must be multiples of these (patch stride x all Q strides)."""
        total = list(self.patch_stride)
        for b in self.blocks:
            total = [t * s for t, s in zip(total, b.q_stride)]
        return tuple(total)

    def replace(self, **changes: Any) -> MViTConfig:
        valid = {f.name for f in dataclasses.fields(self) if f.init}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise TypeError(f"unknown MViTConfig field(s) {unknown}; valid fields: {sorted(valid)}")
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MViTConfig:
        """Inverse of :meth:`to_dict`; also accepts ``dataclasses.asdict(cfg)``, whose derived fields
        (``blocks``, ``grid``) are recomputed rather than read."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown MViTConfig field(s) {unknown} in checkpoint config")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if fields[k].init})
