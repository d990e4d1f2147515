"""Ray engine scaling: eval generation and pool annotation through Ray Data, 1 worker against 2.

Two stages, each run through `mosaic.engine.map_rows` on a local Ray cluster of this machine's
cores, each worker one actor with one CPU and one intra-op thread (so the question is how well
the stage spreads over actors, not over threads):

- generation: the evaluate tool's own stage (`ReplayStage`: the configured backend replaying
  eval rows turn by turn, greedy) over the sandbox's eval sets;
- annotation: `mosaic annotate`'s (`AnnotateStage`: the configured judge, the sandbox's rule
  judge, labelling L3 atoms, then L2 and L1) over the sandbox's training pools with their
  annotations removed, a fresh atom cache per timed run, one pipeline per pool as
  `mosaic annotate` runs them.

Baseline in the same run: the local engine (one process). Times include building the workers
(loading the model or the judge), as a round pays them; every configuration's replies and
annotated pools are checked equal to the local path's. Each pipeline's clock starts once the
cluster is idle (the previous pipeline's actors gone). Target on the 2-core sandbox machine:
2 workers >= 1.6x faster than 1, per stage.

    .venv/bin/python bench/ray_bench.py                  # sandbox world, all rows, 3 repeats
    .venv/bin/python bench/ray_bench.py --quick          # tiny world and model: a smoke run
    .venv/bin/python bench/ray_bench.py --stages annotation --pool-copies 10   # 108,000 rows
    .venv/bin/python bench/ray_bench.py --stages generation --eval-copies 4   # 2,880 eval rows

Prints a table and writes `ray_bench.json` to `--out`. Contended machines give contended
figures: the 1-minute load average (os.getloadavg) is printed beside every figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def eval_rows(cfg, limit: int | None, copies: int = 1) -> list[dict[str, Any]]:
    """The sandbox's eval rows (every objective), `limit` of them spread evenly; `copies` > 1
    repeats them, each copy's first user turn marked " [copy k]" so every copy is generated
    anew (the eval load of a larger suite, where generation, not the workers' start, is most
    of the time)."""
    from mosaic.tools.evaluate import load_eval_rows

    rows = []
    for name, obj in cfg.objectives.items():
        for r in load_eval_rows(obj.eval, name, obj.type):
            rows.append({"id": f"{name}/{r['id']}", "system": r["system"],
                         "turns": list(r["turns"])})
    if limit is not None and limit < len(rows):
        rows = [rows[(k * len(rows)) // limit] for k in range(limit)]
    base = list(rows)
    for k in range(1, copies):
        rows += [{**r, "id": f"{r['id']}#copy{k}",
                  "turns": [f"{r['turns'][0]} [copy {k}]", *r["turns"][1:]]} for r in base]
    return rows


def unannotated_pools(cfg, copies: int = 1) -> dict[str, tuple[str, Any]]:
    """Each objective's pool as a team would import it: no L1, L2 or response atoms, and no
    prompt atoms where a judge labels them (instruction prompt atoms come with the data).
    `copies` > 1 repeats each pool, each copy's conversations marked " [copy k]" at the end of
    their last message (so the judge labels every copy, not once per batch): a larger pool
    where the judging, not the workers' start, is most of the time."""
    import pandas as pd

    from mosaic.data import L1_COLUMNS, load_pool
    from mosaic.eval.base import get_objective_type

    out = {}
    for name, obj in cfg.objectives.items():
        otype = get_objective_type(obj.type)
        drop = {"l3_response", *L1_COLUMNS, *(f"l2_{f}" for f in otype.l2_columns)}
        if not otype.prompt_atoms_from_data:
            drop.add("l3_prompt")
        df = load_pool(obj.pool, obj.type, name)
        df = df.drop(columns=[c for c in df.columns if c in drop])
        if copies > 1:
            parts = [df]
            for k in range(1, copies):
                part = df.copy()
                part["id"] = [f"{i}#copy{k}" for i in part["id"]]
                part["messages"] = [[*list(m)[:-1], {**dict(list(m)[-1]), "content":
                                                     f"{list(m)[-1]['content']} [copy {k}]"}]
                                    for m in part["messages"]]
                parts.append(part)
            df = pd.concat(parts, ignore_index=True)
        out[name] = (obj.type, df)
    return out


