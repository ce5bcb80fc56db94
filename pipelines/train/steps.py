"""One optimizer step out of several micro-batches (gradient accumulation), and the check that it is finite.

The recipe fixes the global batch (`global_batch_size`); each rank trains `batch_size` clips per forward
pass, so a step takes `global_batch / batch_size` micro-batches spread over the ranks, each accumulating
its share (`BatchPlan` in train/config.py). The global batch, and with it the learning rate and the number
of steps per epoch, then stay those of the recipe whatever the number of workers (elastic training
changes the world size, not the recipe).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from pipelines.scoring import all_reduce_sum

T = TypeVar("T")


def grouped(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive groups of `size` items (a shorter last group is dropped: it would be a partial step)."""
    iterator = iter(items)
    while len(group := list(itertools.islice(iterator, size))) == size:
        yield group


def accumulate_gradients(model: torch.nn.Module, micro_batches: Sequence[T], loss_of: Callable[[T], torch.Tensor],
                         scale: float) -> torch.Tensor:
    """Backward of `scale` x each micro-batch's loss, so the gradients add up over the micro-batches (with
    `BatchPlan.loss_scale`, to those of one batch of every rank's clips). DDP all-reduces only on the last
    backward (`no_sync` before it). Returns the sum of the micro-batch losses (unscaled, detached)."""
    total = torch.zeros((), dtype=torch.float64)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            loss = loss_of(batch)
            (loss * scale).backward()
        total += loss.detach().double().cpu()
    return total


@dataclass(frozen=True)
class StepCheck:
    finite: bool  # the loss and the gradient norm were finite on every rank
    mean_loss: float  # the loss averaged over every micro-batch of every rank (nan when not finite)


def check_step(loss_sum: torch.Tensor | float, grad_norm: torch.Tensor | float, micro_batches: int) -> StepCheck:
    """One all-reduce: whether the step is finite on every rank (so all ranks skip, or all take, the same
    optimizer step) and the mean loss over the step's `micro_batches` micro-batches (the ranks' loss sums
    added up): what the progress line and MLflow show."""
    loss_sum, grad_norm = float(loss_sum), float(grad_norm)
    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
    bad, total = all_reduce_sum(torch.tensor([0.0 if finite else 1.0, loss_sum if finite else 0.0], dtype=torch.float64))
    if bad:
        return StepCheck(False, float("nan"))
    return StepCheck(True, float(total) / micro_batches)
