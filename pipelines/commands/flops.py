"""`mvit flops NAME [--frames T] [--size S]`: parameters and GFLOPs with fvcore's counter.

Counting follows docs/reference.md: fvcore's ``FlopCountAnalysis`` (one fused multiply-add = one
flop, batch 1). Our attention runs through ``F.scaled_dot_product_attention``, which fvcore does not know;
it is counted here as the two matmuls it fuses (``q @ k^T`` and ``attn @ v``), which is what fvcore counts
for the reference implementations that spell them out. Softmax, the additive rel-pos mask, GELU, adds and
max-pool are not counted (fvcore does not count them in the reference code either).

fvcore traces the model with real tensors, so counting ``mvit_b_64x3`` runs a 455-GFLOP forward (~30 s on
2 CPU cores). ``--fast`` counts the same operations from shapes alone: the model runs on the ``meta``
device under torch's ``FlopCounterMode`` (matmuls, convolutions, attention; 2 flops per multiply-add,
halved here) and LayerNorms are added the way fvcore counts them (5 flops per element). The tests check
that both agree on every variant small enough to trace quickly.
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


class _FullForward(torch.nn.Module):
    """The model's full computation: ``MViT.forward`` skips the last block's non-class tokens (they don't
    reach the logits); the reference counts (and implementations) compute them, so they are counted."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mvit.ops import fast_paths

        with fast_paths(False):  # e.g. K and V of every token, also those their pooling windows skip
            return self.model.forward_head(self.model.forward_features(x))


def count_model(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, float]:
    """(parameters, GFLOPs) of ``model`` on input ``x``."""
    with warnings.catch_warnings():
        # fvcore.nn scripts a loss function when imported (torch.jit.script, deprecated in torch 2.x): a
        # FutureWarning about fvcore's code, not ours, that users cannot act on.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    params = sum(p.numel() for p in model.parameters())
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(_FullForward(model), x)
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = analysis.total()
    return params, total / 1e9


def count_from_shapes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, float]:
    """(parameters, GFLOPs) by fvcore's rules without computing anything: ``model`` and ``x`` on ``meta``."""
    from torch.utils.flop_counter import FlopCounterMode

    norm_flops = 0

    def count_norm(module, inputs, output):  # fvcore: 5 flops per element for an affine LayerNorm
        nonlocal norm_flops
        norm_flops += (5 if module.elementwise_affine else 4) * inputs[0].numel()

    hooks = [m.register_forward_hook(count_norm) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            _FullForward(model.eval())(x)
    finally:
        for h in hooks:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return params, (counter.get_total_flops() / 2 + norm_flops) / 1e9


def count(
    name: str,
    frames: int | None = None,
    size: int | None = None,
    num_classes: int | None = None,
    fast: bool = False,
) -> tuple[int, float]:
    """Parameters and fvcore GFLOPs of the named variant at its input size (or ``frames`` x ``size``^2).

    ``fast``: count from shapes on the ``meta`` device (:func:`count_from_shapes`) instead of tracing.
    """
    import mvit

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    cfg = mvit.get_config(name, **kwargs)
    shape = list(cfg.input_size)
    if cfg.is_video and frames is not None:
        shape[0] = frames
    if size is not None:
        shape[-2:] = [size, size]
    # Build at the requested size so that embeddings are sized for it (no interpolation ops counted).
    kwargs["input_size"] = tuple(shape)
    device = torch.device("meta") if fast else torch.device("cpu")
    with device:
        model = mvit.create_model(name, **kwargs)
        x = torch.zeros((1, cfg.in_chans, *shape))
    model.check_input(x)
    if fast:
        return count_from_shapes(model, x)
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
    p.add_argument("--fast", action="store_true",
                   help="count from shapes on the meta device (no forward pass; same rules as fvcore)")
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
        params, gflops = count(
            args.name, frames=args.frames, size=args.size, num_classes=args.num_classes, fast=args.fast
        )
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
