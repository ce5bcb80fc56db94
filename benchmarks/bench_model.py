"""Forward+backward of ``mvit_b_16x4`` (ours) against torchvision's ``mvit_v1_b`` on identical weights and input.

    python benchmarks/bench_model.py [--rounds 10] [--threads 2] [--iters 2]

How it measures (so that the numbers can be trusted):
* Both models hold the same weights: torchvision's model is built from a fixed seed and its state dict is
  re-keyed into ours (``mvit.checkpoint.from_torchvision``). Stochastic depth and dropout are 0 in both, so
  train-mode forward+backward is deterministic and the outputs and gradients can be compared.
* Every measurement runs in a fresh subprocess (same thread count), alternating which implementation goes
  first in each round; per run: 1 warm-up step, then ``--iters`` timed steps (forward, ``sum().backward()``).
  The reported time per implementation is the median of all its timed steps; the best (minimum) step is
  reported too, as the figure least disturbed by other load on a shared machine, and so is the median over
  rounds of each round's ratio (the two runs of a round are back to back, so a slow phase of a shared
  machine slows both). On a noisy VM a single process can run 15% slower than the next one with the same
  code: hence 10 rounds by default.
* Peak memory is measured in one extra run per implementation: the process's peak resident set size
  (``ru_maxrss``) minus its resident size just before the step, i.e. what forward+backward adds on top of
  weights and input (gradients included). In that run glibc serves every allocation >= 64 KiB with mmap
  (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the RSS at once and the peak is the peak of live
  memory rather than of the allocator's cache. (That setting costs page faults, so timed runs don't use it.)
  The default-allocator peak RSS of the timed runs is reported too.
* No activation checkpointing on either side.
* On a CUDA machine it also times bf16 autocast at batch 8 (peak from ``torch.cuda.max_memory_allocated``).

Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def build(impl: str, device: str):
    import torch
    import torchvision.models.video as tvv

    torch.manual_seed(0)
    tv = tvv.mvit_v1_b(stochastic_depth_prob=0.0, dropout=0.0)
    if impl == "torchvision":
        model = tv
    else:
        sys.path.insert(0, str(ROOT))
        import mvit
        from mvit.checkpoint import from_torchvision

        model = mvit.create_model(
            "mvit_b_16x4", checkpoint=from_torchvision(tv.state_dict()), drop_path_rate=0.0, head_dropout=0.0
        )
        del tv
    return model.to(device).train()


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    device = args.device
    model = build(args.impl, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 16, 224, 224, generator=gen).to(device)
    cuda = device == "cuda"
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=args.bf16):
            out = model(x)
        out.float().sum().backward()
        return out

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base = _rss_kib()
    out = step()  # warm-up; its logits and gradients are the ones compared
    grad = model.patch_embed.proj.weight.grad if args.impl == "ours" else model.conv_proj.weight.grad
    result = {"logits": out.detach().float().cpu().tolist(), "grad_stem": grad.float().cpu().flatten()[:64].tolist()}
    model.zero_grad(set_to_none=True)
    del out
    times = [float("nan")]
    if args.iters:
        times = []
    for _ in range(args.iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    result["time_s"] = sum(times) / len(times)
    result["step_times_s"] = times
    if cuda:
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        result["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    Path(args.out).write_text(json.dumps(result))


def run_one(impl: str, args: argparse.Namespace, device: str, batch: int, bf16: bool, iters: int, exact_mem: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if exact_mem:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--worker", impl, "--threads", str(args.threads), "--out", out,
           "--device", device, "--batch", str(batch), "--iters", str(iters)] + (["--bf16"] if bf16 else [])
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    return res


def compare(args: argparse.Namespace, device: str, batch: int, bf16: bool, iters: int, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {"torchvision": [], "ours": []}
    for r in range(rounds):
        order = ["torchvision", "ours"] if r % 2 == 0 else ["ours", "torchvision"]
        for impl in order:
            res = run_one(impl, args, device, batch, bf16, iters)
            runs[impl].append(res)
            print(f"  round {r + 1} {impl:12s} {res['time_s']:.3f} s/step  peak RSS +{res['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    mem: dict[str, dict] = {}
    for impl in ("torchvision", "ours"):
        mem[impl] = run_one(impl, args, device, batch, bf16, 0, exact_mem=device == "cpu")
        print(f"  memory run {impl:12s} peak +{mem[impl]['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    import torch

    tv_logits = torch.tensor(runs["torchvision"][0]["logits"])
    our_logits = torch.tensor(runs["ours"][0]["logits"])
    tv_grad = torch.tensor(runs["torchvision"][0]["grad_stem"])
    our_grad = torch.tensor(runs["ours"][0]["grad_stem"])
    max_diff = (tv_logits - our_logits).abs().max().item()
    grad_rel = ((tv_grad - our_grad).abs().max() / tv_grad.abs().max().clamp_min(1e-12)).item()
    tol = 5e-2 if bf16 else 1e-4
    steps = {k: [t for r in v for t in r["step_times_s"]] for k, v in runs.items()}
    t_tv = statistics.median(steps["torchvision"])
    t_ours = statistics.median(steps["ours"])
    best_tv, best_ours = min(steps["torchvision"]), min(steps["ours"])
    # Each round runs both back to back: the ratio within a round cancels slow drifts of the machine's speed.
    per_round = [statistics.median(a["step_times_s"]) / statistics.median(b["step_times_s"]) for a, b in zip(runs["torchvision"], runs["ours"])]
    m_tv = mem["torchvision"]["peak_mib"]
    m_ours = mem["ours"]["peak_mib"]
    return {
        "device": device,
        "dtype": "bf16" if bf16 else "fp32",
        "batch": batch,
        "threads": args.threads,
        "rounds": rounds,
        "torchvision_clips_per_s": batch / t_tv,
        "ours_clips_per_s": batch / t_ours,
        "speedup": t_tv / t_ours,
        "torchvision_best_s": best_tv,
        "ours_best_s": best_ours,
        "speedup_best": best_tv / best_ours,
        "speedup_per_round": [round(r, 3) for r in per_round],
        "speedup_paired_median": statistics.median(per_round),
        "torchvision_peak_mib": m_tv,
        "ours_peak_mib": m_ours,
        "memory_ratio": m_ours / m_tv,
        "logits_max_abs_diff": max_diff,
        "stem_grad_max_rel_diff": grad_rel,
        "outputs_equal": bool(max_diff <= tol and grad_rel <= (5e-2 if bf16 else 1e-3)),
        "all_times_s": {k: [round(t, 3) for t in v] for k, v in steps.items()},
        "timed_runs_peak_rss_mib": {k: [round(r["peak_mib"]) for r in v] for k, v in runs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--iters", type=int, default=2, help="timed steps per run (after 1 warm-up step)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1))
    p.add_argument("--no-cuda", action="store_true", help="skip the bf16 GPU comparison even if CUDA is present")
    # worker-only arguments
    p.add_argument("--worker", choices=["torchvision", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.impl = args.worker
        worker(args)
        return 0

    results = [compare(args, "cpu", 1, False, args.iters, args.rounds)]
    import torch

    if torch.cuda.is_available() and not args.no_cuda:
        results.append(compare(args, "cuda", 8, True, max(args.iters, 5), args.rounds))

    print("\n| setting | torchvision clips/s | ours clips/s | speedup (median step) | speedup (best step) "
          "| speedup (median of rounds) | torchvision peak MiB | ours peak MiB | memory ratio | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        setting = f"{r['device']} {r['dtype']} batch {r['batch']} ({r['threads']} threads)"
        print(
            f"| {setting} | {r['torchvision_clips_per_s']:.3f} | {r['ours_clips_per_s']:.3f} | {r['speedup']:.2f}x | "
            f"{r['speedup_best']:.2f}x | {r['speedup_paired_median']:.2f}x | "
            f"{r['torchvision_peak_mib']:.0f} | {r['ours_peak_mib']:.0f} | {r['memory_ratio']:.2f} | {r['logits_max_abs_diff']:.1e} |"
        )
    print(json.dumps({"benchmark": "mvit_b_16x4_vs_torchvision_mvit_v1_b", "results": results}))
    return 0 if all(r["outputs_equal"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
