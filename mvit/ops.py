"""Drop-in ops with fast paths for CPU training, each numerically equivalent to the plain ops it replaces,
and :func:`fast_paths`, the one switch of the fast paths (these, and mvit.fast's K/V windows).

PyTorch has no fused kernels for these patterns on CPU, so they are written here as small autograd
functions; each one's forward is the ordinary op, and only what is kept for backward (or how the
backward is computed) changes.

* :func:`depthwise_conv_cl`: the depthwise pooling convolution on a channels-last grid. The forward is the
  ordinary (oneDNN) convolution; the weight gradient is written out tap by tap (one strided multiply-add
  and reduction per kernel offset), which is several times faster on CPU than oneDNN's depthwise
  weight-gradient kernel, and keeps everything channels-last (no permute copies as in the reference).
* :func:`mlp`: ``fc2(gelu(fc1(x)))`` keeping only ``fc1(x)`` for backward (``gelu`` is recomputed there):
  the MLP's hidden activations are 4x the token width and are otherwise stored twice (GELU's input and
  fc2's input). Saves ~20% of the training activation memory of MViT-B at the price of one GELU. It runs
  in chunks of tokens, so that each hidden chunk stays in cache and its buffer is reused.
* :func:`heads_linear`: the attention output projection applied to ``(B, heads, N, d)`` directly. The
  plain ``proj(out.transpose(1, 2).reshape(B, N, C))`` stores that transposed copy for its weight
  gradient although SDPA already stores ``out``; here the copy is transient and rebuilt in backward.

All of them fall back to the plain ops when no gradient is needed, under autocast, under
``torch.compile`` (inductor generates its own kernels) and when :func:`fast_paths` is switched off (the
tests compare both), so inference, tracing and flop counting see ordinary aten ops.

:func:`fast_paths` also switches mvit.fast's projection of K and V for only the tokens their pooling
windows read (plain ops, so it is on in inference as well), which flop counting turns off to count the
full computation. It does not switch mvit.fast's class-token-only last block: that is what ``MViT.forward``
computes, while ``forward_features`` + ``forward_head`` compute every token.

:func:`split_heads` is the model's plain head split, here next to its inverse (``_merge_heads``) because
its layout is chosen for the backward pass.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_FAST = True


@contextlib.contextmanager
def fast_paths(enabled: bool) -> Iterator[None]:
    """Switch the fast paths on or off within a ``with`` block: the custom backward paths here and mvit.fast's
    K/V of only the tokens their pooling windows read (for tests, debugging and flop counts)."""
    global _FAST
    old, _FAST = _FAST, enabled
    try:
        yield
    finally:
        _FAST = old


def fast_paths_enabled() -> bool:
    """Whether the fast paths are on (see :func:`fast_paths`)."""
    return _FAST


def _use_fast(*tensors: torch.Tensor) -> bool:
    return (
        _FAST
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and tensors[0].device.type == "cpu"
        and not torch.compiler.is_compiling()
        # Their backward would run outside the forward's autocast (bf16 activations against fp32 weights):
        # under autocast the plain ops, whose backward autocast handles, are used instead.
        and not torch.is_autocast_enabled("cpu")
    )


# --- depthwise pooling convolution -------------------------------------------------------------------
def _conv(x_cf: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    conv = F.conv3d if weight.ndim == 5 else F.conv2d
    return conv(x_cf, weight, None, stride, padding, 1, weight.shape[0])


def _tap_slices(size: int, out: int, k: int, s: int, p: int):
    """Per kernel offset d along one axis: (output slice, input slice) of the positions it touches."""
    res = []
    for d in range(k):
        o0 = max(0, math.ceil((p - d) / s))
        o1 = min(out - 1, (size - 1 - d + p) // s)
        if o1 < o0:
            res.append(None)
            continue
        i0 = o0 * s + d - p
        res.append((slice(o0, o1 + 1), slice(i0, i0 + (o1 - o0) * s + 1, s)))
    return res


def _phases(size: int, out: int, k: int, s: int, p: int):
    """Per residue r of the input positions i = s*m + r along one axis: the taps that reach them and how
    to read the output gradient for a stride-1 correlation, as (r, count, tap indices, pad_left, pad_right).

    Input position i receives gy[o] * w[d] for every o*s + d - p = i. With d = d0 + s*j (d0 = (r+p) mod s)
    this is gy[m + c - j] with c = (r + p - d0) / s: a correlation of gy with the taps in reverse order.
    """
    res = []
    for r in range(min(s, size)):
        count = (size - r + s - 1) // s
        d0 = (r + p) % s
        taps = list(range(d0, k, s))
        if not taps:
            res.append((r, count, None, 0, 0))
            continue
        c = (r + p - d0) // s
        left = len(taps) - 1 - c
        right = count + len(taps) - 1 - left - out
        res.append((r, count, taps[::-1], left, right))
    return res


def _input_grad_polyphase(gy: torch.Tensor, weight: torch.Tensor, x_shape, stride, padding) -> torch.Tensor:
    """Gradient w.r.t. the input of a depthwise conv, channels-last: one forward conv per stride phase."""
    nd = gy.ndim - 2
    kernel = weight.shape[2:]
    per_axis = [_phases(x_shape[1 + a], gy.shape[1 + a], kernel[a], stride[a], padding[a]) for a in range(nd)]
    gx = gy.new_empty(x_shape)
    for combo in itertools.product(*per_axis):
        dst = (slice(None),) + tuple(slice(r, None, s) for (r, *_), s in zip(combo, stride))
        if any(taps is None for _, _, taps, _, _ in combo):
            gx[dst] = 0
            continue
        w = weight
        for a, (_, _, taps, _, _) in enumerate(combo):
            w = w.index_select(2 + a, torch.tensor(taps, device=w.device))
        pads = []
        for _, _, _, left, right in reversed(combo):
            pads += [left, right]
        g = F.pad(gy, [0, 0] + pads)  # negative pads crop
        gx[dst] = _conv(g.movedim(-1, 1), w.contiguous(), (1,) * nd, (0,) * nd).movedim(1, -1)
    return gx


class _DepthwiseConvCL(torch.autograd.Function):
    """Depthwise conv on ``x`` of shape ``(B, *grid, C)`` (channels last); returns ``(B, *out_grid, C)``."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        nd = x.ndim - 2
        y = _conv(x.movedim(-1, 1), weight, stride, padding)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.nd = stride, padding, nd
        return y.movedim(1, -1)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        nd, stride, padding = ctx.nd, ctx.stride, ctx.padding
        gy = gy.contiguous()
        kernel = weight.shape[2:]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Input gradient: where the kernel windows don't overlap (K/V strides of 4 and 8 with 3-wide
        # kernels) each tap's slice is scattered in the loop below; elsewhere it is computed as forward
        # convolutions, one per stride phase (_input_grad_polyphase). oneDNN's own depthwise backward-data
        # kernel does the same multiply-adds ~10x slower than its forward kernel on CPU.
        taps_for_x = need_x and all(s >= k for s, k in zip(stride, kernel) if k > 1)
        gx = None
        if need_x and not taps_for_x:
            gx = _input_grad_polyphase(gy, weight, x.shape, stride, padding)
        if not (need_w or taps_for_x):
            return gx, None, None, None
        per_axis = [_tap_slices(x.shape[1 + i], gy.shape[1 + i], kernel[i], stride[i], padding[i]) for i in range(nd)]
        w_taps = weight.reshape(weight.shape[0], -1).t()  # (K, C)
        if taps_for_x:
            gx = torch.zeros_like(x)
        gw = torch.zeros_like(w_taps) if need_w else None
        dims = tuple(range(nd + 1))
        for t, taps in enumerate(itertools.product(*per_axis)):
            if any(tap is None for tap in taps):
                continue
            out_idx = (slice(None),) + tuple(tap[0] for tap in taps)
            in_idx = (slice(None),) + tuple(tap[1] for tap in taps)
            g = gy[out_idx]
            if need_w:
                gw[t] = (x[in_idx] * g).sum(dims)
            if taps_for_x:
                gx[in_idx].addcmul_(g, w_taps[t])
        if need_w:
            gw = gw.t().contiguous().reshape(weight.shape)
        return gx, gw, None, None


