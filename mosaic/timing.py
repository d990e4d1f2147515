"""Wall and CPU seconds per named stage, for benchmarks and progress lines.

    times = StageTimes()
    with times("generate"):
        ...
    times.wall["generate"], times.cpu["generate"]

CPU time is the process's (all threads), so on a machine shared with other jobs it shows how
much of the wall time was this process's work.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimes:
    """Accumulated wall and process-CPU seconds per stage name, in first-seen order."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu

    def add(self, other: "StageTimes", prefix: str = "") -> None:
        for name in other.wall:
            key = prefix + name
            self.wall[key] = self.wall.get(key, 0.0) + other.wall[name]
            self.cpu[key] = self.cpu.get(key, 0.0) + other.cpu[name]

    def total(self) -> tuple[float, float]:
        return sum(self.wall.values()), sum(self.cpu.values())


@contextmanager
def _nothing(name: str) -> Iterator[None]:
    yield


def stage_timer(times: StageTimes | None):
    """`times` itself, or a no-op timer with the same call shape."""
    return times if times is not None else _nothing
