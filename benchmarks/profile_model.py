"""Where a training step of ``mvit_b_16x4`` spends its time, block by block, against the machine's GEMM rate.

    python benchmarks/profile_model.py [--threads 2] [--repeats 5]

Not part of ``make bench`` (it compares nothing side by side): a tool for finding what is left to speed up.
For each block it times forward + backward on the block's real input (captured from one forward pass of
the model at 1x3x16x224x224; the last block computes the class token only, as in ``MViT.forward``), counts
the matrix-multiply flops that step runs (linear layers and attention, forward and backward, as the ops are
dispatched: what the model really computes, including the attention
recomputation in the fused kernel's backward), and compares the time with what those flops would take at
the rate a plain large GEMM reaches in the same process, measured next to each block. The difference
("slack") is time spent below that rate: smaller GEMMs, the attention kernel, pooling convolutions, norms
and other elementwise work. On a VM whose speed drifts, read it over a few runs.

Prints one line per block, the totals and one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import ROOT, build  # the same model and weights as the benchmark

sys.path.insert(0, str(ROOT))  # this checkout's mvit, as bench_model's build() uses
from mvit.fast import class_token_only_block  # noqa: E402

aten = torch.ops.aten


def _mm_flops(a: torch.Tensor, b: torch.Tensor) -> int:
    return 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.ndim == 3 else 1)


def _attention_flops(q: torch.Tensor, k: torch.Tensor, gemms: int) -> int:
    b, h, n_q, d = q.shape
    return 2 * gemms * b * h * n_q * k.shape[-2] * d


class MatmulFlops(TorchDispatchMode):
    """Counts the flops of matrix multiplies as they are dispatched (2 per multiply-add)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten.mm.default, aten.mm.out, aten.bmm.default):
            self.flops += _mm_flops(args[0], args[1])
        elif func in (aten.addmm.default, aten.addmm_.default, aten.baddbmm.default):
            self.flops += _mm_flops(args[1], args[2])
        elif func is aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.flops += _attention_flops(args[0], args[1], gemms=2)  # q k^T, p v
        elif func is aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
            self.flops += _attention_flops(args[1], args[2], gemms=5)  # q k^T again, dv, dp, dq, dk
        return func(*args, **(kwargs or {}))


def step_times(fn, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def gemm_rate(repeats: int = 20) -> float:
    """GFLOP/s of a stage-3-sized GEMM (1569 x 384 @ 384 x 1536), the best case inside the model: the
    fastest of ``repeats`` runs, so that the floor it sets is the machine's rate, not a slow moment's."""
    a, b = torch.randn(1569, 384), torch.randn(384, 1536)
    out = torch.empty(1569, 1536)
    return 2 * 1569 * 384 * 1536 / min(step_times(lambda: torch.mm(a, b, out=out), repeats)) / 1e9


def profile_block(block_fn, x: torch.Tensor, grid: tuple[int, ...], repeats: int):
    """Median seconds of one forward + backward of ``block_fn(x, grid)`` (the block's output tokens), and the
    matmul flops it runs."""
    x = x.detach().requires_grad_(True)
    out = block_fn(x, grid)
    grad_out = torch.randn_like(out)

    def step() -> None:
        block_fn(x, grid).backward(grad_out)

    counter = MatmulFlops()
    with counter:
        step()
    return statistics.median(step_times(step, repeats)), counter.flops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build("ours", "cpu")
    inputs = []
    hooks = [
        blk.register_forward_pre_hook(lambda _m, a: inputs.append((a[0].detach().clone(), *a[1:])))
        for blk in model.blocks
    ]
    with torch.no_grad():  # every block's input, the same as in MViT.forward (which differs in the last block only)
        model.forward_tokens(torch.randn(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()

    rows = []
    last = len(model.blocks) - 1
    for i, (block, (x, grid)) in enumerate(zip(model.blocks, inputs)):
        rate = gemm_rate()  # measured next to each block: this machine's speed drifts from minute to minute
        if i == last:  # MViT.forward computes the last block's class token only
            block_fn = functools.partial(class_token_only_block, block)
        else:
            block_fn = lambda x, grid, block=block: block(x, grid)[0]  # noqa: E731
        seconds, flops = profile_block(block_fn, x, grid, args.repeats)
        floor = flops / (rate * 1e9)
        rows.append({"block": i, "grid": list(grid), "ms": seconds * 1e3, "gflop": flops / 1e9,
                     "gflop_per_s": flops / seconds / 1e9, "gemm_gflop_per_s": rate, "slack_ms": (seconds - floor) * 1e3})
        r = rows[-1]
        print(f"block {i:2d} grid {'x'.join(map(str, grid)):8s} {r['ms']:7.1f} ms {r['gflop']:6.2f} GFLOP "
              f"{r['gflop_per_s']:5.0f} GFLOP/s (GEMM {rate:3.0f})  slack {r['slack_ms']:6.1f} ms", flush=True)
    total_ms = sum(r["ms"] for r in rows)
    total_gflop = sum(r["gflop"] for r in rows)
    slack = sum(r["slack_ms"] for r in rows)
    print(f"blocks: {total_ms:.0f} ms, {total_gflop:.1f} GFLOP, {total_gflop / total_ms * 1e3:.0f} GFLOP/s; "
          f"slack against the GEMM rate: {slack:.0f} ms ({slack / total_ms:.0%})")
    print(json.dumps({"profile": "mvit_b_16x4_blocks", "threads": args.threads, "blocks": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
