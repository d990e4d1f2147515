"""Dataset-builder speed: a 1,000,000-row synthetic pool, vectorised vs the naive row-by-row way.

Run: .venv/bin/python bench/build_dataset_bench.py [--rows 1000000] [--naive-rows 100000]
                                                  [--text mixed|clean]

Vectorised, on the full pool, cold (first time in a fresh process, nothing cached), stage by
stage: eval-prompt hashes, pool content hashes (sha256, the cache and manifest key), the message
index (normalisation + content hashes), the static steps (windowing, eval guard, dedup) and the
first per-round build. Then the per-round build repeated (best / median), split into the
selection and its output (assembling the table from the selected row indices, its parquet bytes
and their sha256: every build does this, the manifest records the output hash). Peak memory.

Naive, on a slice: the reference design's way (the pool as Python dicts, every step row by row
over shuffled rows), phase by phase: dicts, static steps, per-round selection, output. It must
select exactly the rows the vectorised builder selects on the same slice.

Ratios are per row and on the same footing: selection without output against selection without
output (against the naive selection loop alone, and against its static steps + selection, which
the reference design redoes every round), build with output against the same plus output, cold
end to end against the naive function end to end (on the 1M pool and on the same slice). The
machine is shared: every figure carries the 1-minute load average when it was taken. Targets
(issue 4): the 1M-row build cold < 10 s; >= 50x faster per row than the naive way.

`--text mixed` (default) gives the synthetic text what real chat data has and the generator lacks:
capitalised messages, line breaks in 40% of responses and non-ASCII punctuation in 10% of
messages, so normalisation's slow paths are exercised; `--text clean` keeps the generator's
lower-case ASCII (the figures before this option existed).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sys
import threading
import time
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthetic_pools import synthetic_eval, synthetic_pool  # noqa: E402

from mosaic.eval import get_objective_type  # noqa: E402
from mosaic.schemas import DataAction  # noqa: E402
from mosaic.tools import build_dataset as bd  # noqa: E402
from mosaic.tools.build_dataset import build_training_set  # noqa: E402
from mosaic.tools.dataset.allocation import (bucket_allocations,  # noqa: E402
                                             objective_allocations, row_keys)
from mosaic.tools.dataset.assemble import parquet_bytes  # noqa: E402
from mosaic.tools.dataset.hashing import (eval_prompt_hashes, message_index,  # noqa: E402
                                          normalise_text, pool_content_hash)
from mosaic.tools.dataset.pools import PreparedPools  # noqa: E402
from mosaic.tools.dataset.token_counts import TokenCounts  # noqa: E402

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


def load() -> str:
    return f"[load {os.getloadavg()[0]:.1f}]"


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
        return f"peak RSS {self.peak / 2**30:.2f} GiB, +{(self.peak - self.base) / 2**30:.2f} GiB"


def mixed_text(pool: pa.Table) -> pa.Table:
    """Capitalise every message, break 40% of responses into paragraphs, put non-ASCII
    punctuation into 10% of messages. Which message gets what depends on its normalised text
    only, so exact and normalised duplicates stay duplicates."""
    col = pool.column("messages").combine_chunks()
    flat = pc.list_flatten(col)
    role = pc.struct_field(flat, "role")
    content = pc.struct_field(flat, "content")
    norm = normalise_text(content)
    off = np.frombuffer(norm.buffers()[1], dtype=np.int32)[norm.offset:norm.offset + len(norm) + 1]
    data = memoryview(norm.buffers()[2])
    digest = xxhash.xxh3_64_intdigest
    pick = np.fromiter((digest(data[a:b]) % 100 for a, b in zip(off[:-1].tolist(), off[1:].tolist())),
                       dtype=np.int64, count=len(norm))
    first = pc.utf8_slice_codeunits(content, 0, 1)
    text = pc.binary_join_element_wise(pc.utf8_upper(first), pc.utf8_slice_codeunits(content, 1), "")
    paragraphs = pa.array((pick < 40) & pc.equal(role, "assistant").to_numpy(zero_copy_only=False))
    text = pc.if_else(paragraphs, pc.replace_substring(text, " ", ".\n\n", max_replacements=1), text)
    dash = pa.array((pick >= 40) & (pick < 50))
    text = pc.if_else(dash, pc.replace_substring(text, " ", " \u2014 it\u2019s ", max_replacements=1), text)
    lengths = pc.list_value_length(col)
    offsets = np.concatenate([[0], np.cumsum(lengths.to_numpy(zero_copy_only=False))]).astype(np.int32)
    msgs = pa.ListArray.from_arrays(pa.array(offsets), pa.StructArray.from_arrays(
        [role, text], names=["role", "content"])).cast(col.type)
    return pool.set_column(pool.schema.get_field_index("messages"), "messages", msgs)


def make_pools(n_rows: int, seed: int, text: str = "mixed"):
    pools, counts, evals = {}, {}, {}
    for i, (name, t) in enumerate(TYPES.items()):
        pools[name], counts[name] = synthetic_pool(t, int(n_rows * SHARE[name]), seed=seed + i,
                                                   objective=name)
        if text == "mixed":
            pools[name] = mixed_text(pools[name])
        evals[name] = synthetic_eval(pools[name], t, 500, seed=seed + 10 + i)
    return pools, counts, evals


def slice_world(pools, counts, evals, n_rows):
    sp, sc = {}, {}
    for name in pools:
        k = int(n_rows * SHARE[name])
        sp[name] = pools[name].slice(0, k)
        n_msg = int(np.sum(pc.list_value_length(sp[name].column("messages")).to_numpy()))
        sc[name] = TokenCounts(row=counts[name].row[:k], message=counts[name].message[:n_msg])
    return sp, sc, evals


def vectorised(pools, counts, evals, action, budget, seed):
    """Cold preparation stage by stage, then the first build. Returns (prepared, table,
    manifest, {stage: seconds})."""
    t = {}
    t0 = time.perf_counter()
    eval_hashes = np.concatenate([eval_prompt_hashes(e.column("messages")) for e in evals.values()])
    t["eval hashes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hashes = {n: pool_content_hash(p) for n, p in pools.items()}
    t["pool content hashes (sha256)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    indexes = {n: message_index(p.column("messages")) for n, p in pools.items()}
    t["message index (normalise + hash)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared = PreparedPools(pools, TYPES, counts, eval_hashes, max_length=MAX_LENGTH,
                             indexes=indexes, pool_hashes=hashes)
    prepared.candidates(action.method)
    t["static steps (window, eval guard, dedup)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    table, manifest = build_training_set(prepared, action, budget, seed)
    t["build"] = time.perf_counter() - t0
    return prepared, table, manifest, t


class OutputClock:
    """Time a build spends producing its output (assembling the table from the selected row
    indices, then its parquet bytes), by wrapping the builder's two output functions, so the
    selection can be compared with the naive selection on the same footing."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._orig = {}

    def __enter__(self) -> "OutputClock":
        for name in ("assemble", "parquet_bytes"):
            fn = self._orig[name] = getattr(bd, name)
            setattr(bd, name, self._timed(fn))
        return self

    def _timed(self, fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
        return run

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._orig.items():
            setattr(bd, name, fn)


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
    """The reference design's selection: every step per row in Python, same semantics.
    Returns (table, {phase: seconds})."""
    phases = {}
    t0 = time.perf_counter()
    rows_of = {n: t.to_pylist() for n, t in pools.items()}
    eval_prompts = {tuple(norm(m["content"]) for m in msgs if m["role"] == "user")
                    for e in evals.values() for msgs in e.column("messages").to_pylist()}
    phases["dicts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
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
    phases["static"] = time.perf_counter() - t0
    # per round: shuffled order, filters, focus-first greedy fill per bucket
    t0 = time.perf_counter()
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
    phases["selection"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = pa.Table.from_pylist([{"messages": r[3], "id": r[1]["id"], "objective": name,
                                   "bucket": b, "tokens": r[2]} for name, b, r in out])
    hashlib.sha256(parquet_bytes(table)).hexdigest()
    phases["output (table + parquet + sha256)"] = time.perf_counter() - t0
    return table, phases


def rate(rows: int, seconds: float) -> str:
    return f"{seconds:7.2f} s {rows / seconds:12,.0f} rows/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--naive-rows", type=int, default=100_000)
    ap.add_argument("--budget-share", type=float, default=0.25,
                    help="budget as a share of the pool's total tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="per-round builds to time")
    ap.add_argument("--naive-repeats", type=int, default=2, help="naive runs to time")
    ap.add_argument("--text", choices=("mixed", "clean"), default="mixed")
    args = ap.parse_args()
    print(f"cores: {os.cpu_count()}, pyarrow {pa.__version__}, numpy {np.__version__}, "
          f"text: {args.text} {load()}")

    t = time.perf_counter()
    pools, counts, evals = make_pools(args.rows, args.seed, args.text)
    total_tokens = int(sum(c.row.sum() for c in counts.values()))
    n_msgs = sum(len(c.message) for c in counts.values())
    n_bytes = sum(int(pc.sum(pc.binary_length(pc.struct_field(pc.list_flatten(
        p.column("messages")), "content"))).as_py()) for p in pools.values())
    print(f"synthetic pools: {sum(p.num_rows for p in pools.values()):,} rows, {n_msgs:,} messages "
          f"({n_bytes / 2**20:,.0f} MiB of text), {total_tokens:,} tokens, "
          f"{sum(p.nbytes for p in pools.values()) / 2**20:,.0f} MiB in all "
          f"(generated in {time.perf_counter() - t:.1f} s)")
    budget = int(total_tokens * args.budget_share)
    action = DataAction.model_validate(ACTION)
    gc.collect()

    n = args.rows
    with PeakRSS() as mem:
        prepared, table, manifest, stages = vectorised(pools, counts, evals, action, budget,
                                                       args.seed)
    t_prep = sum(v for k, v in stages.items() if k != "build")
    t_first = stages["build"]
    print(f"\nvectorised, {n:,} rows, budget {budget:,} tokens, cold (fresh process, no cache):")
    for k, v in stages.items():
        if k != "build":
            print(f"  {k:<44}{v:7.2f} s {load()}")
    print(f"  {'preparation, total':<44}{rate(n, t_prep)}")
    print(f"  {'first build':<44}{rate(n, t_first)}  -> {manifest.total_rows:,} rows, "
          f"{manifest.total_tokens:,} tokens, {manifest.windowed_rows:,} windowed")
    print(f"  {'COLD TOTAL (preparation + first build)':<44}{rate(n, t_prep + t_first)} {load()}")
    print(f"  {mem} over the block (the process: the pools, "
          f"{sum(p.nbytes for p in pools.values()) / 2**30:.2f} GiB, + preparation + build)")
    print(f"  dropped: {manifest.dropped}")
    # The machine is shared and small: repeat the per-round build, keep the best and median.
    reps = []
    for _ in range(args.repeats):
        with OutputClock() as clock:
            t = time.perf_counter()
            build_training_set(prepared, action, budget, args.seed)
            total = time.perf_counter() - t
        reps.append((total, clock.seconds))
    t_build, out_s = min(reps)
    t_median = float(np.median([r[0] for r in reps]))
    t_select = t_build - out_s
    print(f"  per-round build, best of {len(reps)} / median:      {t_build:7.2f} s / {t_median:.2f} s "
          f"{n / t_build:12,.0f} rows/s {load()}")
    print(f"    of which output (table + parquet + sha256): {out_s:5.2f} s ({table.num_rows:,} rows)")
    print(f"    selection alone:                          {rate(n, t_select)}")
    del prepared, table
    gc.collect()

    k = args.naive_rows
    sp, sc, se = slice_world(pools, counts, evals, k)
    sbudget = int(budget * k / n)
    _, vtab, _, vst = vectorised(sp, sc, se, action, sbudget, args.seed)
    v_cold = sum(vst.values())
    runs = [naive(sp, sc, se, action, sbudget, args.seed) for _ in range(args.naive_repeats)]
    ntab, ph = min(runs, key=lambda r: sum(r[1].values()))
    n_total = sum(ph.values())
    same = sorted(vtab.column("id").to_pylist()) == sorted(ntab.column("id").to_pylist())
    print(f"\nnaive (row-by-row over shuffled Python dicts), {k:,}-row slice, budget {sbudget:,}, "
          f"best of {len(runs)} {load()}:")
    for name, v in ph.items():
        print(f"  {name:<44}{v:7.2f} s")
    print(f"  {'end to end':<44}{rate(k, n_total)}")
    print(f"  vectorised on the same slice, cold: {v_cold:.2f} s (build {vst['build']:.2f} s)")
    print(f"  same selection as the vectorised builder: {same} "
          f"({vtab.num_rows:,} vs {ntab.num_rows:,} rows)")
    if not same:
        raise SystemExit("the naive and vectorised selections differ")

    def ratio(vec_rows: int, vec_s: float, naive_s: float) -> float:
        return (vec_rows / vec_s) / (k / naive_s)

    out_key = "output (table + parquet + sha256)"
    per_round = ph["static"] + ph["selection"]  # the reference design filters every round
    print("\nspeed ratio per row, vectorised (full pool unless noted) / naive (slice):")
    lines = [
        ("per round, selection only: vs naive selection loop alone",
         ratio(n, t_select, ph["selection"]),
         "strictest: the naive static steps are counted as cached, like ours"),
        ("per round, selection only: vs naive static steps + selection",
         ratio(n, t_select, per_round),
         "the reference design re-filters every round; its dicts kept in memory"),
        ("per round, with output: build vs naive static + selection + output",
         ratio(n, t_build, per_round + ph[out_key]), "both write the same kind of output"),
        ("cold, end to end: preparation + first build vs naive end to end",
         ratio(n, t_prep + t_first, n_total), "naive includes turning Arrow rows into dicts"),
        ("cold, end to end, both on the same slice", ratio(k, v_cold, n_total), ""),
    ]
    for label, r, note in lines:
        print(f"  {label:<68}{r:7.1f}x" + (f"  ({note})" if note else ""))
    print(f"\ntargets: {n:,}-row build cold < 10 s: {'met' if t_prep + t_first < 10 else 'MISSED'} "
          f"({t_prep + t_first:.2f} s cold; per-round build {t_build:.2f} s); >= 50x per row: met by "
          f"{sum(r >= 50 for _, r, _ in lines)} of {len(lines)} comparisons above")


if __name__ == "__main__":
    main()
