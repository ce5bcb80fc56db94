"""Progress a person can read: every `log_every_steps` steps one console line on rank 0, and the same
numbers as MLflow metrics.

    [train] epoch 3/20 step 130/400 (32%) loss 1.2345 lr 2.10e-04 | 45.2 clips/s, data wait 12% | ETA 5m12s

Throughput, data wait and ETA are measured over the steps since the previous line: the data-wait
fraction is the share of that wall time the loop spent blocked on the loader (near 1: decoding is the
bottleneck, add loader_workers or CPUs); the ETA extrapolates that pace to the remaining steps (it does
not count the remaining validations and checkpoints).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


def duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class Progress:
    epochs: int
    steps_per_epoch: int
    clock: Callable[[], float] = time.perf_counter
    _start: float = field(default=0.0, init=False)
    _steps: int = field(default=0, init=False)
    _clips: int = field(default=0, init=False)
    _waited: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._start = self.clock()

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def timed(self, items: Iterable[T]) -> Iterator[T]:
        """`items`, counting the time spent waiting for each one as data wait."""
        iterator = iter(items)
        while True:
            started = self.clock()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self._waited += self.clock() - started
            yield item

    def stepped(self, clips: int) -> None:
        """One optimizer step over `clips` clips (all ranks together)."""
        self._steps += 1
        self._clips += clips

    def report(self, *, step: int, epoch: int, loss: float, lr: float) -> tuple[str, dict[str, float]]:
        """The console line and the metrics for the steps since the last report; starts a new window."""
        elapsed = max(self.clock() - self._start, 1e-9)
        clips_per_s = self._clips / elapsed
        data_wait = min(1.0, self._waited / elapsed)
        eta = (self.total_steps - step) * elapsed / max(1, self._steps)
        line = (f"[train] epoch {epoch + 1}/{self.epochs} step {step}/{self.total_steps} "
                f"({100 * step / max(1, self.total_steps):.0f}%) loss {loss:.4f} lr {lr:.2e} | "
                f"{clips_per_s:.1f} clips/s, data wait {100 * data_wait:.0f}% | ETA {duration(eta)}")
        metrics = {"train/loss": loss, "train/lr": lr, "train/clips_per_s": clips_per_s,
                   "train/data_wait_fraction": data_wait, "train/eta_s": eta}
        self._start, self._steps, self._clips, self._waited = self.clock(), 0, 0, 0.0
        return line, metrics
