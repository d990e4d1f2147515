"""Search quality: does slice-aware curation beat the alternatives at equal budget?

Every method runs the same closed loop (agents/runner.py) from the same base model on the same
pools, token budget per round, number of rounds and seeds; only the planner differs:

    uniform            one static equal mixture, all buckets, no threshold
    random             a random action each round from the same space (the paper's baseline)
    tpe, nsga2         Optuna samplers over that space (mixture, per-objective bucket weights and
                       quality thresholds), one trial per round, told each round's eval scores;
                       TPE's start-up trials and NSGA-II's population are `--startup` (default 2:
                       Optuna's defaults of 10 and 50 would make five rounds pure random search)
    mosaic-heuristic   the default planner (failure reports -> action)
    mosaic-llm         the LLM planner, only when the config has planner.endpoint

Scores per method and seed (tools/benchmark.py): hypervolume of the Pareto set of its rounds on
the eval sets against the baseline's scores, against the lower ends of the baseline's CIs and
against all 1s; hypervolume by round and the rounds needed to reach a target (a share,
`--target`, of the best hypervolume any run reached) — both against all 1s, because on the
sandbox the base model's boundary score (4.93 of 5) leaves no room above it and the strict
reference scores every run 0; best score per objective; the max-min improvement round as the
final point and its held-out scores; wall time. Then mean ± std over seeds, and paired
differences of each MOSAIC method against every baseline (sign test over seeds, bootstrap CI),
printed against `random` and the better Optuna sampler. Output: a table, `results.json` and
`hv_by_round.svg` in `--out`.

Cost: every (method, seed) run lives in its own run folder and resumes, so an interrupted
benchmark picks up where it stopped; trained adapters and generated replies are cached by
content across runs (`cache.stages_dir`), so an action already trained is not trained again;
`--jobs` runs that many loops in parallel processes (OMP_NUM_THREADS=1; the thread policy,
training/threads.py, keeps each on one thread while the others are busy and may widen a
loop left running alone). `--engine ray` runs the loops as Ray tasks instead, on a local
cluster of `--jobs` CPUs or on the cluster at `--ray-address` (every node needs MOSAIC, the
config's paths and the output folder on a shared filesystem); results are the same.

    .venv/bin/python bench/search_quality.py                 # 3 seeds x 5 rounds, all methods
    .venv/bin/python bench/search_quality.py --quick         # tiny world, 2 rounds, 1 seed
    .venv/bin/python bench/search_quality.py --quick --engine ray --out runs/bench/sq-ray
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("uniform", "random", "tpe", "nsga2")
METHODS = (*BASELINES, "mosaic-heuristic", "mosaic-llm")
RUN_TIMING_FILE = "bench_run.json"
# The hypervolumes compared between methods: against the baseline's scores, against the lower
# ends of its 95% CIs (tools/benchmark.py says why both), and against all 1s.
HV_MEASURES = ("hv_vs_baseline", "hv_vs_baseline_ci", "hv_vs_ones")


def quick_overrides(out: Path) -> dict[str, Any]:
    """A tiny world and budget: a round trains and evaluates in seconds (CI smoke test)."""
    data = out / "world"
    return {
        "budget": {"max_tokens": 4000},
        "world": {"data_dir": str(data), "pool_size": 300, "eval_size": 20, "heldout_size": 20,
                  "base_corpus_size": 100},
        "model": {"max_length": 256, "cache_dir": str(out / "models")},
        "training": {"batch_size": 8, "learning_rate": 5e-3},
        "inference": {"batch_size": 32, "max_new_tokens": 8},
        "objectives": {n: {"pool": str(data / "pools" / f"{n}.parquet"),
                           "eval": str(data / "eval" / f"{n}.parquet"),
                           "heldout": str(data / "heldout" / f"{n}.parquet")}
                       for n in ("safety", "boundary", "instruction")},
    }


def quick_base_model(cfg, out: Path) -> str:
    """A tiny base model trained briefly on the tiny world's corpus (seconds, cached)."""
    from mosaic.sandbox import ensure_world
    from mosaic.training.base_model import BaseModelSpec, build_base_model

    world = ensure_world(cfg.world)
    spec = BaseModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         max_position_embeddings=512, batch_size=8, max_length=256,
                         target_tokens=40_000, learning_rate=6e-3)
    info = build_base_model(world.base_corpus_path, world.tokenizer_dir, out / "models",
                            spec=spec, seed=0, progress=False)
    return str(info.path)