def depthwise_conv_cl(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    """Depthwise convolution (``groups = C``, no bias) of a channels-last grid ``(B, *grid, C)``.

    Under CPU autocast it runs in float32 (output cast back to ``x``'s dtype). oneDNN's native bf16
    depthwise weight-gradient kernel, which it picks on CPUs with AVX512-BF16 or AMX, returns wrong
    gradients for small grids (relative errors of 0.1 to 1e30 against float64, in channels-last and
    channels-first layouts alike) and writes out of bounds (heap corruption that later tests tripped on);
    float32 is right on every ISA. These convolutions are well under 1% of the model's flops.
    """
    stride, padding = tuple(stride), tuple(padding)
    if _use_fast(x, weight):
        return _DepthwiseConvCL.apply(x.contiguous(), weight, stride, padding)
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return _conv(x.float().movedim(-1, 1), weight.float(), stride, padding).movedim(1, -1).to(x.dtype)
    return _conv(x.movedim(-1, 1), weight, stride, padding).movedim(1, -1)


# --- MLP --------------------------------------------------------------------------------------------
# Rows per chunk: a hidden-activation chunk of about 8 MiB stays in cache between the GEMM that writes it
# and the GELU that reads it, and below glibc's mmap threshold (32 MiB), so its buffer is reused instead of
# being mapped and page-faulted anew on every allocation (MViT-B's first-stage MLP: 38 MiB unchunked).
MLP_CHUNK_BYTES = 8 << 20


class _Mlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        x2 = x.reshape(-1, x.shape[-1])
        rows = max(1, MLP_CHUNK_BYTES // (w1.shape[0] * x.element_size()))
        out = x2.new_empty(x2.shape[0], w2.shape[0])
        hidden = []
        for start in range(0, x2.shape[0], rows):
            h = F.linear(x2[start : start + rows], w1, b1)
            hidden.append(h)
            out[start : start + rows] = F.linear(F.gelu(h), w2, b2)
        ctx.save_for_backward(x2, w1, w2, *hidden)
        ctx.rows, ctx.x_shape, ctx.biases = rows, x.shape, (b1 is not None, b2 is not None)
        return out.reshape(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @once_differentiable  # writes into preallocated gradients (no double backward)
    def backward(ctx, gy):
        x2, w1, w2, *hidden = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        need_b1, need_b2 = need_b1 and ctx.biases[0], need_b2 and ctx.biases[1]
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = torch.empty_like(x2) if need_x else None
        gw1 = torch.zeros_like(w1) if need_w1 else None
        gw2 = torch.zeros_like(w2) if need_w2 else None
        gb1 = w1.new_zeros(w1.shape[0]) if need_b1 else None
        for i, h in enumerate(hidden):
            rows = slice(i * ctx.rows, i * ctx.rows + h.shape[0])
            g = gy2[rows]
            if need_w2:
                gw2.addmm_(g.t(), F.gelu(h))  # recomputed, not stored
            if not (need_x or need_w1 or need_b1):
                continue
            gh = torch.ops.aten.gelu_backward(g.mm(w2), h)
            if need_w1:
                gw1.addmm_(gh.t(), x2[rows])
            if need_b1:
                gb1 += gh.sum(0)
            if need_x:
                torch.mm(gh, w1, out=gx[rows])
        gb2 = gy2.sum(0) if need_b2 else None
        return None if gx is None else gx.reshape(ctx.x_shape), gw1, gb1, gw2, gb2


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)``; in training on CPU run in chunks of tokens, with
    only the hidden pre-activations kept for backward (the GELU output is recomputed there)."""
    if _use_fast(x, w1, w2):
        return _Mlp.apply(x, w1, b1, w2, b2)
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


# --- attention heads ---------------------------------------------------------------------------------
def split_heads(x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """``(B, N, parts * heads * d)`` -> ``parts`` views ``(B, heads, N, d)`` (q, k, v of a fused projection).

    Unbinding before the transpose makes the backward one pass: it stacks the parts' gradients into
    ``(B, N, parts, heads, d)``, which is already the layout of the projection's output gradient.
    """
    b, n, c = x.shape
    return tuple(part.transpose(1, 2) for part in x.reshape(b, n, parts, heads, c // (parts * heads)).unbind(2))


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class _HeadsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(_merge_heads(x), weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        b, h, n, d = x.shape
        gy2 = gy.reshape(-1, gy.shape[-1])
        gw = gy2.t().mm(_merge_heads(x).reshape(-1, h * d)) if ctx.needs_input_grad[1] else None
        gb = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul(weight).reshape(b, n, h, d).transpose(1, 2)
        return gx, gw, gb


def heads_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of per-head tokens ``(B, heads, N, d)`` merged to ``(B, N, heads * d)``.

    With one head the merge is a view and the plain op stores nothing extra, so the fast path is only
    taken with several heads.
    """
    if x.shape[1] > 1 and _use_fast(x, weight):
        return _HeadsLinear.apply(x, weight, bias)
    return F.linear(_merge_heads(x), weight, bias)
