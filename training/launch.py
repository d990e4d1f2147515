"""The accelerate launcher: the same trainer (`train.fit`) as several ranks under torchrun.

`training.launcher: accelerate` makes `train_adapter` write the job to a file and start
`python -m torch.distributed.run --standalone --nproc_per_node N -m mosaic.training.rank JOB`
(one rank: `training/rank.py`).
Each rank reads the same training file, builds the same trl trainer, and the trainer's
Accelerator takes the distributed setup from torchrun's environment: DDP over NCCL on GPUs (one
rank per GPU), over gloo on CPU, FSDP2 with `training.fsdp`. The global batch is the config's
batch size whatever the process count (training/settings.py splits it over ranks and
accumulation steps). Rank 0 saves the adapter into the staging folder and writes the step count
and last loss; `train_adapter` then publishes the folder and its TrainResult exactly as the
in-process path does, so the adapter and manifest are the same format.

torchrun, not `accelerate launch`: on CPU `accelerate launch --cpu --num_processes 2` runs one
process (its multi-CPU path wants an MPI hostfile), while torchrun gives N ranks over gloo; on
GPUs `accelerate launch --multi_gpu` is torchrun underneath, and the trainer configures
accelerate itself from its arguments either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mosaic.io import atomic_write_json

JOB_FILE = "launch_job.json"
RESULT_FILE = "launch_result.json"
LOG_FILE = "launch.log"


class LaunchError(RuntimeError):
    """The ranks did not finish; the message holds the tail of their log."""


def fit_distributed(data: Any, work: Path, staged: Path, *, base_model: str | Path,
                    training: Any, max_length: int, method: str,
                    device: str | None, dtype: str, threads: int | None
                    ) -> tuple[int, float | None]:
    """Run `train.fit` as `training.processes` ranks under torchrun; (steps, last loss)."""
    from mosaic.training.threads import usable_cores

    data_file = Path(data) if isinstance(data, (str, Path)) else work / "train.jsonl"
    if not isinstance(data, (str, Path)):
        with open(data_file, "w", encoding="utf-8") as f:
            for row in data:
                f.write(json.dumps(row) + "\n")
    n = training.processes
    on_cpu = not _cuda_available() or (device or "").startswith("cpu")
    # Ranks share this machine's cores on CPU; on GPUs the trainer sets its own threads.
    rank_threads = threads or max(1, usable_cores() // n)
    job = {"data": str(data_file), "base_model": str(base_model),
           "training": training.model_dump(mode="json"), "max_length": max_length,
           "method": method, "device": "cpu" if on_cpu else None, "dtype": dtype,
           "threads": rank_threads if on_cpu else threads, "staged": str(staged),
           "output_dir": str(work / "trainer"), "result": str(work / RESULT_FILE)}
    atomic_write_json(work / JOB_FILE, job)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", "-m", "mosaic.training.rank", str(work / JOB_FILE)]
    env = {**os.environ, "OMP_NUM_THREADS": str(rank_threads)}
    log_path = work / LOG_FILE
    with open(log_path, "wb") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=os.getcwd())
    if proc.returncode != 0 or not (work / RESULT_FILE).is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise LaunchError(f"distributed training ({n} ranks under torchrun) failed with exit "
                          f"code {proc.returncode}; the end of its log:\n{tail}")
    result = json.loads((work / RESULT_FILE).read_text(encoding="utf-8"))
    return int(result["steps"]), result["final_loss"]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
