"""What one training checkpoint costs: write the full training state of a model (weights, AdamW state,
schedule, position, generators) with `artifact.save_training_state`, upload it the way Ray Train does
(pyarrow's copy_files to the storage path) and read it back. Use the figures to choose
`checkpoint_every_steps` (README, "Training that loses nothing").

    python benchmarks/bench_checkpoint.py [MODEL] [STORAGE]

MODEL defaults to mvit_b_16x4 (the Kinetics recipe); STORAGE to a local temporary directory; an s3://
prefix uploads to $AWS_ENDPOINT_URL (e.g. the server of `mvit stack up`). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import mvit
from pipelines import artifact
from pipelines.data import storage
from pipelines.train import rng


def main(model_name: str = "mvit_b_16x4", target: str = "") -> dict:
    torch.manual_seed(0)
    model = mvit.create_model(model_name, num_classes=400)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for param in model.parameters():  # one step, so AdamW holds its two moments per parameter
        param.grad = torch.zeros_like(param)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "ckpt"
        local.mkdir()
        started = time.perf_counter()
        path = artifact.save_training_state(local, model, optimizer, scheduler, epoch=0, step=1, model_name=model_name,
                                            train_config={}, label_map={str(i): i for i in range(400)},
                                            position={"epoch": 0, "step_in_epoch": 1},
                                            rng=[rng.capture(torch.device("cpu"))] * 8, world_size=8)
        save_s = time.perf_counter() - started
        size_mb = path.stat().st_size / 2**20
        destination = target or str(Path(tmp) / "storage")
        import pyarrow.fs

        filesystem, root = storage.pyarrow_filesystem(destination)
        filesystem = filesystem or pyarrow.fs.LocalFileSystem()  # what Ray Train uses for a local path

        started = time.perf_counter()
        filesystem.create_dir(f"{root.rstrip('/')}/ckpt", recursive=True)
        pyarrow.fs.copy_files(str(local), f"{root.rstrip('/')}/ckpt", destination_filesystem=filesystem)
        upload_s = time.perf_counter() - started
        started = time.perf_counter()
        artifact.load_state(storage.join(destination, "ckpt"))
        load_s = time.perf_counter() - started
        if target:
            storage.delete_prefix(storage.join(destination, "ckpt"))
    return {"model": model_name, "params_m": round(params / 1e6, 1), "checkpoint_mb": round(size_mb, 1),
            "save_s": round(save_s, 2), "upload_s": round(upload_s, 2), "load_s": round(load_s, 2),
            "storage": "s3" if storage.is_s3(destination) else "local"}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])), flush=True)
