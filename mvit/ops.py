"""Two fast paths for CPU training, numerically equivalent to the plain ops they replace.

* :func:`depthwise_conv_cl`: the depthwise pooling convolution on a channels-last grid. The forward is the
  ordinary (oneDNN) convolution; the backward is written out tap by tap (one strided multiply-add per
  kernel offset), which is several times faster on CPU than the generic grouped-convolution backward
  (oneDNN runs depthwise weight gradients as im2col + GEMM per group), and keeps everything channels-last.
* :func:`attention`: ``F.scaled_dot_product_attention``; on CPU, when batch x heads is smaller than the
  thread count (MViT's first stage has a single head), the queries are split into chunks that run as extra
  heads, because the fused CPU backward parallelises over batch x heads only.

Both fall back to the plain ops when no gradient is needed or under ``torch.compile`` (where inductor
generates its own kernels), so inference, tracing and flop counting see ordinary aten ops.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


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
        per_axis = [_tap_slices(x.shape[1 + i], gy.shape[1 + i], kernel[i], stride[i], padding[i]) for i in range(nd)]
        w_taps = weight.reshape(weight.shape[0], -1).t()  # (K, C)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = torch.zeros_like(x) if need_x else None
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
            if need_x:
                gx[in_idx].addcmul_(g, w_taps[t])
        if need_w:
            gw = gw.t().reshape(weight.shape)
        return gx, gw, None, None


def depthwise_conv_cl(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    """Depthwise convolution (``groups = C``, no bias) of a channels-last grid ``(B, *grid, C)``."""
    stride, padding = tuple(stride), tuple(padding)
    fast = (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
    )
    if fast:
        return _DepthwiseConvCL.apply(x.contiguous(), weight, stride, padding)
    return _conv(x.movedim(-1, 1), weight, stride, padding).movedim(1, -1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (scale ``head_dim ** -0.5``), queries chunked on thread-starved CPUs."""
    b, h, n, d = q.shape
    if (
        attn_mask is None
        and q.device.type == "cpu"
        and torch.is_grad_enabled()
        and q.requires_grad
        and not torch.compiler.is_compiling()
    ):
        chunks = min(torch.get_num_threads() // (b * h), n // 1024)
        if chunks >= 2:
            pad = (-n) % chunks
            m = (n + pad) // chunks
            qc = F.pad(q, (0, 0, 0, pad)).reshape(b, h * chunks, m, d)
            kc = k.unsqueeze(2).expand(b, h, chunks, k.shape[2], d).reshape(b, h * chunks, k.shape[2], d)
            vc = v.unsqueeze(2).expand(b, h, chunks, v.shape[2], v.shape[3]).reshape(b, h * chunks, v.shape[2], v.shape[3])
            out = F.scaled_dot_product_attention(qc, kc, vc)
            return out.reshape(b, h, n + pad, -1)[:, :, :n]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
