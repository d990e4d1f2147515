"""Ray engine scaling: eval generation through Ray Data with 1 worker against 2 workers.

The stage is the evaluate tool's own (`ReplayStage`: the configured backend replaying eval rows
turn by turn, greedy), over the sandbox's eval sets, run through `mosaic.engine.map_rows` on a
local Ray cluster of this machine's cores. Each worker is one actor with one CPU and one
intra-op thread, so the question is how well the stage spreads over actors, not over threads.
Baseline in the same run: the local engine (one process, the thread policy). Times include
building the workers (loading the model), as a round pays them; the replies of every
configuration are checked equal to the local path's. Target on the 2-core sandbox machine:
2 workers >= 1.6x faster than 1.

    .venv/bin/python bench/ray_bench.py                  # sandbox world, all eval rows, 3 repeats
    .venv/bin/python bench/ray_bench.py --quick          # tiny world and model: a smoke run

Prints a table and writes `ray_bench.json` to `--out`. Contended machines give contended
figures: the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def eval_rows(cfg, limit: int | None) -> list[dict[str, Any]]:
    from mosaic.tools.evaluate import load_eval_rows

    rows = []
    for name, obj in cfg.objectives.items():
        for r in load_eval_rows(obj.eval, name, obj.type):
            rows.append({"id": f"{name}/{r['id']}", "system": r["system"],
                         "turns": list(r["turns"])})
    if limit is not None and limit < len(rows):
        rows = [rows[(k * len(rows)) // limit] for k in range(limit)]
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "sandbox.yaml"))
    parser.add_argument("--out", default="runs/bench/ray")
    parser.add_argument("--rows", type=int, default=None, help="eval rows (default: all)")
    parser.add_argument("--batch-rows", type=int, default=32, help="rows per batch to a worker")
    parser.add_argument("--workers", default="1,2", help="pool sizes to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (min)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny world and model, 1 repeat (a smoke run of this script)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import ray

    from mosaic.config import load_config
    from mosaic.engine import map_rows
    from mosaic.sandbox import ensure_world
    from mosaic.sandbox.base_model import ensure_base_model
    from mosaic.tools.evaluate import ReplayStage

    out = Path(args.out)
    if args.quick:
        from search_quality import quick_base_model, quick_overrides

        out = out / "quick"
        cfg = load_config(args.config, overrides=quick_overrides(out))
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"base": quick_base_model(cfg, out)})})
        args.repeats = 1
        model = cfg.model.base
    else:
        cfg = load_config(args.config)
        if cfg.world.kind == "sandbox":
            ensure_world(cfg.world)
        model = str(ensure_base_model(cfg))
    rows = eval_rows(cfg, args.rows)
    workers = [int(w) for w in args.workers.split(",")]
    stage_kwargs = {"config": cfg.model_dump(mode="json"), "model_dir": model,
                    "adapter_dir": None}
    print(f"{len(rows)} eval rows ({sum(len(r['turns']) for r in rows)} user turns), batches of "
          f"{args.batch_rows}; load average {os.getloadavg()[0]:.2f}", flush=True)

    def timed(runtime, threads: int | None) -> tuple[float, list[Any]]:
        start = time.perf_counter()
        got = map_rows(ReplayStage, rows, kwargs={**stage_kwargs, "threads": threads},
                       runtime=runtime, batch_rows=args.batch_rows, what="ray bench")
        return time.perf_counter() - start, got

    results: dict[str, Any] = {}
    local_s, reference = timed(cfg.runtime.model_copy(update={"engine": "local"}), None)
    results["local"] = {"seconds": [local_s]}
    print(f"  local engine (thread policy): {local_s:.1f}s", flush=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        for w in workers:
            runtime = cfg.runtime.model_copy(update={
                "engine": "ray", "ray": cfg.runtime.ray.model_copy(
                    update={"workers": w, "cpus_per_worker": 1})})
            times = []
            for _ in range(args.repeats):
                s, got = timed(runtime, 1)
                if got != reference:
                    raise SystemExit(f"{w} Ray workers gave other replies than the local path")
                times.append(s)
                print(f"  ray, {w} worker(s): {s:.1f}s", flush=True)
            results[f"ray_{w}"] = {"workers": w, "seconds": times}
    finally:
        ray.shutdown()

    best = {k: min(v["seconds"]) for k, v in results.items()}
    speedup = (best["ray_1"] / best["ray_2"]) if {"ray_1", "ray_2"} <= set(best) else None
    summary = {"schema_version": 1, "rows": len(rows), "batch_rows": args.batch_rows,
               "repeats": args.repeats, "quick": args.quick, "results": results,
               "best_seconds": best, "speedup_2_vs_1": speedup, "target": 1.6,
               "load_average": os.getloadavg()[0], "same_replies": True}
    out.mkdir(parents=True, exist_ok=True)
    from mosaic.io import atomic_write_json

    atomic_write_json(out / "ray_bench.json", summary)
    print(f"{'setting':<12} {'best s':>8} {'rows/s':>8}")
    for k, s in best.items():
        print(f"{k:<12} {s:>8.1f} {len(rows) / s:>8.1f}")
    if speedup is not None:
        verdict = "meets" if speedup >= 1.6 else "misses"
        print(f"2 workers vs 1: {speedup:.2f}x ({verdict} the 1.6x target); replies identical to "
              f"the local path; load average {summary['load_average']:.2f}")
    print(f"results in {out / 'ray_bench.json'}")
    return summary


if __name__ == "__main__":
    main()
