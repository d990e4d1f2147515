"""One rank of the accelerate launcher (`training/launch.py`): run by torchrun, never by hand."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from mosaic.io import atomic_write_json


def run_rank(job: dict[str, Any]) -> None:
    """One rank: read the data, train with the shared trainer, rank 0 reports."""
    from mosaic.config import TrainingConfig
    from mosaic.training.models import check_model_dir, load_tokenizer
    from mosaic.training.train import fit, load_prepared

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = job["device"]
    if device is None:  # one GPU per rank
        import torch

        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    training = TrainingConfig.model_validate(job["training"])
    tokenizer = load_tokenizer(check_model_dir(job["base_model"]))
    prepared = load_prepared(job["data"], tokenizer, job["max_length"], job["method"])
    steps, final_loss = fit(prepared, Path(job["staged"]), base_model=job["base_model"],
                            tokenizer=tokenizer, training=training,
                            max_length=job["max_length"], method=job["method"],
                            output_dir=job["output_dir"], device=device, dtype=job["dtype"],
                            progress=False, threads=job["threads"], world_size=world_size)
    if rank == 0:
        atomic_write_json(job["result"], {"steps": steps, "final_loss": final_loss,
                                          "world_size": world_size})


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m mosaic.training.rank JOB.json (started by "
                         "train_adapter under torchrun; not meant to be run by hand)")
    try:
        run_rank(json.loads(Path(args[0]).read_text(encoding="utf-8")))
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process group while the interpreter is whole. Left to interpreter exit,
    gloo's worker threads can still hold work whose teardown aborts the rank ("terminate called
    without an active exception", seen once in tests/test_launcher.py on a loaded machine), and
    torchrun then fails the whole job after rank 0 has saved the adapter."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
