"""Preprocessing: Ray job vs a plain PyAV loop, shard bytes vs source, stored format, worker memory.

    python benchmarks/bench_preprocess.py [--videos 32] [--rounds 5]

(a) Throughput. The same decode -> resize (short side 320) -> re-encode (`_encode_video`, what the job's
    tasks run) over the same files: a single-process loop, the Ray job with 1 worker and with 2 workers
    (embedded Ray started once beforehand: a cluster is up before jobs are submitted to it). Rounds
    alternate the order; medians are reported. Per core: the loop and 1 worker use one core each.
(b) Bytes of the shards written by the job vs the source files, for each stored codec.
(c) Stored format: what a training loader pays per 16x4 clip (`decode_frames` from a random start:
    seek to the keyframe before it, RGB only for the clip's frames): CPU ms, and the bytes a loader
    streams for it (the whole sample). From these, the clips/s an 8-GPU node can feed with its loader
    cores and network. Rule: the default is the smallest format (storage and network are paid for every
    byte, for the life of the dataset) that still feeds the node's GPUs; CPU only matters once it is
    the bottleneck. The GPU demand is a stated assumption (--gpu-clips-per-s; MViT-B 16x4 training on
    one H100-class GPU, bf16: generously 40 clips/s), not a measurement - rerun with your own figure.
(d) Memory: RSS of a process running `process_part` (the worker's code) over 500 videos, sampled after
    the 50th and the 500th; it must stay within 10%.

Sources are synthetic but camera-like: 640x360 at 30 fps, 10 s (a Kinetics clip), smooth moving content,
x264 with a long GOP (as downloaded videos have). Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOURCE_SIZE = (360, 640)
SOURCE_FRAMES = 300  # 10 s, the length of a Kinetics clip
CLIP = (16, 4)  # frames x sampling rate (the Kinetics recipe)


def camera_like(seed: int, frames: int = SOURCE_FRAMES, size: tuple[int, int] = SOURCE_SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 1, 3)
    boxes = [(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(-6, 6), rng.uniform(-4, 4), rng.integers(20, 90),
              rng.integers(0, 256, 3)) for _ in range(4)]
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        shift = t * 2.0
        for c in range(3):
            out[t, :, :, c] = (120 + 60 * np.sin((xx + shift) / (80 + 20 * c) + base[c] * 6)
                               + 40 * np.cos((yy - shift / 2) / 60)).clip(0, 255)
        for x, y, dx, dy, side, colour in boxes:
            cx, cy = int(x + dx * t) % w, int(y + dy * t) % h
            out[t, cy:cy + side, cx:cx + side] = colour
    return out


def make_sources(directory: Path, count: int, frames: int = SOURCE_FRAMES, size: tuple[int, int] = SOURCE_SIZE) -> Path:
    """`count` source videos + a path,label CSV (cached: the files are a function of their seed)."""
    from pipelines.data.video import encode_mp4

    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        rel = f"class{i % 4}/video{i:04d}.mp4"
        path = directory / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_mp4(camera_like(i, frames, size), 30, crf=20, gop=250, preset="fast"))
        rows.append(f"{rel},class{i % 4}\n")
    csv = directory / "labels.csv"
    csv.write_text("path,label\n" + "".join(rows))
    return csv


def preprocess_config(csv: Path, out: Path, workers: int, codec: str = "h264"):
    from pipelines.config import load_config
    from pipelines.preprocess.config import PreprocessConfig

    return load_config(PreprocessConfig, None, [
        f"source={csv}", f"output={out}", "short_side=320", "fps=30", f"codec={codec}",
        # Parts of 2 videos: a real job has thousands of parts; with 32 videos, bigger parts would measure
        # the last part running alone (load imbalance of a tiny job) rather than the workers' throughput.
        "max_samples_per_shard=2", f"num_workers={workers}",
    ])


def plain_loop(csv: Path) -> float:
    """The same per-video work in one process, one thread of decoding: seconds."""
    from pipelines.data.sources import load_records
    from pipelines.preprocess.worker import _encode_video

    cfg = preprocess_config(csv, Path("/unused"), 1)
    records, _ = load_records(str(csv))
    started = time.perf_counter()
    for record in records:
        _encode_video(record, Path(record.source).read_bytes(), cfg)
    return time.perf_counter() - started


def ray_job(csv: Path, workers: int, codec: str = "h264") -> tuple[float, object]:
    from pipelines.preprocess.job import run

    with tempfile.TemporaryDirectory(prefix="bench-pre-") as tmp:
        started = time.perf_counter()
        manifest = run(preprocess_config(csv, Path(tmp) / "ds", workers, codec))
        seconds = time.perf_counter() - started
        shards = [Path(tmp) / "ds" / s.url for s in manifest.shards]
        samples = _read_samples(shards[:3])
    return seconds, (manifest, samples)


def _read_samples(shards: list[Path]) -> list[dict]:
    import webdataset as wds

    return [s for shard in shards for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)]


def clip_cost(samples: list[dict], repeats: int = 3) -> dict:
    """Mean CPU ms to decode one 16x4 clip from a random start (what the training loader does:
    `decode_frames` of the clip's frame numbers) + the bytes a loader streams for it (the whole sample)."""
    from pipelines.data.video import clip_indices, decode_frames

    frames, rate = CLIP
    span = (frames - 1) * rate + 1
    rng = random.Random(0)
    times = []
    for _ in range(repeats):
        for sample in samples:
            meta = json.loads(sample["json"])
            start = rng.randint(0, max(0, meta["frames"] - span))
            started = time.process_time()
            decode_frames(sample["mp4"], clip_indices(meta["frames"], frames, rate, start), threads=1)
            times.append(time.process_time() - started)
    return {"ms_per_clip": 1000 * statistics.fmean(times),
            "bytes_per_clip": statistics.fmean(len(s["mp4"]) for s in samples)}


def memory_run(csv: Path, videos: int = 500) -> dict:
    """RSS of a process running process_part over `videos` inputs (the sources cycled under new keys)."""
    code = f"""
import dataclasses, json, psutil, sys
sys.path.insert(0, {str(ROOT)!r})
from pipelines.data.sources import load_records
from pipelines.preprocess.plan import Part
from pipelines.preprocess.worker import process_part
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_preprocess import preprocess_config
import tempfile
records, _ = load_records({str(csv)!r})
records = [dataclasses.replace(records[i % len(records)], key=f"k{{i:05d}}") for i in range({videos})]
rss = {{}}
proc = psutil.Process()
def on_video(i):
    if i % 50 == 0:
        rss[i] = proc.memory_info().rss
with tempfile.TemporaryDirectory() as tmp:
    cfg = preprocess_config({str(csv)!r}, tmp, 1)
    cfg.short_side = 96
    cfg.target_shard_bytes = 10**12
    process_part(Part("mem-00000", "train", records), {{r.label: 0 for r in records}}, cfg, "x", on_video=on_video)
print(json.dumps(rss))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    rss = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    return {"rss_mib": {k: round(v / 2**20, 1) for k, v in sorted(rss.items())},
            "ratio_500_vs_50": rss[videos] / rss[50]}


def feasible_clips_per_s(cost: dict, loader_cores: int, network_gbps: float) -> float:
    by_cpu = loader_cores * 1000 / cost["ms_per_clip"]
    by_network = network_gbps * 1e9 / 8 / cost["bytes_per_clip"]
    return min(by_cpu, by_network)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gpu-clips-per-s", type=float, default=40.0, help="training clips/s one GPU consumes (format decision)")
    p.add_argument("--loader-cores", type=int, default=64, help="decoding cores of an 8-GPU node (format decision)")
    p.add_argument("--network-gbps", type=float, default=25.0, help="network of an 8-GPU node (format decision)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out_dir = ROOT / "bench-out" / "preprocess-src"
    csv = make_sources(out_dir, args.videos)
    listed = [line.split(",")[0] for line in csv.read_text().splitlines()[1:]]
    source_bytes = sum((out_dir / rel).stat().st_size for rel in listed)

    import ray

    from pipelines.raycluster import RayConfig, ensure_ray

    ensure_ray(RayConfig(num_cpus=2))
    # Warm-up job (not timed) before every timed Ray run, with the same number of workers: on a cluster,
    # worker processes are up (modules imported) long before the bulk of a job; Ray retires idle workers
    # between runs here, and a fresh worker's imports would be charged to a 30-second job.
    warmup_csv = make_sources(ROOT / "bench-out" / "preprocess-warmup", 4, frames=30, size=(108, 192))
    times: dict[str, list[float]] = {"loop": [], "ray_1": [], "ray_2": []}
    results = {}
    for r in range(args.rounds):
        order = ["loop", "ray_1", "ray_2"] if r % 2 == 0 else ["ray_2", "ray_1", "loop"]
        for name in order:
            if name == "loop":
                times[name].append(plain_loop(csv))
            else:
                ray_job(warmup_csv, int(name[-1]))
                seconds, results[name] = ray_job(csv, int(name[-1]))
                times[name].append(seconds)
            print(f"  round {r + 1} {name:6s} {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    mjpeg_seconds, results["mjpeg"] = ray_job(csv, 2, codec="mjpeg")
    ray.shutdown()

    rate = {k: args.videos / statistics.median(v) for k, v in times.items()}
    h264_manifest, h264_samples = results["ray_2"]
    mjpeg_manifest, mjpeg_samples = results["mjpeg"]
    costs = {"h264": clip_cost(h264_samples), "mjpeg": clip_cost(mjpeg_samples)}
    feasible = {k: feasible_clips_per_s(c, args.loader_cores, args.network_gbps) for k, c in costs.items()}
    demand = 8 * args.gpu_clips_per_s
    feeding = [codec for codec in feasible if feasible[codec] >= demand]
    chosen = (min(feeding, key=lambda c: costs[c]["bytes_per_clip"]) if feeding else max(feasible, key=feasible.get))
    # memory: 500 inputs cycled over 50 small sources (the growth being looked for is per video, not per pixel)
    memory = memory_run(make_sources(ROOT / "bench-out" / "preprocess-small", 50, frames=30, size=(108, 192)))
    result = {
        "benchmark": "preprocess",
        "videos": args.videos,
        "source": f"{SOURCE_SIZE[1]}x{SOURCE_SIZE[0]} {SOURCE_FRAMES} frames @30fps",
        "rounds": args.rounds,
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "videos_per_s": {k: round(v, 3) for k, v in rate.items()},
        "ray1_vs_loop_per_core": rate["ray_1"] / rate["loop"],
        "ray2_vs_ray1": rate["ray_2"] / rate["ray_1"],
        "shard_bytes_vs_source": {"h264": sum(s.bytes for s in h264_manifest.shards) / source_bytes,
                                  "mjpeg": sum(s.bytes for s in mjpeg_manifest.shards) / source_bytes},
        "mjpeg_job_seconds": round(mjpeg_seconds, 2),
        "clip_cost": costs,
        "format_budget": {"loader_cores": args.loader_cores, "network_gbps": args.network_gbps,
                          "node_demand_clips_per_s": demand},
        "feasible_clips_per_s": {k: round(v) for k, v in feasible.items()},
        "chosen_codec": chosen,
        "memory": memory,
        "memory_flat": memory["ratio_500_vs_50"] <= 1.10,
    }
    print("\n| measure | value |\n|---|---|")
    print(f"| plain PyAV loop, 1 process | {rate['loop']:.2f} videos/s |")
    print(f"| Ray job, 1 worker | {rate['ray_1']:.2f} videos/s ({result['ray1_vs_loop_per_core']:.2f}x the loop per core) |")
    print(f"| Ray job, 2 workers | {rate['ray_2']:.2f} videos/s ({result['ray2_vs_ray1']:.2f}x 1 worker) |")
    for codec in ("h264", "mjpeg"):
        c = costs[codec]
        print(f"| {codec}: shards / source bytes | {result['shard_bytes_vs_source'][codec]:.2f} |")
        print(f"| {codec}: one 16x4 clip | {c['ms_per_clip']:.1f} CPU ms, {c['bytes_per_clip'] / 1e3:.0f} kB read |")
        print(f"| {codec}: clips/s an 8-GPU node can feed ({args.loader_cores} cores, {args.network_gbps:g} Gb/s) | {feasible[codec]:.0f} |")
    print(f"| stored format chosen (smallest that feeds 8 GPUs x {args.gpu_clips_per_s:g} clips/s) | {chosen} |")
    print(f"| worker RSS after video 50 / 500 | {memory['rss_mib'][50]} / {memory['rss_mib'][500]} MiB ({memory['ratio_500_vs_50']:.3f}x) |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