def load() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "sandbox.yaml"))
    parser.add_argument("--out", default="runs/bench/ray")
    parser.add_argument("--rows", type=int, default=None, help="eval rows (default: all)")
    parser.add_argument("--batch-rows", type=int, default=None,
                        help="generation: rows per batch to a worker (default: as `mosaic run`, "
                             "runtime.ray.batch_rows or inference.batch_size)")
    parser.add_argument("--annotate-batch", type=int, default=256,
                        help="annotation: rows per batch to a worker")
    parser.add_argument("--eval-copies", type=int, default=1,
                        help="generation: the eval rows repeated this many times, each copy's "
                             "first turn marked (1: the sandbox's eval sets as they are)")
    parser.add_argument("--pool-copies", type=int, default=1,
                        help="annotation: each pool repeated this many times, each copy's "
                             "text marked (a larger pool; 1: the sandbox's pools as they are)")
    parser.add_argument("--judge", default=None, choices=["rule", "embedding"],
                        help="annotation: the judge (default: the config's; embedding: the "
                             "offline sentence-embedding judge, real compute per row)")
    parser.add_argument("--stages", default="generation,annotation",
                        help="stages to time (generation, annotation)")
    parser.add_argument("--workers", default="1,2", help="pool sizes to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (min)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny world and model, 1 repeat (a smoke run of this script)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import pandas as pd
    import ray

    from mosaic.config import load_config
    from mosaic.engine import map_rows
    from mosaic.eval.annotate import AtomCache, annotate_pool
    from mosaic.eval import build_judge
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
    if args.judge is not None:
        # The embedding judge is measured on real text; on the sandbox's it is a workload here.
        cfg = cfg.model_copy(update={"judge": cfg.judge.model_copy(
            update={"kind": args.judge, "allow_out_of_range": True})})
    stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    unknown = set(stages) - {"generation", "annotation"}
    if unknown or not stages:
        parser.error(f"--stages: unknown {sorted(unknown)}; use generation and/or annotation")
    workers = [int(w) for w in args.workers.split(",")]
    results: dict[str, dict[str, Any]] = {}
    checks: dict[str, bool] = {}

    def record(stage: str, setting: str, seconds: float, **extra: Any) -> None:
        entry = results.setdefault(stage, {}).setdefault(setting, {"seconds": [], "load": []})
        entry["seconds"].append(seconds)
        entry["load"].append(load())
        entry.update(extra)
        print(f"  {stage}, {setting}: {seconds:.1f}s (load average {load():.2f})", flush=True)

    def ray_runtime(w: int):
        return cfg.runtime.model_copy(update={
            "engine": "ray", "ray": cfg.runtime.ray.model_copy(
                update={"workers": w, "cpus_per_worker": 1})})

    # ---- generation ------------------------------------------------------------------------
    if args.batch_rows is None:
        args.batch_rows = cfg.runtime.ray.batch_rows or cfg.inference.batch_size
    rows = eval_rows(cfg, args.rows, args.eval_copies)
    stage_kwargs = {"config": cfg.model_dump(mode="json"), "model_dir": model,
                    "adapter_dir": None}

    def wait_idle() -> None:
        """Until the previous pipeline's actors have given their CPUs back (seconds on a loaded
        machine): timing a pipeline that queues behind the last one's teardown would charge
        that teardown to 2 workers only (1 worker leaves a CPU free for the next pool)."""
        if not ray.is_initialized():
            return
        total = ray.cluster_resources().get("CPU", 0)
        deadline = time.monotonic() + 120
        while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
            time.sleep(0.1)

    def generate(runtime, threads: int | None) -> tuple[float, list[Any]]:
        wait_idle()
        start = time.perf_counter()
        got = map_rows(ReplayStage, rows, kwargs={**stage_kwargs, "threads": threads},
                       runtime=runtime, batch_rows=args.batch_rows, what="ray bench")
        return time.perf_counter() - start, got

    # ---- annotation ------------------------------------------------------------------------
    pools = unannotated_pools(cfg, args.pool_copies) if "annotation" in stages else {}
    judge = build_judge(cfg, request_cache=False, record_endpoint_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix="ray-bench-cache-"))

    def annotate(config) -> tuple[float, dict[str, Any], float]:
        """Every pool annotated (one pipeline per pool), a fresh atom cache: seconds, frames,
        and the busiest worker's seconds in the stage itself (summed over the pools)."""
        cache = AtomCache(Path(tempfile.mkdtemp(dir=scratch)) / "annotate.sqlite")
        seconds, busiest, frames = 0.0, 0.0, {}
        try:
            for name, (type_name, df) in pools.items():
                wait_idle()
                start = time.perf_counter()
                got = annotate_pool(df, type_name, judge, batch_size=args.annotate_batch,
                                    cache=cache, ray_config=config)
                seconds += time.perf_counter() - start
                frames[name] = got.frame
                busiest += max(got.worker_seconds.values(), default=0.0)
            return seconds, frames, busiest
        finally:
            cache.close()

    n_pool_rows = sum(len(df) for _, df in pools.values())
    print(f"load average {load():.2f} before the run", flush=True)
    if "generation" in stages:
        print(f"generation: {len(rows)} eval rows ({sum(len(r['turns']) for r in rows)} user "
              f"turns), batches of {args.batch_rows}", flush=True)
    if "annotation" in stages:
        print(f"annotation: {n_pool_rows} pool rows of {len(pools)} pools, batches of "
              f"{args.annotate_batch}, the {cfg.judge.kind} judge", flush=True)

    references: dict[str, Any] = {}
    if "generation" in stages:
        s_, references["generation"] = generate(cfg.runtime.model_copy(update={"engine": "local"}),
                                                None)
        record("generation", "local", s_)
    if "annotation" in stages:
        s_, references["annotation"], _ = annotate(None)
        record("annotation", "local", s_)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        for w in workers:
            for _ in range(args.repeats):
                if "generation" in stages:
                    s_, got = generate(ray_runtime(w), 1)
                    if got != references["generation"]:
                        raise SystemExit(f"{w} Ray workers gave other replies than the local path")
                    checks["generation"] = True
                    record("generation", f"ray_{w}", s_, workers=w)
                if "annotation" in stages:
                    on_ray = cfg.model_copy(update={"runtime": ray_runtime(w)})
                    s_, frames, busiest = annotate(on_ray)
                    for name, frame in frames.items():
                        # Raises (and so fails the bench) where a row or value differs.
                        pd.testing.assert_frame_equal(frame, references["annotation"][name])
                    checks["annotation"] = True
                    record("annotation", f"ray_{w}", s_, workers=w)
                    busy = results["annotation"][f"ray_{w}"].setdefault("busiest_worker_s", [])
                    busy.append(busiest)
                    print(f"    busiest worker {busiest:.1f}s in the stage itself; the rest is "
                          f"Ray starting workers and moving rows", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    best = {stage: {k: min(v["seconds"]) for k, v in by.items()} for stage, by in results.items()}
    speedups = {stage: (b["ray_1"] / b["ray_2"]) if {"ray_1", "ray_2"} <= set(b) else None
                for stage, b in best.items()}
    summary = {"schema_version": 2, "quick": args.quick, "repeats": args.repeats,
               "cpus": os.cpu_count(),
               "generation": {"rows": len(rows), "batch_rows": args.batch_rows,
                              "eval_copies": args.eval_copies}
               if "generation" in stages else None,
               "annotation": {"rows": n_pool_rows, "batch_rows": args.annotate_batch,
                              "judge": cfg.judge.kind, "pool_copies": args.pool_copies}
               if "annotation" in stages else None,
               "results": results, "best_seconds": best, "speedup_2_vs_1": speedups,
               "target": 1.6, "load_average_end": load(),
               "same_as_local": {s_: checks.get(s_, False) for s_ in stages}}
    print(f"{'stage':<11} {'setting':<8} {'best s':>8} {'rows/s':>9} {'load':>6}")
    for stage, by in best.items():
        n = len(rows) if stage == "generation" else n_pool_rows
        for k, sec in by.items():
            ld = results[stage][k]["load"][results[stage][k]["seconds"].index(sec)]
            print(f"{stage:<11} {k:<8} {sec:>8.1f} {n / sec:>9.1f} {ld:>6.2f}")
    ann = results.get("annotation", {})
    if {"ray_1", "ray_2"} <= set(ann):
        stage_speedup = min(ann["ray_1"]["busiest_worker_s"]) / max(
            min(ann["ray_2"]["busiest_worker_s"]), 1e-9)
        summary["annotation_busy_speedup_2_vs_1"] = stage_speedup
        print(f"annotation, the stage itself (busiest worker's seconds): 2 workers vs 1: "
              f"{stage_speedup:.2f}x")
    for stage, sp in speedups.items():
        if sp is not None:
            verdict = "meets" if sp >= 1.6 else "misses"
            print(f"{stage}: 2 workers vs 1: {sp:.2f}x ({verdict} the 1.6x target); results "
                  f"identical to the local path; load average {load():.2f} at the end "
                  f"({os.cpu_count()} CPUs)")
    out.mkdir(parents=True, exist_ok=True)
    from mosaic.io import atomic_write_json

    atomic_write_json(out / "ray_bench.json", summary)
    print(f"results in {out / 'ray_bench.json'}")
    return summary


if __name__ == "__main__":
    main()
