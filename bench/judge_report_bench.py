"""Judge and report stages at scale: 10k-prompt eval sets and 1M-row pools, against generation.

    .venv/bin/python bench/judge_report_bench.py [--config configs/sandbox.yaml]
        [--prompts 10000] [--pool-rows 1000000] [--gen-sample 240]

Eval sets: each objective's sandbox eval set is cycled to `--prompts` rows (fresh ids; the
multi-turn jailbreak rows keep their turns), answered by a canned backend that replays replies
the sandbox base model gave (so the rule judge sees real replies), and run through
`tools.evaluate.evaluate` itself: the judge stage (rule judge, L3 -> L2 -> L1, per-turn atoms)
and the report stage (eval rows in, responses/samples parquet, failure reports out) are timed
by evaluate's own stage timers. Generation is timed in the same run on `--gen-sample` rows of
each set (the fast path, the policy's threads) and scaled to `--prompts` rows, so every line
says how the judge and report compare with the generation they follow.

Pools: `eval.report.build_failure_report` over a synthetic `--pool-rows`-row pool frame of each
objective type (tests/synthetic_pools.py; the pool-format path a planner reads pool quality
with). No stage of a round reads the pools after the dataset is built, so their size does not
reach evaluate's judge or report stages.

Every figure carries the 1-minute load average when it was taken. On the 2-core sandbox
machine, otherwise quiet, 2026-11-29 08:58 (generation on the fast path, 2 decode workers):

    eval sets at 10,000 prompts    judge s  report s   generation s (est.)  (judge+report)/gen
    safety (6-turn replay)            2.87      1.49                 210.2                2.1%
    boundary                          2.62      1.09                 129.6                2.9%
    instruction                       0.62      1.09                  92.2                1.9%

    build_failure_report over a 1,000,000-row pool: safety 15.0 s, boundary 7.2 s,
    instruction 9.1 s (load 0.87-0.92); before the column-wise L2/L1 build, in one run:
    15.5 / 8.5 / 10.2 s -> 10.5 / 7.2 / 8.3 s, the same reports.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def load() -> float:
    return os.getloadavg()[0]


class CannedBackend:
    """Answers every conversation with one of the given replies (by a hash of the prompt)."""

    name = "canned"

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies

    def identity(self) -> dict:
        return {"backend": self.name, "n": len(self.replies)}

    def generate(self, conversations, *, max_new_tokens: int, temperature: float = 0.0):
        import zlib

        return [self.replies[zlib.crc32(c[-1]["content"].encode()) % len(self.replies)]
                for c in conversations]


def scaled_eval_file(src: Path, dst: Path, n: int) -> None:
    """`src` cycled to `n` rows with fresh ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    reps = -(-n // table.num_rows)
    big = pa.concat_tables([table] * reps).slice(0, n)
    ids = pa.array([f"scaled-{i}" for i in range(n)])
    big = big.set_column(big.schema.get_field_index("id"), "id", ids)
    pq.write_table(big, dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/sandbox.yaml")
    ap.add_argument("--prompts", type=int, default=10_000)
    ap.add_argument("--pool-rows", type=int, default=1_000_000)
    ap.add_argument("--gen-sample", type=int, default=240)
    opts = ap.parse_args()

    from mosaic.config import load_config
    from mosaic.eval import build_judge
    from mosaic.sandbox.base_model import ensure_base_model
    from mosaic.timing import StageTimes
    from mosaic.tools.evaluate import evaluate, load_eval_rows, replay_rows
    from mosaic.training.transformers_backend import TransformersBackend

    config = load_config(opts.config)
    base = ensure_base_model(config)
    print(f"cores {os.cpu_count()}  load {load():.2f}")

    # Generation in the same run: the fast path on a sample of each eval set.
    backend = TransformersBackend(base, config=config)
    gen_per_row: dict[str, float] = {}
    replies: dict[str, list[str]] = {}
    for name, obj in config.objectives.items():
        rows = load_eval_rows(obj.eval, name, obj.type)[:opts.gen_sample]
        t = time.perf_counter()
        convs = replay_rows(backend, rows, max_new_tokens=config.inference.max_new_tokens,
                            temperature=0.0)
        gen_per_row[name] = (time.perf_counter() - t) / len(rows)
        replies[name] = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
        print(f"  generation, {name}: {gen_per_row[name] * 1e3:.1f} ms per eval row "
              f"({len(rows)} rows, load {load():.2f})", flush=True)

    judge = build_judge(config)
    print(f"\neval sets at {opts.prompts:,} prompts each (evaluate's judge and report stages):")
    print(f"  {'objective':<12} {'judge s':>8} {'report s':>9} {'cpu s':>7}   "
          f"{'generation s (est.)':>20} {'(judge+report)/gen':>19}  load")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, obj in config.objectives.items():
            big = tmp / f"{name}.parquet"
            scaled_eval_file(Path(obj.eval), big, opts.prompts)
            # The scaled copy is sandbox text but not a file the world's manifest lists, so
            # the rule judge is allowed to label it explicitly.
            cfg = load_config(opts.config, overrides={"objectives": {name: {"eval": str(big)}},
                                                      "judge": {"allow_out_of_range": True}})
            times = StageTimes()
            evaluate(cfg, base, None, tmp / "round", "eval", backend=CannedBackend(replies[name]),
                     judge=judge, objectives=[name], timings=times)
            gen = gen_per_row[name] * opts.prompts
            jr = times.wall.get("judge", 0.0) + times.wall.get("report", 0.0)
            judge_s, report_s = times.wall.get("judge", 0.0), times.wall.get("report", 0.0)
            print(f"  {name:<12} {judge_s:8.2f} {report_s:9.2f} "
                  f"{times.cpu.get('judge', 0) + times.cpu.get('report', 0):7.2f}   "
                  f"{gen:20.1f} {jr / gen:18.1%}  {load():.2f}", flush=True)

    import pyarrow as pa
    from synthetic_pools import synthetic_pool

    from mosaic.eval.report import build_failure_report

    print(f"\npools of {opts.pool_rows:,} rows (build_failure_report over the pool frame):")
    for name, obj in config.objectives.items():
        # Built in parts: one synthetic table over ~2 GB of text would need chunked arrays.
        parts = [synthetic_pool(obj.type, min(250_000, opts.pool_rows - k), seed=1 + k,
                                objective=name)[0]
                 for k in range(0, opts.pool_rows, 250_000)]
        table = pa.concat_tables(parts)
        table = table.set_column(0, "id", pa.array([f"{name}-{i}" for i in range(table.num_rows)]))
        df = table.to_pandas()
        t = time.perf_counter()
        c = time.process_time()
        report = build_failure_report(name, obj.type, 0, df, target=obj.target, seed=0)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        print(f"  {name:<12} ({obj.type}) {wall:6.2f} s wall (cpu {cpu:.2f} s)  n={report.n:,}  "
              f"f={report.f:.3f}  load {load():.2f}", flush=True)


if __name__ == "__main__":
    main()
