"""Test-only batch stages shipped to Ray workers (tests/ is on their path: conftest's ray_cluster)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mosaic.tools.evaluate import ReplayStage


class StallFirstBatch(ReplayStage):
    """The real generation stage, except that the first worker to get a batch writes its pid to
    `claim_dir/victim.pid` and stalls there until it is killed (the test kills it)."""

    def __init__(self, claim_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.claim = Path(claim_dir) / "victim.pid"

    def __call__(self, rows):
        try:
            fd = os.open(self.claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().__call__(rows)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(600)  # killed long before
        raise RuntimeError("the test did not kill this worker")


def stall_first_responses(**kwargs):
    """The real annotation stage (`mosaic.eval.annotate.AnnotateStage`), except that the first
    worker to ask its judge for response atoms writes its pid to `victim.pid` beside the atom
    cache and stalls there until it is killed (the test kills it): its batch's prompt atoms are
    judged and committed, its response atoms are not."""

    from mosaic.eval.annotate import AnnotateStage

    stage = AnnotateStage(**kwargs)
    claim = Path(kwargs["cache_path"]).parent / "victim.pid"
    inner = stage.judge.response_atoms

    def response_atoms(*args, **kw):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return inner(*args, **kw)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(600)  # killed long before
        raise RuntimeError("the test did not kill this worker")

    stage.judge.response_atoms = response_atoms
    return stage


@contextmanager
def killing_the_stalled_worker(victim: Path) -> Iterator[list[int]]:
    """While the block runs, SIGKILL the process whose pid a stalled stage wrote to `victim`
    (a real kill of a Ray actor's process, once); yields the list of killed pids."""
    killed: list[int] = []
    done = threading.Event()

    def kill() -> None:
        while not done.is_set() and not killed:
            if victim.is_file() and victim.read_text():
                pid = int(victim.read_text())
                assert pid != os.getpid()
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        done.set()
        killer.join(timeout=5)

