"""Training loader: clips per CPU-second of our loader vs a per-file loader, and the loader cores a GPU needs.

    python benchmarks/bench_loader.py [--videos 8] [--clips 3] [--rounds 3] [--gpu-clips-per-s 40]

The same training clips (16 frames 4 apart at 224, the full Kinetics augmentation: RandAugment
m7-n4-mstd0.5 on the decoded frames, random resized crop, flip, normalise, random erasing, repeated
augmentation x2 - the recipe's clip.* keys), made two ways, one process, one thread:

- ours: the sample as the shards store it (`mvit preprocess` of the Kinetics recipe: H.264, short side
  320, 30 fps, 16-frame GOP) -> `clips.decode_clip_frames` (seek to the keyframe before the clip, decode
  up to its last frame, RGB for its 16 frames only) -> the augmentation, 2 clips per decode.
- per-file: what loaders that read the source files do (SlowFast's PyAV decoder): open the source video
  (camera-like 640x360, 30 fps, x264 with a 250-frame GOP, as downloaded videos have), seek to the clip's
  start, decode to its end converting every frame of the window to RGB, take the 16 frames, resize them
  to short side 320 (as the stored shards are), then the same augmentation, 2 clips per decode.

Both again with RandAugment after the crop (`clip.rand_augment.after_crop`, timm's image order: the ops
touch 224x224 pixels instead of 320p frames; not the official video order), and, when importable, ours
with torchcodec's decoder instead of PyAV. Rounds alternate the order of
the variants; each variant's figure is clips per CPU-second of this process (`time.process_time`), so
other load on the machine slows the wall clock, not the figure; medians over rounds. The clip start
frames are drawn once (seeded) and used by every variant. A GPU's demand is a stated assumption
(--gpu-clips-per-s, MViT-B 16x4 training on an H100-class GPU in bf16: 40 clips/s), not a measurement.
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

T, TAU, CROP, SHORT_SIDE, K = 16, 4, 224, 320, 2


def load() -> float:
    return os.getloadavg()[0]


def stored_samples(sources: list[Path]) -> list[tuple[bytes, int]]:
    """Each source as `mvit preprocess` stores it for the Kinetics recipe: (mp4 bytes, frames)."""
    from pipelines.data.video import transcode

    out = []
    for path in sources:
        media, meta = transcode(path.read_bytes(), short_side=SHORT_SIDE, fps=30, codec="h264", crf=23, gop=16, threads=1)
        out.append((media, int(meta["frames"])))
    return out


def per_file_frames(data: bytes, index: np.ndarray):
    """A per-file loader's decode: seek, decode the window, RGB for every frame in it, pick, resize."""
    import av
    import torch
    from torchvision.transforms.v2 import functional as F

    first, last = int(index.min()), int(index.max())
    frames = {}
    with av.open(__import__("io").BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        fps = float(stream.average_rate)
        if first:
            container.seek(int((first - 0.5) / fps / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            n = int(round(float(frame.pts * stream.time_base) * fps))
            if n >= first:
                frames[n] = frame.to_ndarray(format="rgb24")  # every frame of the window, as pyav_decode
            if n >= last:
                break
    clip = torch.from_numpy(np.stack([frames[min(int(i), max(frames))] for i in index])).permute(0, 3, 1, 2)
    return F.resize(clip, [SHORT_SIDE], antialias=True)


def torchcodec_frames(data: bytes, index: np.ndarray):
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder(data, seek_mode="approximate", num_ffmpeg_threads=1).get_frames_at(index.tolist()).data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--clips", type=int, default=3, help="clips (decodes) per video per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-clips-per-s", type=float, default=40.0)
    parser.add_argument("--work", default=str(ROOT / "bench-out" / "loader"))
    args = parser.parse_args()

    import torch
    from bench_preprocess import make_sources

    from pipelines.data.augment import repeated_augment
    from pipelines.data.clips import ClipConfig, RandAugmentConfig, decode_clip_frames, train_augment
    from pipelines.data.video import clip_indices

    torch.set_num_threads(1)
    started_load = load()
    work = Path(args.work)
    csv = make_sources(work / "sources", args.videos)
    sources = sorted((work / "sources").glob("class*/video*.mp4"))[: args.videos]
    print(f"{len(sources)} sources ({csv.parent}); storing them as the Kinetics recipe does ...", flush=True)
    stored = stored_samples(sources)
    clip = ClipConfig(num_frames=T, sampling_rate=TAU, crop_size=CROP, rand_augment=RandAugmentConfig(enabled=True),
                      erase_prob=0.25, repeated_augment=K)
    transform = train_augment(clip)
    after_crop = dataclasses.replace(transform, rand_augment_first=False)
    rng = np.random.default_rng(0)
    span = (T - 1) * TAU + 1
    jobs = [(i, clip_indices(frames, T, TAU, int(rng.integers(0, frames - span + 1))))
            for i, (_, frames) in enumerate(stored) for _ in range(args.clips)]
    sources_bytes = [p.read_bytes() for p in sources]

    variants = {
        "ours (shards, PyAV)": lambda i, index: decode_clip_frames(stored[i][0], index),
        "per-file (source, PyAV)": lambda i, index: per_file_frames(sources_bytes[i], index),
        "ours, RandAugment after the crop": lambda i, index: decode_clip_frames(stored[i][0], index),
        "per-file, RandAugment after the crop": lambda i, index: per_file_frames(sources_bytes[i], index),
    }
    augment_of = {name: after_crop if "after the crop" in name else transform for name in variants}
    try:
        torchcodec_frames(stored[0][0], jobs[0][1])
        variants["ours (shards, torchcodec)"] = lambda i, index: torchcodec_frames(stored[i][0], index)
    except Exception as exc:  # noqa: BLE001 - not installed / no FFmpeg libraries: say so and go on
        print(f"torchcodec not measured: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)

    generator = torch.Generator().manual_seed(0)
    cpu = {name: [] for name in variants}  # CPU seconds per clip, per round
    decode_cpu = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            decode_s = total_s = 0.0
            for i, index in jobs:
                t0 = time.process_time()
                frames = variants[name](i, index)
                t1 = time.process_time()
                out = repeated_augment(lambda f=frames: f, augment_of.get(name, transform), K, generator)
                t2 = time.process_time()
                assert out.shape == (K, T, 3, CROP, CROP), out.shape
                decode_s += t1 - t0
                total_s += t2 - t0
            clips = len(jobs) * K
            cpu[name].append(total_s / clips)
            decode_cpu[name].append(decode_s / clips)
            print(f"round {r} {name}: {clips / total_s:.2f} clips per CPU-s (decode {decode_s / len(jobs) * 1000:.0f} "
                  f"ms per decode), load {load():.1f}", flush=True)

    per_core = {name: 1.0 / statistics.median(v) for name, v in cpu.items()}
    ours, per_file = per_core["ours (shards, PyAV)"], per_core["per-file (source, PyAV)"]
    late = per_core["ours, RandAugment after the crop"] / per_core["per-file, RandAugment after the crop"]
    result = {
        "clips_per_cpu_s": {k: round(v, 3) for k, v in per_core.items()},
        "decode_ms_per_decode": {k: round(statistics.median(v) * K * 1000, 1) for k, v in decode_cpu.items()},
        "ratio_ours_vs_per_file": round(ours / per_file, 2),
        "ratio_ours_vs_per_file_rand_augment_after_crop": round(late, 2),
        "loader_cores_per_gpu": {k: round(args.gpu_clips_per_s / v, 1) for k, v in per_core.items()},
        "gpu_clips_per_s_assumed": args.gpu_clips_per_s,
        "clips": len(jobs) * K, "rounds": args.rounds, "load_before": round(started_load, 1), "load_after": round(load(), 1),
    }
    print("\n| variant | clips per CPU-second | decode CPU ms per decode (2 clips) | loader cores per GPU at "
          f"{args.gpu_clips_per_s:g} clips/s |\n|---|---|---|---|")
    for name in per_core:
        print(f"| {name} | {per_core[name]:.2f} | {result['decode_ms_per_decode'][name]:.0f} | "
              f"{result['loader_cores_per_gpu'][name]:.1f} |")
    print(f"\nours / per-file: {result['ratio_ours_vs_per_file']}x per core, with RandAugment after the crop "
          f"{result['ratio_ours_vs_per_file_rand_augment_after_crop']}x (load {result['load_before']} -> {result['load_after']})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
