"""Multiscale Vision Transformers (MViT v1 and MViTv2), video and image: the papers' math, written once.

(~430 lines: the five layers below are one architecture, read top to bottom as the papers present it.)

What lives where: this file holds the layers (PatchEmbed, token pooling, MultiScaleAttention,
MultiScaleBlock, MViT), each computing every token as in the papers. mvit.ops holds drop-in ops with faster
CPU backward passes (``mlp``, ``heads_linear``, ``depthwise_conv_cl``) and the fast-path switch;
mvit.fast holds the two paths that compute only the part of a layer whose result is used (K and V of the
tokens their pooling windows read; the last block's class token alone). The model calls into mvit.fast
at two marked places: ``MultiScaleAttention.forward`` and ``MViT.forward``.

Parameter names follow the official SlowFast layout (``blocks.i.attn.qkv``, ``pool_q``, ``norm_q``,
``rel_pos_h``, ``head.projection`` ...), so official checkpoints load with no renaming; see checkpoint.py
for the other layouts.

Tokens are ``(B, 1 + L, C)`` with the class token first and ``L = prod(grid)``; ``grid`` is the (T, H, W)
(or (H, W)) token grid, carried alongside as a tuple of Python ints so that the blocks stay free of
data-dependent control flow (``torch.compile`` traces them without graph breaks).

Where this differs from the reference code, it computes the same function faster:
* attention goes through ``F.scaled_dot_product_attention`` (a fused kernel: the attention matrix is not
  kept for backward); MViTv2's decomposed relative position terms become its additive ``attn_mask``;
* pooling runs on a channels-last view of the tokens, so the ``permute(...).contiguous()`` round trips
  of the reference are gone (the conv / max-pool kernels take channels-last input directly);
* the fast paths of mvit.ops and mvit.fast (see there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import BlockSpec, MViTConfig
from .fast import class_token_only_block, pooled_qkv_from_kv_windows
from .heads import ClassificationHead
from .ops import depthwise_conv_cl, heads_linear, mlp, split_heads

Grid = tuple[int, ...]


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (one op that does not store the GELU output for backward; see mvit.ops.mlp)."""

    def __init__(self, dim: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class PatchEmbed(nn.Module):
    """Conv3d (video) or Conv2d (image) patchify: ``(B, 3, *size) -> (B, L, C)`` plus the token grid."""

    def __init__(self, in_chans: int, dim: int, kernel: Grid, stride: Grid, padding: Grid) -> None:
        super().__init__()
        conv = nn.Conv3d if len(kernel) == 3 else nn.Conv2d
        self.proj = conv(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self.proj(x)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid


def pool_tokens(
    x: torch.Tensor, grid: Grid, pool: nn.Module, norm: nn.Module | None = None
) -> tuple[torch.Tensor, Grid]:
    """Pool ``x`` of shape ``(B, [heads,] 1 + L, C)`` over its token grid; the class token skips the pool.

    The grid tokens are viewed channels-last (``(B', C, *grid)`` with C fastest), which conv and max-pool
    accept without a layout copy; the result is viewed back to tokens the same way.
    """
    lead = x.shape[:-2]
    c = x.shape[-1]
    # One split rather than two slices: its backward concatenates the two gradients in one pass, where each
    # slice's backward would write its part into a zero-filled tensor of the full size, then add the two.
    cls_tok, g = x.split((1, x.shape[-2] - 1), dim=-2)
    g = g.reshape((-1,) + grid + (c,))
    if isinstance(pool, (nn.Conv2d, nn.Conv3d)):  # depthwise pooling conv
        g = depthwise_conv_cl(g, pool.weight, pool.stride, pool.padding)
    else:
        g = pool(g.movedim(-1, 1)).movedim(1, -1)
    new_grid = tuple(g.shape[1:-1])
    x = torch.cat((cls_tok, g.reshape(lead + (-1, c))), dim=-2)
    if norm is not None:
        x = norm(x)
    return x, new_grid


def _rel_pos_table(table: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """Relative position embeddings ``(q_size, k_size, C)`` for one axis (as in MViTv2).

    When Q and K have different lengths, distances are measured on the finer grid; the table is
    linearly interpolated when the input size differs from the one it was trained at.
    """
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    qi = torch.arange(q_size, device=table.device)[:, None] * q_ratio
    ki = torch.arange(k_size, device=table.device)[None, :] * k_ratio
    dist = qi - ki + (k_size - 1) * k_ratio
    return table[dist.long()]


class MultiScaleAttention(nn.Module):
    """Pooling attention: qkv -> heads -> pool q, k, v (+ norm) -> [v2: rel-pos bias] -> attention
    -> [v2: residual pooling] -> proj. Q's pooling stride sets the output token grid; K/V pooling reduces
    the keys and values each query attends to."""

    def __init__(self, spec: BlockSpec, *, qkv_bias: bool, version: int, norm_eps: float) -> None:
        super().__init__()
        dim, dim_out, heads = spec.dim_in, spec.attn_dim, spec.num_heads
        if dim_out % heads:
            raise ValueError(f"attention width {dim_out} is not divisible by {heads} heads")
        self.num_heads = heads
        self.head_dim = hd = dim_out // heads
        self.dim_out = dim_out
        self.qkv = nn.Linear(dim, 3 * dim_out, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)
        conv = nn.Conv3d if len(spec.q_stride) == 3 else nn.Conv2d

        def pool(kernel, stride):
            if kernel is None:
                return None, None
            pad = [k // 2 for k in kernel]
            layer = conv(hd, hd, kernel, stride=stride, padding=pad, groups=hd, bias=False)
            return layer, nn.LayerNorm(hd, eps=norm_eps)

        self.pool_q, self.norm_q = pool(spec.q_kernel, spec.q_stride)
        self.pool_k, self.norm_k = pool(spec.kv_kernel, spec.kv_stride)
        self.pool_v, self.norm_v = pool(spec.kv_kernel, spec.kv_stride)

        self.rel_pos = version == 2
        self.residual_pooling = version == 2
        if self.rel_pos:
            # Table sizes as in the official code: from the block's input grid and its strides.
            size = max(spec.grid_in[1:])
            q_size = size // spec.q_stride[1]
            kv_size = size // spec.kv_stride[1]
            sp = 2 * max(q_size, kv_size) - 1
            self.rel_pos_h = nn.Parameter(torch.zeros(sp, hd))
            self.rel_pos_w = nn.Parameter(torch.zeros(sp, hd))
            self.rel_pos_t = nn.Parameter(torch.zeros(2 * spec.grid_in[0] - 1, hd))

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        """Attention output ``(B, 1 + L', dim_out)`` and the grid of its ``L'`` tokens (Q's pooled grid)."""
        # Fast path: where K/V pooling reads only some tokens, mvit.fast computes the same pooled q, k, v
        # with K and V of only those tokens (None where it doesn't apply, e.g. with the fast paths off).
        pooled = pooled_qkv_from_kv_windows(self, x, grid)
        q, k, v, q_grid, kv_grid = pooled if pooled is not None else self.pooled_qkv(x, grid)
        mask = self.rel_pos_bias(q, q_grid, kv_grid) if self.rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale head_dim ** -0.5
        if self.residual_pooling:
            # MViTv2 residual pooling: add the pooled q to every token's output except the class token's.
            out = out + F.pad(q[:, :, 1:], (0, 0, 1, 0))
        # proj(out.transpose(1, 2).reshape(b, n, dim_out)), without storing that copy for backward
        return heads_linear(out, self.proj.weight, self.proj.bias), q_grid

    def pooled_qkv(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Grid, Grid]:
        """qkv -> heads -> pooled (and normalised) q, k, v, each ``(B, heads, 1 + L', head_dim)``, with the
        grids of q and of k, v."""
        q, k, v = split_heads(self.qkv(x), 3, self.num_heads)
        if self.pool_q is None:
            # A copy of q lets the fused qkv output be freed (k and v are pooled copies): attention keeps
            # its inputs for backward, and a view would keep all of qkv alive.
            q = q.contiguous()
        q, q_grid = self.pool_query(q, grid)
        k, v, kv_grid = self.pool_keys_values(k, v, grid)
        return q, k, v, q_grid, kv_grid

    def pool_query(self, q: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        """Q pooled (and normalised) over the token grid where this block pools it, and its grid."""
        if self.pool_q is None:
            return q, grid
        return pool_tokens(q, grid, self.pool_q, self.norm_q)

    def pool_keys_values(self, k: torch.Tensor, v: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, Grid]:
        """K and V pooled (and normalised) over the token grid where this block pools them, and their grid."""
        if self.pool_k is None:
            return k, v, grid
        k, kv_grid = pool_tokens(k, grid, self.pool_k, self.norm_k)
        v, _ = pool_tokens(v, grid, self.pool_v, self.norm_v)
        return k, v, kv_grid

    def rel_pos_bias(self, q: torch.Tensor, q_grid: Grid, k_grid: Grid) -> torch.Tensor:
        """Decomposed relative position terms as an additive mask ``(B, heads, Nq, Nk)``.

        Computed from the (unscaled) pooled q, exactly like the official ``cal_rel_pos_spatial`` /
        ``cal_rel_pos_temporal``; zero on the class token's row and column.
        """
        qt, qh, qw = q_grid
        kt, kh, kw = k_grid
        rh = _rel_pos_table(self.rel_pos_h, qh, kh).to(q.dtype)
        rw = _rel_pos_table(self.rel_pos_w, qw, kw).to(q.dtype)
        rt = _rel_pos_table(self.rel_pos_t, qt, kt).to(q.dtype)
        b, n, _, c = q.shape
        r_q = q[:, :, 1:].reshape(b, n, qt, qh, qw, c)
        rel_h = torch.einsum("bnthwc,hkc->bnthwk", r_q, rh)
        rel_w = torch.einsum("bnthwc,wkc->bnthwk", r_q, rw)
        rel_t = torch.einsum("bnthwc,tkc->bnthwk", r_q, rt)
        bias = (
            rel_h[:, :, :, :, :, None, :, None]
            + rel_w[:, :, :, :, :, None, None, :]
            + rel_t[:, :, :, :, :, :, None, None]
        ).reshape(b, n, qt * qh * qw, kt * kh * kw)
        return F.pad(bias, (1, 0, 1, 0))


class MultiScaleBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``. The attention's skip is max-pooled
    where Q is strided; where the width changes, the skip goes through ``proj`` (of ``norm1(x)`` where MViTv2
    widens in the attention, of ``norm2(x)`` where MViT v1 widens in the MLP)."""

    def __init__(self, spec: BlockSpec, *, mlp_ratio: float, qkv_bias: bool, version: int, norm_eps: float) -> None:
        super().__init__()
        self.dim_in, self.dim_out = spec.dim_in, spec.dim_out
        self.width_in_attn = spec.attn_dim != spec.dim_in  # v2: width changes inside the attention
        self.norm1 = nn.LayerNorm(spec.dim_in, eps=norm_eps)
        self.attn = MultiScaleAttention(spec, qkv_bias=qkv_bias, version=version, norm_eps=norm_eps)
        self.drop_path = DropPath(spec.drop_path)
        self.norm2 = nn.LayerNorm(spec.attn_dim, eps=norm_eps)
        self.mlp = Mlp(spec.attn_dim, int(spec.attn_dim * mlp_ratio), spec.dim_out)
        self.proj = nn.Linear(spec.dim_in, spec.dim_out) if spec.dim_in != spec.dim_out else None
        if math.prod(spec.q_stride) > 1:
            kernel = [s + 1 if s > 1 else s for s in spec.q_stride]
            pool = nn.MaxPool3d if len(kernel) == 3 else nn.MaxPool2d
            self.pool_skip = pool(kernel, spec.q_stride, [k // 2 for k in kernel])
        else:
            self.pool_skip = None

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        x_norm = self.norm1(x)
        x_attn, new_grid = self.attn(x_norm, grid)
        if self.proj is not None and self.width_in_attn:
            x = self.proj(x_norm)
        if self.pool_skip is not None:
            x, _ = pool_tokens(x, grid, self.pool_skip)
        x = x + self.drop_path(x_attn)
        x_norm = self.norm2(x)
        x_mlp = self.mlp(x_norm)
        if self.proj is not None and not self.width_in_attn:
            x = self.proj(x_norm)
        return x + self.drop_path(x_mlp), new_grid


class MViT(nn.Module):
    """MViT / MViTv2 for video ``(B, 3, T, H, W)`` or images ``(B, 3, H, W)``; returns logits."""

    def __init__(self, cfg: MViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.num_features
        self.grad_checkpointing = False
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.in_chans, dim, cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = cfg.grid
        self.use_abs_pos = cfg.version == 1
        self.sep_pos_embed = self.use_abs_pos and cfg.is_video and cfg.sep_pos_embed
        if self.sep_pos_embed:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, math.prod(grid[1:]), dim))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, grid[0], dim))
            self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, dim))
        elif self.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(grid), dim))
        self.blocks = nn.ModuleList(
            MultiScaleBlock(s, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, version=cfg.version, norm_eps=cfg.norm_eps)
            for s in cfg.blocks
        )
        self.norm = nn.LayerNorm(self.num_features, eps=cfg.norm_eps)
        self.head = ClassificationHead(self.num_features, cfg.num_classes, cfg.head_dropout)
        self.init_weights()

    # --- init ---------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """The official initialisation: truncated normal (std 0.02) for weights and embeddings."""
        for name, p in self.named_parameters():
            if name.endswith(("cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class", "pos_embed")):
                nn.init.trunc_normal_(p, std=0.02)
            elif "rel_pos_" in name:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.02)  # sic: SlowFast initialises biases to 0.02
            elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.02)

    # --- timm-like API --------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters to exempt from weight decay besides 1-D ones (norms, biases).

        Empty unless ``cfg.zero_decay_pos_cls``: the official recipes decay embeddings and rel-pos tables.
        """
        if not self.cfg.zero_decay_pos_cls:
            return set()
        return {n for n, _ in self.named_parameters() if "pos_embed" in n or "cls_token" in n or "rel_pos" in n}

    def check_input(self, x: torch.Tensor) -> None:
        nd = len(self.cfg.input_size)
        want = "(B, 3, T, H, W)" if nd == 3 else "(B, 3, H, W)"
        if x.ndim != nd + 2:
            raise ValueError(f"expected a {nd + 2}-D input {want}, got shape {tuple(x.shape)}")
        if x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected {self.cfg.in_chans} input channels {want}, got shape {tuple(x.shape)}")
        mult = self.cfg.input_multiple
        size = tuple(x.shape[2:])
        if any(s % m or s == 0 for s, m in zip(size, mult)):
            names = ("T", "H", "W") if nd == 3 else ("H", "W")
            rule = ", ".join(f"{n} a multiple of {m}" for n, m in zip(names, mult))
            example = "x".join(str(s) for s in self.cfg.input_size)
            raise ValueError(
                f"input size {'x'.join(map(str, size))} is not supported by this model: the patch and pooling "
                f"strides need {rule} (e.g. {example})"
            )

    def _pos_embed(self, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute position embeddings ``(1, 1, C)`` for the class token and ``(1, L, C)`` for ``grid``.

        Interpolated when ``grid`` is not the one the embeddings were sized for.
        """
        ref = self.cfg.grid
        c = self.cls_token.shape[-1]
        if self.sep_pos_embed:
            # Interpolating the spatial (bilinear) and temporal (linear) parts separately equals the
            # official trilinear interpolation of their sum: the weights along each axis sum to 1.
            sp, tp = self.pos_embed_spatial, self.pos_embed_temporal
            if grid[1:] != ref[1:]:
                sp = sp.reshape(1, ref[1], ref[2], c).permute(0, 3, 1, 2)
                sp = F.interpolate(sp, size=grid[1:], mode="bilinear", align_corners=False)
                sp = sp.flatten(2).transpose(1, 2)
            if grid[0] != ref[0]:
                tp = F.interpolate(tp.transpose(1, 2), size=grid[0], mode="linear", align_corners=False).transpose(1, 2)
            return self.pos_embed_class, (tp[:, :, None, :] + sp[:, None, :, :]).reshape(1, -1, c)
        cls_pos, pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if grid != ref:
            pos = pos.reshape((1,) + ref + (c,)).movedim(-1, 1)
            mode = "trilinear" if len(grid) == 3 else "bilinear"
            pos = F.interpolate(pos, size=grid, mode=mode, align_corners=False).flatten(2).transpose(1, 2)
        return cls_pos, pos

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """Patch tokens with position embeddings and the class token first, ``(B, 1 + L, C)``, and their grid."""
        self.check_input(x)
        x, grid = self.patch_embed(x)
        cls_tok = self.cls_token
        if self.use_abs_pos:
            # The class position embedding is added to the class token before the concatenation (the same
            # sums as adding one concatenated embedding afterwards): the gradients of these [1, 1, C]
            # parameters are then reductions over the batch, contiguous, instead of strided slices of the
            # concatenation's gradient, which DDP warns about ("Grad strides do not match bucket view").
            cls_pos, pos = self._pos_embed(grid)
            cls_tok = cls_tok + cls_pos
            x = x + pos
        return torch.cat((cls_tok.expand(x.shape[0], -1, -1), x), dim=1), grid

    def _run(self, fn, *args):
        """``fn(*args)``; with gradient checkpointing, its activations are recomputed in backward instead of stored."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """Blocks' output before the final norm: tokens ``(B, 1 + L, C)`` and the final token grid."""
        x, grid = self.embed(x)
        for blk in self.blocks:
            x, grid = self._run(blk, x, grid)
        return x, grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``(B, 1 + L, C)``, class token first."""
        return self.norm(self.forward_tokens(x)[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``, those of ``forward_head(forward_features(x))``.

        Flop counts (``mvit flops``) are of that full computation, as for the reference implementations.
        """
        x, grid = self.embed(x)
        for blk in self.blocks[:-1]:
            x, grid = self._run(blk, x, grid)
        # Fast path: only the class token of the last block reaches the head, so mvit.fast computes that
        # block's output for the class token alone (its K and V still see every token): ~4% less work.
        x = self._run(class_token_only_block, self.blocks[-1], x, grid)
        return self.forward_head(self.norm(x))
