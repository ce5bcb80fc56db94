"""Fast paths that compute only the part of a layer whose result is used: the same values, less work.

mvit.model writes each layer once, as in the papers; mvit.ops holds drop-in replacements for single ops
(faster CPU backward passes) and the fast-path switch. The two paths here skip work inside a layer, so
they are functions of the model's modules (their parameters and submodules), and the model calls each at
one marked place:

* :func:`pooled_qkv_from_kv_windows`, from ``MultiScaleAttention.forward``: the attention's pooled Q, K and
  V, with K and V projected only for the tokens their pooling windows read (:func:`pooling_windows`: 9 of
  every 64 in MViT-B's first block, 9 of 16 in the next two), where the plain computation projects every
  token and pools 3x3 of each 8x8 of them. Taken with :func:`mvit.ops.fast_paths` on (flop counting turns
  it off, to count the full computation as for the reference) and not under ``torch.compile`` (its graph
  keeps the plain projection).
* :func:`class_token_only_block`, from ``MViT.forward`` for the last block: the block's output for the
  class token alone (its K and V still see every token), as only the class token reaches the head. It is
  what ``MViT.forward`` computes, whatever the switch (which still switches the K/V windows inside it);
  ``forward_features`` + ``forward_head`` compute every token. Plain ops: it traces under ``torch.compile``.

Functions of the modules rather than subclasses or hooks: the model's classes stay the only ones (with the
official checkpoints' parameter names), and the K/V windows stay switchable at run time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .ops import depthwise_conv_cl, fast_paths_enabled, heads_linear, split_heads

if TYPE_CHECKING:  # for annotations only: mvit.model imports this module
    from .model import MultiScaleAttention, MultiScaleBlock

Grid = tuple[int, ...]


# --- K and V of only the tokens their pooling windows read ---------------------------------------------------
@dataclass(frozen=True)
class PoolingWindows:
    """The tokens a pooling conv reads, when its windows leave some out: ``index`` into the tokens (class
    token first), their ``grid``, and the stride and padding of the same conv on that grid."""

    index: torch.Tensor
    grid: Grid
    stride: Grid
    padding: Grid


@functools.lru_cache(maxsize=256)
def pooling_windows(
    grid: Grid, kernel: Grid, stride: Grid, padding: Grid, device: torch.device | None = None
) -> PoolingWindows | None:
    """Which tokens a pooling conv reads, or None if it reads them all (``index`` on ``device``, made once).

    MViT pools K and V with 3-wide kernels at strides up to 8 (``[1, 8, 8]`` in the first stage): along such
    an axis each output reads 3 of every 8 positions, so K and V of the other tokens (86% of the first
    stage's) are computed and never used. The windows of an axis with ``kernel <= stride`` don't overlap;
    laid side by side, the positions they read form a grid on which the same conv runs with stride =
    kernel. Its padding stays the same (for padding < kernel): the positions a window reads outside the
    input (zeros) are only at the two ends, the same ones the padding supplied before.
    """
    keep, new_stride = [], []
    for size, k, s, p in zip(grid, kernel, stride, padding):
        if k > s or p >= k:  # overlapping windows read every position; a padding that holds a whole window
            keep.append(list(range(size)))  # or more (never in MViT: padding = kernel // 2) isn't compacted
            new_stride.append(s)
            continue
        out = (size + 2 * p - k) // s + 1
        keep.append([i for o in range(out) for j in range(k) if 0 <= (i := o * s - p + j) < size])
        new_stride.append(k)
    if all(len(kept) == size for kept, size in zip(keep, grid)):
        return None
    # Cached, so made as a plain CPU tensor whatever mode the first call runs under (an inference tensor
    # could not be saved for backward by a later training step's index_select).
    with torch.inference_mode(False):
        flat = torch.zeros((), dtype=torch.long, device="cpu")
        for kept, size in zip(keep, grid):
            flat = flat.unsqueeze(-1) * size + torch.tensor(kept, device="cpu")
        index = torch.cat((torch.zeros(1, dtype=torch.long, device="cpu"), 1 + flat.flatten())).to(device)
    return PoolingWindows(index, tuple(len(kept) for kept in keep), tuple(new_stride), tuple(padding))


def kv_pooling_windows(attn: MultiScaleAttention, grid: Grid) -> PoolingWindows | None:
    """The tokens the attention's K/V pooling reads on ``grid``, where that leaves some out and the fast
    paths are on; None where K and V are computed for every token."""
    pool = attn.pool_k
    if pool is None or not fast_paths_enabled() or torch.compiler.is_compiling():
        return None
    return pooling_windows(grid, pool.kernel_size, pool.stride, pool.padding, pool.weight.device)


def pool_windows(
    x: torch.Tensor, windows: PoolingWindows, conv: nn.Module, norm: nn.Module | None = None
) -> tuple[torch.Tensor, Grid]:
    """``mvit.model.pool_tokens(all tokens, grid, conv, norm)`` from ``x``, the tokens ``windows.index``
    selects: the same depthwise conv with the windows' stride and padding on their grid."""
    lead, c = x.shape[:-2], x.shape[-1]
    cls_tok, g = x.split((1, x.shape[-2] - 1), dim=-2)
    g = depthwise_conv_cl(g.reshape((-1,) + windows.grid + (c,)), conv.weight, windows.stride, windows.padding)
    x = torch.cat((cls_tok, g.reshape(lead + (-1, c))), dim=-2)
    if norm is not None:
        x = norm(x)
    return x, tuple(g.shape[1:-1])


def _project_q(attn: MultiScaleAttention, x: torch.Tensor) -> torch.Tensor:
    """Q of the tokens ``x`` (the first third of the fused qkv projection), ``(B, heads, N, head_dim)``."""
    d, bias = attn.dim_out, attn.qkv.bias
    q = F.linear(x, attn.qkv.weight[:d], None if bias is None else bias[:d])
    return q.reshape(x.shape[0], x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)


def _project_kv(attn: MultiScaleAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the tokens ``x`` (the last two thirds of the fused qkv projection), each ``(B, heads, N, head_dim)``."""
    d, bias = attn.dim_out, attn.qkv.bias
    return split_heads(F.linear(x, attn.qkv.weight[d:], None if bias is None else bias[d:]), 2, attn.num_heads)


def pooled_qkv_from_kv_windows(
    attn: MultiScaleAttention, x: torch.Tensor, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Grid, Grid] | None:
    """``attn.pooled_qkv(x, grid)`` with K and V projected only for the tokens their pooling windows read;
    None where K and V of every token are computed (see :func:`kv_pooling_windows`)."""
    windows = kv_pooling_windows(attn, grid)
    if windows is None:
        return None
    q = _project_q(attn, x)
    k, v = _project_kv(attn, x.index_select(1, windows.index))
    q, q_grid = attn.pool_query(q, grid)
    k, kv_grid = pool_windows(k, windows, attn.pool_k, attn.norm_k)
    v, _ = pool_windows(v, windows, attn.pool_v, attn.norm_v)
    return q, k, v, q_grid, kv_grid


# --- the class token alone ----------------------------------------------------------------------------------
def class_token_attention(attn: MultiScaleAttention, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``attn(x, grid)[0][:, :1]``, the class token's attention output ``(B, 1, dim_out)``, computed alone.

    The class token skips Q pooling (but not norm_q), its rel-pos terms are zero and residual pooling leaves
    it alone: its output needs only its own query against the full (pooled) K and V.
    """
    windows = kv_pooling_windows(attn, grid)
    q = _project_q(attn, x[:, :1])
    k, v = _project_kv(attn, x if windows is None else x.index_select(1, windows.index))
    if attn.pool_q is not None:
        q = attn.norm_q(q)
    if windows is None:
        k, v, _ = attn.pool_keys_values(k, v, grid)
    else:
        k, _ = pool_windows(k, windows, attn.pool_k, attn.norm_k)
        v, _ = pool_windows(v, windows, attn.pool_v, attn.norm_v)
    out = F.scaled_dot_product_attention(q, k, v)
    out = heads_linear(out, attn.proj.weight, attn.proj.bias)
    # Q pooling and the rel-pos tables only act on the other queries: their gradient is zero, as in the full
    # computation. Keep them in the graph with that zero gradient, so that DDP (which expects every parameter
    # to get a gradient) works without find_unused_parameters.
    unused = [p for p in (attn.pool_q.weight if attn.pool_q is not None else None,
                          *(getattr(attn, f"rel_pos_{a}", None) for a in "hwt")) if p is not None]
    if unused and torch.is_grad_enabled():
        out = out + 0.0 * sum(p.sum() for p in unused)
    return out


def class_token_only_block(block: MultiScaleBlock, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``block(x, grid)[0][:, :1]``, the block's output for the class token ``(B, 1, dim_out)``, computed
    alone: MultiScaleBlock.forward for one token, whose skip is not pooled (pooling passes the class token
    through) and whose attention is :func:`class_token_attention`."""
    x_norm = block.norm1(x)
    x_attn = class_token_attention(block.attn, x_norm, grid)
    x, x_norm = x[:, :1], x_norm[:, :1]
    if block.proj is not None and block.width_in_attn:
        x = block.proj(x_norm)
    x = x + block.drop_path(x_attn)
    x_norm = block.norm2(x)
    x_mlp = block.mlp(x_norm)
    if block.proj is not None and not block.width_in_attn:
        x = block.proj(x_norm)
    return x + block.drop_path(x_mlp)
