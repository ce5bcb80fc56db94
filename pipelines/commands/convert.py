"""`mvit convert SRC OUT --model NAME [--num-classes N]`: any supported checkpoint -> our own format.

SRC is an official SlowFast ``.pyth`` (fused ``qkv``, separate ``q``/``k``/``v``, or the older 16x4 zoo file
without stride-1 K/V pooling), a torchvision ``mvit_v1_b`` / ``mvit_v2_s`` state dict, or one of ours. The
weights are loaded into ``NAME`` exactly as ``mvit.create_model(NAME, checkpoint=SRC)`` does (strictly:
missing or unexpected keys fail with their names) and written with :func:`mvit.checkpoint.save_checkpoint`,
which stores the model config next to the weights, so the result loads with
``mvit.checkpoint.load_model(OUT)`` or ``mvit.create_model(NAME, checkpoint=OUT)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path


def convert(src: str | os.PathLike, out: str | os.PathLike, model: str, num_classes: int | None = None) -> dict:
    """Load ``src`` into the variant ``model`` and save it to ``out`` in our format; return a summary."""
    import mvit
    from mvit.checkpoint import save_checkpoint

    net = mvit.create_model(model, checkpoint=src, num_classes=num_classes)
    out = Path(out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(net, out, converted_from=os.fspath(src), model_name=model)
    return {
        "model": model,
        "source": os.fspath(src),
        "output": str(out),
        "num_classes": net.num_classes,
        "params": sum(p.numel() for p in net.parameters()),
        "kv_pool_stride1": net.cfg.kv_pool_stride1,
    }


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert",
        help="convert an official SlowFast .pyth or torchvision state dict to our checkpoint format",
        description=(
            "Load SRC (official SlowFast .pyth in any layout, torchvision state dict, or ours) into model NAME "
            "and save OUT in our format (weights + model config). Mismatching keys fail with their names."
        ),
    )
    p.add_argument("src", help="input checkpoint file")
    p.add_argument("out", help="output file (our format)")
    p.add_argument("--model", required=True, help="model name (see `mvit flops --list`)")
    p.add_argument(
        "--num-classes", type=int, default=None,
        help="head size; default: the checkpoint's. A different size re-initialises the head (with a warning)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = convert(args.src, args.out, args.model, args.num_classes)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mvit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mvit convert: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
