"""Every random generator a rank's training step draws from, as plain data a checkpoint can hold.

The model's randomness (drop-path) draws from torch's global generator, seeded per rank by the loop; numpy
and python's generators are saved too, so a library that draws from them cannot break an exact resume.
The data stream keeps no generator state: it is a function of (seed, epoch, rank, position) (see
pipelines/data/loader.py). States are stored as tensors and tuples, which `torch.load(weights_only=True)`
reads back.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def capture(device: torch.device) -> dict[str, Any]:
    """This process's generator states."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["position"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather(device: torch.device, world: int) -> list[dict[str, Any]]:
    """Every rank's states in rank order (a collective: every rank calls it; all get the list)."""
    mine = capture(device)
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine)
    return states


def reseed(seed: int, rank: int, step: int) -> None:
    """Fresh generators for a rank that has no saved state (the first start, or a resume with another
    number of ranks): a function of (seed, rank, step), so that case too is repeatable."""
    value = (seed * 1009 + rank + 1) * 1_000_003 + step
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
