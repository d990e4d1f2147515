"""Test-only batch stages shipped to Ray workers (tests/ is on their path: conftest's ray_cluster)."""

from __future__ import annotations

import os
import time
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