def make_planner(method: str, seed: int, startup: int, cfg):
    if method == "mosaic-heuristic":
        from mosaic.agents.planners.heuristic import HeuristicPlanner

        return HeuristicPlanner()
    if method == "mosaic-llm":
        from mosaic.agents.planners.llm import LLMPlanner

        return LLMPlanner(cfg.planner.endpoint)
    from mosaic.agents.planners.baselines import make_baseline

    return make_baseline(method, seed, startup)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (method, seed) loop in its own process; returns its history and checks."""
    from mosaic.agents.runner import run_loop
    from mosaic.config import MosaicConfig
    from mosaic.io import atomic_write_json, read_record
    from mosaic.schemas import DatasetManifest
    from mosaic.tools.archive import load_archive
    from mosaic.tools.benchmark import final_point, scored_rounds
    from mosaic.tools.run_round import evaluate_stage

    cfg = MosaicConfig.model_validate(job["config"])
    run_dir = Path(cfg.run_dir)
    planner = make_planner(job["method"], job["seed"], job["startup"], cfg)
    start = time.perf_counter()
    out = run_loop(cfg, planner=planner)
    history = [dict(h) for h in out.state.get("history", [])]
    # Rounds are evaluated on the eval sets only; the final point's generalisation is measured
    # here, on the held-out sets, where it counts.
    final = final_point(scored_rounds(history, list(cfg.objectives)),
                        next(h["eval"] for h in history if h["round"] == 0), list(cfg.objectives))
    if final is not None and not final.get("heldout"):
        _, heldout = evaluate_stage(cfg, run_dir / f"round_{final['round']}",
                                    round_index=final["round"],
                                    adapter_dir=run_dir / f"round_{final['round']}" / "adapter",
                                    heldout=True)
        final["heldout"] = heldout
    wall = time.perf_counter() - start
    # The wall time of the invocation that computed the run is kept with it: a rerun that finds
    # the run finished reports that figure, not its own few seconds.
    timing = run_dir / RUN_TIMING_FILE
    if out.ran or not timing.is_file():
        atomic_write_json(timing, {"schema_version": 1, "wall_s": wall, "computed": out.ran})
    else:
        wall = json.loads(timing.read_text(encoding="utf-8"))["wall_s"]
    archive = load_archive(run_dir)
    base_point = next(p for p in archive.points if p.round == 0) if archive else None
    over_budget = []
    for h in history:
        if h["round"] == 0 or h.get("skipped"):
            continue
        m = read_record(run_dir / f"round_{h['round']}" / "dataset" / "manifest.json",
                        DatasetManifest)
        if m.total_tokens > cfg.budget.max_tokens:
            over_budget.append(h["round"])
    return {"method": job["method"], "seed": job["seed"], "run_dir": cfg.run_dir,
            "history": history, "wall_s": wall, "computed": out.ran,
            "baseline_ci_low": ({o: ci[0] for o, ci in base_point.eval_ci.items()}
                                if base_point and base_point.eval_ci else None),
            "authors": [h.get("author") for h in history if h["round"] > 0],
            "over_budget_rounds": over_budget}


def _worker_init() -> None:
    # Parallel loops each get one intra-op thread: two processes on two cores, not four threads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # A worker dies with the benchmark (Linux): a killed benchmark must not leave loops running
    # that a rerun's loops would meet in the same run folders (they would be refused as busy).
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_jobs(jobs: list[dict[str, Any]], *, engine: str, workers: int,
             address: str | None = None):
    """Each job's `run_one` result, in job order: in a pool of spawned processes, or as Ray
    tasks (one CPU and one intra-op thread each) so a cluster runs them side by side."""
    if engine == "ray":
        import ray

        started = not ray.is_initialized()
        if started:
            ray.init(address=address, num_cpus=None if address else workers,
                     include_dashboard=False, log_to_driver=False)
        if __name__ != "__main__":
            # Imported (by a test or another script): ship this module's code to the workers,
            # which do not have bench/ on their path.
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        try:
            # A task that dies with its worker (killed, out of memory) is run again; a run
            # resumes from its own folder, so nothing finished is redone.
            remote = ray.remote(num_cpus=1, max_retries=2)(_run_one_on_ray)
            for ref in [remote.remote(job) for job in jobs]:
                yield ray.get(ref)
        finally:
            if started:
                ray.shutdown()
        return
    # Fresh interpreters, not forks: a fork of a process whose torch holds thread pools can hang
    # or die (pytest, or a caller that trained before).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init,
                             mp_context=ctx) as pool:
        yield from pool.map(run_one, jobs)


def _run_one_on_ray(job: dict[str, Any]) -> dict[str, Any]:
    # Ray sets OMP_NUM_THREADS to the task's CPUs; the thread policy reads the machine itself.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_one(job)


# What differs between two invocations that found the same results: timings, the machine's
# load, whether a run was computed or resumed, and where the runs live.
INVOCATION_FIELDS = {"wall_s", "load_average", "computed", "run_dir"}


def result_differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two results.json trees differ, invocation fields left out."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in INVOCATION_FIELDS:
                continue
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'second' if k in b else 'first'}")
            else:
                out += result_differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in result_differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def build_jobs(cfg, methods, seeds, rounds, out: Path, startup: int) -> list[dict[str, Any]]:
    jobs = []
    for seed in seeds:
        for method in methods:
            c = cfg.model_copy(update={
                "run_dir": str(out / "runs" / method / f"seed-{seed}"), "seed": seed,
                "training": cfg.training.model_copy(update={"seed": seed}),
                "loop": cfg.loop.model_copy(update={"rounds": rounds,
                                                    "heldout_every_round": False}),
                "cache": cfg.cache.model_copy(update={"stages_dir": str(out / "cache")}),
                # A baseline's refused draws are drawn again inside the planner; the loop's own
                # revisions stay as configured.
            })
            jobs.append({"method": method, "seed": seed, "startup": startup,
                         "config": c.model_dump(mode="json")})
    return jobs


def summarise(results: list[dict[str, Any]], objectives: list[str], target_share: float
              ) -> dict[str, Any]:
    from mosaic.tools.benchmark import mean_std, paired, rounds_to_target, score_run

    for r in results:
        r["score"] = score_run(r["history"], objectives, r.get("baseline_ci_low"))
    best_hv = max((r["score"]["hv_vs_ones"] for r in results), default=0.0)
    target = target_share * best_hv
    for r in results:
        r["score"]["rounds_to_target"] = rounds_to_target(r["score"]["hv_by_round_vs_ones"],
                                                          target) if target > 0 else None
    methods = sorted({r["method"] for r in results}, key=METHODS.index)
    seeds = sorted({r["seed"] for r in results})
    by = {(r["method"], r["seed"]): r for r in results}
    table: dict[str, Any] = {}
    for m in methods:
        rs = [by[(m, s)] for s in seeds if (m, s) in by]
        row: dict[str, Any] = {k: mean_std([r["score"][k] for r in rs]) for k in HV_MEASURES}
        row.update(rounds_to_target=mean_std([r["score"]["rounds_to_target"] for r in rs]),
                   wall_s=mean_std([r["wall_s"] for r in rs]))
        for o in objectives:
            row[f"best:{o}"] = mean_std([r["score"]["best"][o] for r in rs])
            row[f"final_eval_delta:{o}"] = mean_std(
                [(r["score"]["final_eval_delta"] or {}).get(o) for r in rs])
            row[f"final_heldout_delta:{o}"] = mean_std(
                [(r["score"]["final_heldout_delta"] or {}).get(o) for r in rs])
        table[m] = row
    baselines = [m for m in methods if m in BASELINES]
    optuna_methods = [m for m in baselines if m in ("tpe", "nsga2")]
    best_optuna = (max(optuna_methods, key=lambda m: table[m]["hv_vs_ones"]["mean"] or 0.0)
                   if optuna_methods else None)
    comparisons: dict[str, Any] = {}
    for m in methods:
        if m in baselines:
            continue
        comparisons[m] = {}
        for b in baselines:
            common = [s for s in seeds if (m, s) in by and (b, s) in by]
            comp: dict[str, Any] = {key: paired([by[(m, s)]["score"][key] or 0.0 for s in common],
                                                [by[(b, s)]["score"][key] or 0.0 for s in common])
                                    for key in HV_MEASURES}
            for o in objectives:
                pairs = [((by[(m, s)]["score"]["final_heldout_delta"] or {}).get(o),
                          (by[(b, s)]["score"]["final_heldout_delta"] or {}).get(o)) for s in common]
                pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
                comp[f"final_heldout_delta:{o}"] = paired([x for x, _ in pairs],
                                                          [y for _, y in pairs])
            comparisons[m][b] = comp
    return {"target_hv": target, "target_share": target_share, "best_optuna": best_optuna,
            "methods": methods,
            "seeds": seeds, "table": table, "comparisons": comparisons}


def _fmt(ms: dict[str, Any], digits: int = 3) -> str:
    if ms["mean"] is None:
        return "-"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def print_table(summary: dict[str, Any], objectives: list[str]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title="search quality (mean ± std over seeds)", box=box.SIMPLE_HEAD)
    cols = ["method", "HV vs base", "HV vs base CI", "HV vs 1s", "rounds to target"]
    cols += [f"final Δ{o} eval / held-out" for o in objectives] + ["wall s"]
    for c in cols:
        table.add_column(c, justify="left" if c == "method" else "right")
    for m in summary["methods"]:
        row = summary["table"][m]
        cells = [m, *(_fmt(row[k]) for k in HV_MEASURES), _fmt(row["rounds_to_target"], 1)]
        for o in objectives:
            cells.append(f"{_fmt(row[f'final_eval_delta:{o}'], 2)} / "
                         f"{_fmt(row[f'final_heldout_delta:{o}'], 2)}")
        cells.append(_fmt(row["wall_s"], 0))
        table.add_row(*cells)
    Console(width=200).print(table)
    shown = [b for b in ("random", summary["best_optuna"]) if b]
    for m, by_baseline in summary["comparisons"].items():
        for b in shown:
            if b not in by_baseline:
                continue
            for key in [*HV_MEASURES, *(f"final_heldout_delta:{o}" for o in objectives)]:
                d = by_baseline[b][key]
                if d["mean_diff"] is None:
                    continue
                print(f"{m} vs {b}, {key.replace('_', ' ')}: diff {d['mean_diff']:+.3f} (95% CI "
                      f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], wins {d['wins']}/{d['n']} "
                      f"seeds, sign test p = {d['sign_p']:.3f})")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4))
    methods = sorted({r["method"] for r in results}, key=METHODS.index)
    for i, m in enumerate(methods):
        curves = [r["score"]["hv_by_round_vs_ones"] for r in results if r["method"] == m]
        n = max((len(c) for c in curves), default=0)
        if not n:
            continue
        mean = [sum(c[k] for c in curves if len(c) > k) / max(1, sum(len(c) > k for c in curves))
                for k in range(n)]
        ax.plot(range(1, n + 1), mean, marker="o", label=m, color=f"C{i}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("hypervolume vs all 1s (eval)")
    ax.set_title("Pareto hypervolume by round (mean over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves start high
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "sandbox.yaml"))
    parser.add_argument("--out", default="runs/bench/search_quality")
    parser.add_argument("--methods", default=None, help="comma-separated (default: all that can run)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2, help="loops run in parallel processes")
    parser.add_argument("--engine", choices=("process", "ray"), default="process",
                        help="run the (method, seed) loops in a local process pool, or as Ray "
                             "tasks (one CPU each) on the cluster at --ray-address")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join ('auto', 'ray://head:10001'); default: a local "
                             "cluster of --jobs CPUs")
    parser.add_argument("--startup", type=int, default=2,
                        help="TPE start-up trials / NSGA-II population size")
    parser.add_argument("--target", type=float, default=0.75,
                        help="target hypervolume as a share of the best any run reached")
    parser.add_argument("--same-as", default=None, metavar="RESULTS_JSON",
                        help="compare this invocation's results with another's (e.g. the process "
                             "pool's against --engine ray), timings aside; exit 1 if they differ")
    parser.add_argument("--quick", action="store_true",
                        help="tiny world, budget 4,000, 2 rounds, seed 0 (a smoke test)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from mosaic.config import load_config
    from mosaic.eval import check_objective_types
    from mosaic.sandbox import ensure_world
    from mosaic.sandbox.base_model import ensure_base_model

    out = Path(args.out)
    if args.quick:
        out = out / "quick"
        cfg = load_config(args.config, overrides=quick_overrides(out))
        args.rounds, args.seeds = min(args.rounds, 2), "0"
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"base": quick_base_model(cfg, out)})})
    else:
        cfg = load_config(args.config)
        if cfg.world.kind == "sandbox":
            ensure_world(cfg.world)
        ensure_base_model(cfg)  # once, before the parallel loops share it
    check_objective_types(cfg)
    methods = args.methods.split(",") if args.methods else [
        m for m in METHODS if m != "mosaic-llm" or cfg.planner.endpoint is not None]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "mosaic-llm" in methods and cfg.planner.endpoint is None:
        parser.error("mosaic-llm needs planner.endpoint in the config")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = build_jobs(cfg, methods, seeds, args.rounds, out, args.startup)
    started = time.perf_counter()
    print(f"{len(jobs)} runs ({len(methods)} methods x {len(seeds)} seeds x {args.rounds} rounds), "
          f"{args.jobs} at a time; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for r in run_jobs(jobs, engine=args.engine, workers=args.jobs, address=args.ray_address):
        print(f"  {r['method']} seed {r['seed']}: {len(r['history']) - 1} rounds in "
              f"{r['wall_s']:.0f}s{' (cached)' if not r['computed'] else ''}", flush=True)
        results.append(r)
    objectives = list(cfg.objectives)
    summary = summarise(results, objectives, args.target)
    summary.update(wall_s=time.perf_counter() - started, rounds=args.rounds,
                   budget=cfg.budget.max_tokens, quick=args.quick,
                   load_average=os.getloadavg()[0],
                   runs=[{k: v for k, v in r.items() if k != "history"} for r in results])
    out.mkdir(parents=True, exist_ok=True)
    from mosaic.io import atomic_write_json

    atomic_write_json(out / "results.json", {"schema_version": 1, **summary})
    plot(results, out / "hv_by_round.svg")
    print_table(summary, objectives)
    print(f"wall time {summary['wall_s'] / 60:.1f} min; results in {out / 'results.json'}, "
          f"plot {out / 'hv_by_round.svg'}")
    if args.same_as:
        other = json.loads(Path(args.same_as).read_text(encoding="utf-8"))
        mine = json.loads((out / "results.json").read_text(encoding="utf-8"))
        diffs = result_differences(other, mine)
        if diffs:
            print(f"results differ from {args.same_as} in {len(diffs)} places:\n  "
                  + "\n  ".join(diffs[:20]))
            raise SystemExit(1)
        print(f"results are the same as {args.same_as} (timings aside)")
    return summary


if __name__ == "__main__":
    main()
