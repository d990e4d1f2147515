"""One full sandbox round, stage by stage: wall and CPU seconds, against the current path.

    .venv/bin/python bench/round_bench.py [--config configs/sandbox.yaml]
        [--action configs/actions/balanced.json] [--compare eval,train] [--out DIR]

The round is what `mosaic round ACTION --no-heldout` runs (check + build the training set within
the budget, LoRA-train from the base model, evaluate on the three eval sets, multi-turn replay
included), in a fresh round folder, timed per stage:

    prepare   config, sandbox world and base model (cached), the run's prepared pools
    build     check the action and build the training set
    train     LoRA SFT over the training set
    merge     load the base model and the adapter (and merge them, on the fast path)
    generate  greedy replies to every eval row, turn by turn
    judge     rule judge + L3 -> L2 -> L1
    report    eval rows in, responses/samples/reports out

`--compare` reruns the stages this work changed on the current path, in the same run:
`eval` evaluates the same adapter with `inference.decode: generate` on one thread (the path
before the fast decode loop) and checks that every conversation of the three eval sets is
identical; `train` trains the same dataset as before this work (one thread, trl's fused LM head
scoring every position) when the thread setting is not one thread. Every figure carries the
1-minute load average when its stage ended. Exits 1 if the replies differ.

On the 2-core sandbox machine, otherwise quiet (load 0.59 at the start; the rest is this
bench's own threads), configs/actions/balanced.json, 2026-11-29 08:54:

    stage        wall s    cpu s   load    current path    cpu s   load  speed-up
    prepare         2.9      3.0   0.59
    build           0.0      0.0   0.59
    train          53.3    100.4   1.47            89.2     89.3   1.12     1.67x
    merge           0.1      0.2   1.55             0.1      0.1   1.07
    generate        9.3     15.8   1.55            35.8     35.8   1.07     3.86x
    judge           0.1      0.1   1.55             0.1      0.1   1.07
    report          0.1      0.1   1.55             0.1      0.1   1.07
    round          65.9    119.7   1.07

    evaluation stage (3 eval sets, multi-turn replay): 9.7 s new vs 36.1 s current = 3.73x
    training: 5,625 tok/s (policy: 2 threads) vs 3,360 tok/s before (1 thread)
    identical replies, new vs current path: 720/720 conversations (1381 assistant turns)

The round misses 60 s by ~6 s: training 300k tokens is 53 s with both cores busy (the 1-thread
run is at ~45 GFLOP/s of matmul-heavy work; 2 threads give 1.67x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("prepare", "build", "train", "merge", "generate", "judge", "report")


def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/sandbox.yaml")
    ap.add_argument("--action", default="configs/actions/balanced.json")
    ap.add_argument("--compare", default="eval,train",
                    help="stages to rerun on the current path: eval, train, or ''")
    ap.add_argument("--out", help="keep the round folders here (default: a temporary folder)")
    opts = ap.parse_args()
    compare = set(filter(None, opts.compare.split(",")))

    from mosaic.timing import StageTimes

    times = StageTimes()
    loads: dict[str, float] = {}
    print(f"cores {os.cpu_count()}  load at start {load():.2f}", flush=True)
    with times("prepare"):
        from mosaic.config import load_config
        from mosaic.eval import check_objective_types
        from mosaic.sandbox import ensure_world
        from mosaic.sandbox.base_model import ensure_base_model
        from mosaic.tools.run_round import run_data

        out = Path(opts.out or tempfile.mkdtemp(prefix="round-bench-"))
        config = load_config(opts.config, overrides={"run_dir": str(out / "run")})
        check_objective_types(config)
        if config.world.kind == "sandbox":
            ensure_world(config.world)
        base_model = ensure_base_model(config)
        run_data(config)
    loads["prepare"] = load()
    action = Path(opts.action).read_text(encoding="utf-8")
    round_dir = out / "round_1"
    shutil.rmtree(round_dir, ignore_errors=True)

    from mosaic.tools.evaluate import evaluate
    from mosaic.tools.run_round import dataset_stage, train_stage
    from mosaic.training.threads import usable_cores

    with times("build"):
        verdict, manifest = dataset_stage(config, action, round_dir, round_index=1)
    loads["build"] = load()
    if not verdict.ok or manifest is None:
        sys.exit(f"the action was rejected: {verdict.problems}")
    with times("train"):
        train = train_stage(config, round_dir, manifest, round_index=1)
    loads["train"] = load()
    ev = StageTimes()
    report = evaluate(config, base_model, round_dir / "adapter", round_dir, "eval", round=1,
                      timings=ev)
    for ours, theirs in (("merge", "load"), ("generate", "generate"), ("judge", "judge"),
                         ("report", "report")):
        times.wall[ours], times.cpu[ours] = ev.wall.get(theirs, 0.0), ev.cpu.get(theirs, 0.0)
        loads[ours] = load()
    policy = config.runtime.threads
    wall, cpu = times.total()
    scores = ", ".join(f"{k} f={v:.3f}" for k, v in report.scores().items() if v is not None)
    print(f"\nround: {train.train_tokens:,} training tokens ({train.train_rows:,} rows, "
          f"{train.steps} steps), eval sets {scores}")
    print(f"decode {config.inference.decode}, threads: "
          + (f"runtime.threads {policy}" if policy else
             f"the policy (training/threads.py; {usable_cores()} usable cores)"))

    ref = StageTimes()
    same = None
    if "train" in compare and policy != 1:
        from contextlib import nullcontext

        from mosaic.tools.build_dataset import TRAIN_FILE
        from mosaic.training import train as train_module

        # The previous path: one thread, trl's fused head scoring every position.
        compact = train_module.compact_lm_head
        train_module.compact_lm_head = lambda device: nullcontext(False)
        t0 = (time.perf_counter(), time.process_time())
        try:
            train_ref = train_module.train_adapter(
                round_dir / "dataset" / TRAIN_FILE, base_model=base_model,
                adapter_dir=out / "adapter_1thread", training=config.training,
                max_length=config.model.max_length, method=manifest.method,
                dtype=config.model.dtype, progress=False, threads=1)
        finally:
            train_module.compact_lm_head = compact
        ref.wall["train"] = time.perf_counter() - t0[0]
        ref.cpu["train"] = time.process_time() - t0[1]
        loads["train_ref"] = load()
        assert train_ref.train_tokens == train.train_tokens
    if "eval" in compare:
        ref_config = load_config(opts.config, overrides={
            "run_dir": str(out / "run"), "inference": {"decode": "generate"},
            "runtime": {"threads": 1}})
        ev_ref = StageTimes()
        ref_dir = out / "round_1_current"
        shutil.rmtree(ref_dir, ignore_errors=True)
        evaluate(ref_config, base_model, round_dir / "adapter", ref_dir, "eval", round=1,
                 timings=ev_ref)
        for ours, theirs in (("merge", "load"), ("generate", "generate"), ("judge", "judge"),
                             ("report", "report")):
            ref.wall[ours] = ev_ref.wall.get(theirs, 0.0)
            ref.cpu[ours] = ev_ref.cpu.get(theirs, 0.0)
        loads["eval_ref"] = load()
        same = identical_replies(config, round_dir, ref_dir)

    print(f"\n{'stage':<10} {'wall s':>8} {'cpu s':>8} {'load':>6}   "
          f"{'current path':>13} {'cpu s':>8} {'load':>6} {'speed-up':>9}")
    for stage in STAGES:
        line = f"{stage:<10} {times.wall[stage]:8.1f} {times.cpu[stage]:8.1f} {loads[stage]:6.2f}"
        if stage in ref.wall:
            rl = loads["train_ref"] if stage == "train" else loads["eval_ref"]
            line += (f"   {ref.wall[stage]:13.1f} {ref.cpu[stage]:8.1f} {rl:6.2f} "
                     f"{ref.wall[stage] / max(times.wall[stage], 1e-9):8.2f}x")
        print(line)
    print(f"{'round':<10} {wall:8.1f} {cpu:8.1f} {load():6.2f}")
    eval_stages = ("merge", "generate", "judge", "report")
    if all(s in ref.wall for s in eval_stages):
        new = sum(times.wall[s] for s in eval_stages)
        old = sum(ref.wall[s] for s in eval_stages)
        print(f"\nevaluation stage (merge + generate + judge + report, 3 eval sets): "
              f"{new:.1f} s new vs {old:.1f} s current = {old / new:.2f}x  "
              f"(cpu {sum(times.cpu[s] for s in eval_stages):.1f} vs "
              f"{sum(ref.cpu[s] for s in eval_stages):.1f} s)")
    if "train" in ref.wall:
        print(f"training: {train.train_tokens / times.wall['train']:.0f} tok/s with "
              f"{policy or 'the policy'} vs {train.train_tokens / ref.wall['train']:.0f} tok/s "
              f"before (1 thread, full-position LM head)")
    if wall > 60:
        top = sorted(STAGES, key=lambda s: -times.wall[s])[:3]
        where = ", ".join(f"{s} {times.wall[s]:.1f} s" for s in top)
        print(f"round over 60 s: most of it in {where} (load {load():.2f})")
    if same is not None:
        n, total, turns = same
        print(f"identical replies, new vs current path: {n}/{total} conversations "
              f"({turns} assistant turns) {'OK' if n == total else 'DIFFER'}")
        if n != total:
            sys.exit(1)
    if not opts.out:
        shutil.rmtree(out, ignore_errors=True)


def identical_replies(config, new_dir: Path, ref_dir: Path) -> tuple[int, int, int]:
    """Conversations equal between the two round folders' responses, over every objective."""
    import pyarrow.parquet as pq

    same = total = turns = 0
    for name in config.objectives:
        a = pq.read_table(new_dir / "eval" / name / "responses.parquet").to_pylist()
        b = pq.read_table(ref_dir / "eval" / name / "responses.parquet").to_pylist()
        assert [r["id"] for r in a] == [r["id"] for r in b]
        for x, y in zip(a, b):
            total += 1
            same += x["messages"] == y["messages"]
            turns += sum(m["role"] == "assistant" for m in x["messages"])
    return same, total, turns


if __name__ == "__main__":
    main()
