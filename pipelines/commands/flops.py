"""`mvit flops NAME [--frames T] [--size S]`: parameters and GFLOPs with fvcore's counter.

Counting follows shared/reference/models.md: fvcore's ``FlopCountAnalysis`` (one fused multiply-add = one
flop, batch 1). Our attention runs through ``F.scaled_dot_product_attention``, which fvcore does not know;
it is counted here as the two matmuls it fuses (``q @ k^T`` and ``attn @ v``), which is what fvcore counts
for the reference implementations that spell them out. Softmax, the additive rel-pos mask, GELU, adds and
max-pool are not counted (fvcore does not count them in the reference code either).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Sequence

import torch


def sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: MACs of q@k^T plus attn@v."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch = math.prod(q[:-2])
    nq, d = q[-2], q[-1]
    nk, dv = k[-2], v[-1]
    return batch * nq * nk * (d + dv)


def input_for(model, frames: int | None = None, size: int | None = None) -> torch.Tensor:
    cfg = model.cfg
    shape = list(cfg.input_size)
    if cfg.is_video and frames is not None:
        shape[0] = frames
    if size is not None:
        shape[-2:] = [size, size]
    return torch.zeros((1, cfg.in_chans, *shape))


def count_model(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, float]:
    """(parameters, GFLOPs) of ``model`` on input ``x``."""
    from fvcore.nn import FlopCountAnalysis

    params = sum(p.numel() for p in model.parameters())
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, x)
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = analysis.total()
    return params, total / 1e9


def count(name: str, frames: int | None = None, size: int | None = None, num_classes: int | None = None) -> tuple[int, float]:
    """Parameters and fvcore GFLOPs of the named variant at its input size (or ``frames`` x ``size``^2)."""
    import mvit

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = mvit.create_model(name, **kwargs)
    x = input_for(model, frames, size)
    if tuple(x.shape[2:]) != tuple(model.cfg.input_size):
        # Build at the requested size so that embeddings are sized for it (no interpolation ops counted).
        model = mvit.create_model(name, input_size=tuple(x.shape[2:]), **kwargs)
    with torch.no_grad():
        return count_model(model, x)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "flops",
        help="parameters and GFLOPs (fvcore) of a model variant",
        description="Count parameters and fvcore GFLOPs (1 multiply-add = 1 flop, batch 1) of a named variant.",
    )
    p.add_argument("name", help="model name (see `mvit flops --list`)", nargs="?")
    p.add_argument("--frames", type=int, default=None, help="input frames T (video models; default: the variant's)")
    p.add_argument("--size", type=int, default=None, help="input height = width (default: the variant's)")
    p.add_argument("--num-classes", type=int, default=None, help="head size (default: the variant's)")
    p.add_argument("--list", action="store_true", help="list model names and exit")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import mvit

    if args.list or not args.name:
        print("\n".join(mvit.list_models()))
        return 0 if args.list else 2
    try:
        params, gflops = count(args.name, frames=args.frames, size=args.size, num_classes=args.num_classes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": args.name, "params": params, "gflops": round(gflops, 3)}))
    else:
        print(f"{args.name}: {params:,} parameters, {gflops:.2f} GFLOPs")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mvit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["flops", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
