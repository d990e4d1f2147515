"""Where a DPO training call's CPU time goes: one `train_adapter` call on a DPO training file,
split into the reference pass, the optimiser steps and the rest (loading, tokenising, saving),
then optionally under cProfile (the functions with the most time of their own).

    .venv/bin/python bench/dpo_profile.py DATA [--config configs/sandbox.yaml]
        [--layout packed|trl] [--method dpo|sft+dpo] [--profile] [--top 25]

DATA is a DPO build's training file (`bench/dpo_vs_sft.py --keep DIR` leaves it at
DIR/data_dpo/dataset/train.parquet). Training runs on one CPU thread with the config's
training settings, like the bench's rows; every figure is printed beside the 1-minute load.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_sft import load, phase_clock  # noqa: E402  (a sibling script, not a package)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--config", default="configs/sandbox.yaml")
    ap.add_argument("--layout", choices=("packed", "trl"), default="packed")
    ap.add_argument("--method", choices=("dpo", "sft+dpo"), default="dpo")
    ap.add_argument("--profile", action="store_true", help="run under cProfile (slower)")
    ap.add_argument("--top", type=int, default=25)
    opts = ap.parse_args()
    if not opts.data.is_file():
        print(f"training file not found: {opts.data}", file=sys.stderr)
        sys.exit(2)

    from mosaic.config import load_config
    from mosaic.sandbox.base_model import ensure_base_model
    from mosaic.training.train import train_adapter

    config = load_config(opts.config, overrides={"runtime": {"threads": 1}})
    base_model = ensure_base_model(config)
    training = config.training.model_copy(update={"dpo_packed": opts.layout == "packed"})
    profiler = cProfile.Profile() if opts.profile else None
    with tempfile.TemporaryDirectory(prefix="dpo-profile-") as work, phase_clock() as phases:
        c0, w0 = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        res = train_adapter(opts.data, base_model=base_model, adapter_dir=Path(work) / "a",
                            training=training, max_length=config.model.max_length,
                            method=opts.method, progress=False, threads=1)
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    rest = cpu - phases["ref_pass"] - phases["steps"]
    print(f"{opts.layout} {opts.method}: {res.train_rows} pairs, {res.steps} steps, "
          f"final loss {res.final_loss:.4f}{' (under cProfile)' if profiler else ''}")
    print(f"CPU s {cpu:.1f} = reference pass {phases['ref_pass']:.1f} + steps "
          f"{phases['steps']:.1f} + rest {rest:.1f};  wall s {wall:.1f};  load {load()}  "
          f"(cores {os.cpu_count()})")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(opts.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
