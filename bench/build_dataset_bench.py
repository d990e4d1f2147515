"""Dataset-builder speed: a 1,000,000-row synthetic pool vectorised vs the naive row-by-row way.

Run: .venv/bin/python bench/build_dataset_bench.py [--rows 1000000] [--naive-rows 100000]

Prints, for the vectorised builder on the full pool: the one-off preparation (message hashing,
windowing, eval-overlap guard, dedup; cached per pool in a real run) and the per-round build
(filters, allocations, greedy fill, output table and its parquet bytes), each with rows/s and
peak memory. Then the same selection done the naive way (the reference design: the pool as
Python dicts, a row-by-row loop over shuffled rows) on a slice, checks that both select exactly
the same rows, and prints the per-row speed ratios. Targets: the 1M-row build < 10 s; >= 50x
faster per row than the naive way.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthetic_pools import synthetic_eval, synthetic_pool  # noqa: E402

from mosaic.eval import get_objective_type  # noqa: E402
from mosaic.schemas import DataAction  # noqa: E402
from mosaic.tools.build_dataset import (PreparedPools, bucket_allocations,  # noqa: E402
                                        build_training_set, eval_prompt_hashes, message_index,
                                        objective_allocations, parquet_bytes, pool_content_hash,
                                        row_keys)
from mosaic.tools.token_counts import TokenCounts  # noqa: E402

TYPES = {"safety": "jailbreak", "boundary": "overrefusal", "instruction": "ifeval"}
SHARE = {"safety": 0.4, "boundary": 0.3, "instruction": 0.3}
MAX_LENGTH = 128
ACTION = {
    "mixture": {"safety": 0.5, "boundary": 0.3, "instruction": 0.2},
    "objectives": {
        "safety": {"bucket_weights": {"complexity_2": 0.2, "complexity_3": 0.4, "complexity_4": 0.4},
                   "focus": {"include": {"pc_patterns": ["P3_C3", "P4_C3", "P3_C4", "P2_C2"],
                                         "pressure_range": [4, 5]},
                             "exclude": {"concealment_range": [5, 5]}},
                   "focus_ratio": 0.5},
        "boundary": {"focus": {"include": {"boundary_range": [3, 4]},
                               "exclude": {"friction": ["high"]}}, "focus_ratio": 0.6},
        "instruction": {"focus": {"include": {"inst_complexity": [4, 5]}}, "focus_ratio": 0.4},
    },
    "quality_threshold": 3.0, "method": "sft", "rationale": "bench"}


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __str__(self) -> str:
        return f"peak RSS {self.peak / 2**30:.2f} GiB (+{(self.peak - self.base) / 2**30:.2f} GiB)"


def make_pools(n_rows: int, seed: int):
    pools, counts, evals = {}, {}, {}
    for i, (name, t) in enumerate(TYPES.items()):
        pools[name], counts[name] = synthetic_pool(t, int(n_rows * SHARE[name]), seed=seed + i,
                                                   objective=name)
        evals[name] = synthetic_eval(pools[name], t, 500, seed=seed + 10 + i)
    return pools, counts, evals


def slice_world(pools, counts, evals, n_rows):
    sp, sc = {}, {}
    for name in pools:
        k = int(n_rows * SHARE[name])
        sp[name] = pools[name].slice(0, k)
        n_msg = int(np.sum(np.diff(message_index(sp[name].column("messages")).offsets)))
        sc[name] = TokenCounts(row=counts[name].row[:k], message=counts[name].message[:n_msg])
    return sp, sc, evals


def vectorised(pools, counts, evals, action, budget, seed):
    t0 = time.perf_counter()
    eval_hashes = np.concatenate([eval_prompt_hashes(e.column("messages")) for e in evals.values()])
    hashes = {n: pool_content_hash(t) for n, t in pools.items()}
    indexes = {n: message_index(t.column("messages")) for n, t in pools.items()}
    prepared = PreparedPools(pools, TYPES, counts, eval_hashes, max_length=MAX_LENGTH,
                             indexes=indexes, pool_hashes=hashes)
    prepared.candidates(action.method)
    t1 = time.perf_counter()
    table, manifest = build_training_set(prepared, action, budget, seed)
    t2 = time.perf_counter()
    return prepared, table, manifest, t1 - t0, t2 - t1


# ---- the naive way: Python dicts, one row at a time ----------------------------------------


def norm(s: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", s).lower().split())


def _matches(otype, row, criteria) -> bool:
    for key, value in criteria.items():
        spec = otype.focus_keys[key]
        v = row[spec.column]
        if spec.kind == "range":
            if value[0] <= v <= value[1]:
                return True
        elif spec.is_list:
            if any(x in value for x in v):
                return True
        elif v in value:
            return True
    return False


def naive(pools, counts, evals, action, budget, seed):
    """The reference design's selection: every step per row in Python, same semantics."""
    t0 = time.perf_counter()
    rows_of = {n: t.to_pylist() for n, t in pools.items()}
    eval_prompts = {tuple(norm(m["content"]) for m in msgs if m["role"] == "user")
                    for e in evals.values() for msgs in e.column("messages").to_pylist()}
    t_load = time.perf_counter() - t0
    seen_exact, seen_norm = set(), set()
    alive: dict[str, list] = {}
    for name, rows in rows_of.items():
        msg_tok = counts[name].message.tolist()
        row_tok = counts[name].row.tolist()
        pos = 0
        keep = []
        for i, row in enumerate(rows):
            msgs = row["messages"]
            mt = msg_tok[pos:pos + len(msgs)]
            pos += len(msgs)
            tokens, start = row_tok[i], 0
            if tokens > MAX_LENGTH:
                overhead = tokens - sum(mt)
                sys_t = sum(t for m, t in zip(msgs, mt) if m["role"] == "system")
                start = None
                for k, m in enumerate(msgs):
                    if m["role"] == "user":
                        w = overhead + sys_t + sum(t for mm, t in zip(msgs[k:], mt[k:])
                                                   if mm["role"] != "system")
                        if w <= MAX_LENGTH:
                            start, tokens = k, w
                            break
                if start is None:
                    continue  # too long
            users = [norm(m["content"]) for m in msgs if m["role"] == "user"]
            if any(tuple(users[:k]) in eval_prompts for k in range(1, len(users) + 1)):
                continue
            kept = [m for k, m in enumerate(msgs) if m["role"] == "system" or k >= start]
            if start:
                wu = [norm(m["content"]) for m in kept if m["role"] == "user"]
                if any(tuple(wu[:k]) in eval_prompts for k in range(1, len(wu) + 1)):
                    continue
            if not row["valid"]:
                continue
            ek = tuple((m["role"], m["content"]) for m in kept)
            if ek in seen_exact:
                continue
            seen_exact.add(ek)
            nk = tuple((m["role"], norm(m["content"])) for m in kept)
            if nk in seen_norm:
                continue
            seen_norm.add(nk)
            keep.append((i, row, tokens, kept))
        alive[name] = keep
    # per round: shuffled order, filters, focus-first greedy fill per bucket
    allocs = objective_allocations(budget, action.mixture)
    out = []
    for name, keep in alive.items():
        a_o = allocs.get(name, 0)
        if not a_o:
            continue
        otype = get_objective_type(TYPES[name])
        oa = action.objectives.get(name)
        keys = row_keys(seed, name, len(rows_of[name])).tolist()
        by_bucket: dict[str, list] = {}
        for i, row, tokens, kept in sorted(keep, key=lambda r: keys[r[0]]):
            if action.quality_threshold is not None and row["score"] < action.quality_threshold:
                continue
            if oa and oa.focus and _matches(otype, row, oa.focus.exclude):
                continue
            focus = bool(oa and oa.focus and _matches(otype, row, oa.focus.include))
            by_bucket.setdefault(row["slice"], []).append((i, row, tokens, kept, focus))
        avail = {b: sum(r[2] for r in rs) for b, rs in by_bucket.items()}
        balloc = bucket_allocations(a_o, oa.bucket_weights if oa else None, avail)
        ratio = oa.focus_ratio if oa and oa.focus and oa.focus.include else 0.0
        for b, a_b in balloc.items():
            rs = by_bucket.get(b, [])
            left = min(a_b, int(a_b * ratio))
            taken = set()
            for r in rs:
                if r[4] and r[2] <= left:
                    taken.add(r[0])
                    left -= r[2]
                    out.append((name, b, r))
            left = a_b - sum(r[2] for r in rs if r[0] in taken)
            for r in rs:
                if r[0] not in taken and r[2] <= left:
                    left -= r[2]
                    out.append((name, b, r))
    table = pa.Table.from_pylist([{"messages": r[3], "id": r[1]["id"], "objective": name,
                                   "bucket": b, "tokens": r[2]} for name, b, r in out])
    parquet_bytes(table)
    return table, t_load, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--naive-rows", type=int, default=100_000)
    ap.add_argument("--budget-share", type=float, default=0.25,
                    help="budget as a share of the pool's total tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="vectorised builds to time")
    ap.add_argument("--naive-repeats", type=int, default=2, help="naive runs to time")
    args = ap.parse_args()
    print(f"cores: {os.cpu_count()}, pyarrow {pa.__version__}, numpy {np.__version__}")

    t = time.perf_counter()
    pools, counts, evals = make_pools(args.rows, args.seed)
    total_tokens = int(sum(c.row.sum() for c in counts.values()))
    n_msgs = sum(len(c.message) for c in counts.values())
    print(f"synthetic pools: {sum(p.num_rows for p in pools.values()):,} rows, {n_msgs:,} messages, "
          f"{total_tokens:,} tokens, {sum(p.nbytes for p in pools.values()) / 2**20:,.0f} MiB "
          f"(generated in {time.perf_counter() - t:.1f} s)")
    budget = int(total_tokens * args.budget_share)
    action = DataAction.model_validate(ACTION)
    gc.collect()

    with PeakRSS() as mem:
        prepared, table, manifest, t_prep, t_first = vectorised(pools, counts, evals, action,
                                                                budget, args.seed)
    # The machine is shared and small: repeat the per-round build and keep the best and median.
    reps = [t_first]
    for _ in range(args.repeats - 1):
        t = time.perf_counter()
        build_training_set(prepared, action, budget, args.seed)
        reps.append(time.perf_counter() - t)
    t_build, t_median = min(reps), float(np.median(reps))
    n = args.rows
    print(f"\nvectorised, {n:,} rows, budget {budget:,} tokens:")
    print(f"  preparation (once per pool, cached on disk in a run): {t_prep:6.2f} s  "
          f"{n / t_prep:12,.0f} rows/s")
    print(f"  build (per round), best of {len(reps)}:                        {t_build:6.2f} s  "
          f"{n / t_build:12,.0f} rows/s  -> {manifest.total_rows:,} rows, "
          f"{manifest.total_tokens:,} tokens, {manifest.windowed_rows:,} windowed")
    print(f"  build, first run / median:                            {t_first:6.2f} s / {t_median:.2f} s")
    print(f"  cold total (preparation + first build):               {t_prep + t_first:6.2f} s  "
          f"{n / (t_prep + t_first):12,.0f} rows/s")
    print(f"  {mem} (pools, preparation and build)")
    print(f"  dropped: {manifest.dropped}")
    del prepared, table
    gc.collect()

    k = args.naive_rows
    sp, sc, se = slice_world(pools, counts, evals, k)
    sbudget = int(budget * k / n)
    _, vtab, vman, v_prep, v_build = vectorised(sp, sc, se, action, sbudget, args.seed)
    runs = [naive(sp, sc, se, action, sbudget, args.seed) for _ in range(args.naive_repeats)]
    ntab, n_load, n_total = min(runs, key=lambda r: r[2])
    same = sorted(vtab.column("id").to_pylist()) == sorted(ntab.column("id").to_pylist())
    print(f"\nnaive (row-by-row over shuffled Python dicts), {k:,}-row slice, budget {sbudget:,}, "
          f"best of {len(runs)}:")
    print(f"  total {n_total:6.2f} s ({n_load:.2f} s of it turning Arrow rows into dicts)  "
          f"{k / n_total:10,.0f} rows/s")
    print(f"  vectorised on the same slice: preparation {v_prep:.2f} s + build {v_build:.2f} s")
    print(f"  same selection as the vectorised builder: {same} "
          f"({vtab.num_rows:,} vs {ntab.num_rows:,} rows)")
    if not same:
        raise SystemExit("the naive and vectorised selections differ")
    naive_rate = k / n_total
    print("\nspeed ratio per row (vectorised on 1M rows / naive on the slice):")
    print(f"  per-round build, best / median:        {n / t_build / naive_rate:6.1f}x / "
          f"{n / t_median / naive_rate:.1f}x")
    print(f"  cold (preparation + first build):      {n / (t_prep + t_first) / naive_rate:6.1f}x")
    print(f"  naive without its dict conversion:     {n / t_build / (k / (n_total - n_load)):6.1f}x "
          f"(per-round build, best)")
    print(f"\ntargets: 1M-row build < 10 s: {'met' if t_first < 10 else 'MISSED'} "
          f"(first {t_first:.2f} s, best {t_build:.2f} s; cold with preparation "
          f"{t_prep + t_first:.2f} s); >= 50x per row: "
          f"{'met' if n / t_build / naive_rate >= 50 else 'MISSED'} on the per-round build")

if __name__ == "__main__":
    main()
