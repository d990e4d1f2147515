"""The build-dataset tool: a checked data action + prepared pools + seed -> parquet + manifest.

Two stages. *Preparation* (`dataset.pools`, once per run) fingerprints every conversation,
windows over-long ones by whole turns and drops eval overlap, invalid labels and duplicates.
*Building* (here, every round) applies the action through `dataset.allocation` (quality
threshold, exclude and include criteria, per-objective and per-bucket allocations, a seeded
greedy fill that never exceeds an allocation) and `dataset.assemble` writes the result. Every
step is a column operation (Arrow compute / numpy), so pools of millions of rows build in
seconds.

Choices the design leaves open, made here:
- inside a bucket, include-matching rows are drawn first up to floor(focus_ratio x allocation);
  the rest of the allocation is drawn from all remaining rows of the bucket (so focusing never
  shrinks what a bucket delivers; `focus_rows` counts every selected row matching include).
- the output lists objectives in config order, each in pool order: order carries no meaning
  (trainers shuffle with their own seed every epoch) and sorted gathers are much cheaper.
- DPO never windows (both responses must share one prompt): over-long rows drop.
- objectives may train by different methods (`objectives.<name>.method`): each is drawn as its
  method's rows (SFT rows, or pairs for dpo and sft+dpo) and the set is `mixed`, the SFT and
  pair tables stacked with a `method` column; a round with one method writes exactly what it
  wrote before the field existed.

The tool entry `check_and_build` validates first: an invalid action never reaches the builder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mosaic.eval.base import ObjectiveType
from mosaic.schemas import BucketManifest, DataAction, DatasetManifest, data_method
from mosaic.tools.dataset.allocation import (ACTION_REASONS, _draw_order, bucket_allocations,
                                             greedy_fill, objective_allocations,
                                             objective_units, row_keys, supply)
from mosaic.tools.dataset.assemble import (MANIFEST_FILE, TRAIN_FILE, Selection, assemble,
                                           parquet_bytes, write_training_set)
from mosaic.tools.dataset.pools import STATIC_REASONS, PreparedPools, PoolError, prepare_from_config
from mosaic.tools.dataset.token_counts import TokenCounts
from mosaic.tools.validate_action import validate_action

if TYPE_CHECKING:
    from mosaic.schemas import ActionVerdict
    from mosaic.tools.validate_action import ActionContext

__all__ = ["MANIFEST_FILE", "TRAIN_FILE", "BuildOutcome", "PoolError", "build_training_set",
           "check_and_build", "check_buildable", "prepare_from_config", "write_training_set"]


def _action_hash(action: DataAction) -> str:
    dumped = action.model_dump(mode="json")
    for oa in dumped["objectives"].values():
        # An unset per-objective method hashes as actions did before the field existed.
        if oa.get("method") is None:
            oa.pop("method", None)
    text = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_buildable(action: DataAction, prepared: PreparedPools) -> None:
    """Refuse an action that has not passed the check (defence in depth, not the check itself)."""
    ws = list(action.mixture.values())
    if not ws or any(not math.isfinite(w) or w < 0 for w in ws) or abs(sum(ws) - 1) > 1e-6:
        raise ValueError(f"mixture {action.mixture} is not a set of non-negative weights summing "
                         f"to 1; run validate_action first")
    for name in set(action.mixture) | set(action.objectives):
        if name not in prepared.tables:
            raise ValueError(f"action names objective {name!r} that has no pool; pools: "
                             f"{prepared.objectives}")
    for name, oa in action.objectives.items():
        otype = prepared.types[name]
        if oa.bucket_weights is not None:
            bad = [b for b in oa.bucket_weights if b not in otype.slices]
            bws = list(oa.bucket_weights.values())
            if bad or any(not math.isfinite(w) or w < 0 for w in bws) or abs(sum(bws) - 1) > 1e-6:
                raise ValueError(f"objective {name!r}: bucket_weights {oa.bucket_weights} are not "
                                 f"valid; run validate_action first")
        if oa.focus is not None:
            bad = [k for k in (*oa.focus.include, *oa.focus.exclude) if k not in otype.focus_keys]
            if bad:
                raise ValueError(f"objective {name!r}: unknown focus keys {bad}")
        if not 0 <= oa.focus_ratio <= 1:
            raise ValueError(f"objective {name!r}: focus_ratio {oa.focus_ratio} outside [0, 1]")


def build_training_set(pools: PreparedPools | Mapping[str, pa.Table | pd.DataFrame],
                       action: DataAction, budget: int, seed: int,
                       token_counts: Mapping[str, TokenCounts | np.ndarray] | None = None,
                       eval_hashes: np.ndarray | Sequence[int] | None = None, *,
                       objective_types: Mapping[str, str | ObjectiveType] | None = None,
                       max_length: int | None = None) -> tuple[pa.Table, DatasetManifest]:
    """Select the round's training set. Returns the table (as it will be written) and the
    manifest; `manifest.output_hash` is the sha256 of the exact parquet bytes `write_training_set`
    writes. Same (pools, action, seed) -> byte-identical output."""
    if isinstance(pools, PreparedPools):
        prepared = pools
    else:
        if token_counts is None or objective_types is None:
            raise ValueError("raw pools need token_counts and objective_types")
        prepared = PreparedPools(pools, objective_types, token_counts, eval_hashes,
                                 max_length=max_length)
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of tokens, got {budget}")
    check_buildable(action, prepared)
    allocs = objective_allocations(budget, action.mixture)
    trained = {n: action.method_of(n) for n in prepared.objectives if allocs.get(n, 0) > 0}
    mixed = len(set(trained.values())) > 1
    method = "mixed" if mixed else next(iter(trained.values()), action.method)
    buckets_out: list[BucketManifest] = []
    parts: list[Selection] = []
    dropped_by: dict[str, dict[str, int]] = {}
    notes: list[str] = []
    for name in prepared.objectives:
        rows_of = data_method(action.method_of(name))
        cands = prepared.candidates(rows_of)[name]
        oa = action.objectives.get(name)
        keys = row_keys(seed, name, cands.n_pool_rows)[cands.rows]
        units = objective_units(cands, oa, action.quality_threshold, rows_of, keys)
        merged = {**cands.dropped, **units.dropped}
        dropped_by[name] = {r: merged[r] for r in (*STATIC_REASONS, *ACTION_REASONS)
                            if merged.get(r)}
        a_o = allocs.get(name, 0)
        if a_o == 0:
            continue
        avail, focus_avail = supply(cands, units)
        bw = oa.bucket_weights if oa is not None else None
        if bw is None:
            notes.append(f"{name}: no bucket_weights, buckets proportional to available tokens")
        balloc = bucket_allocations(a_o, bw, avail)
        # Without include criteria there are no focus rows and focus_ratio has no effect.
        ratio = oa.focus_ratio if oa is not None and oa.focus is not None and oa.focus.include else 0.0
        # One sort per objective: every bucket's units, filtered by mask, stay in draw order.
        drawn = _draw_order(keys[units.first])
        drawn_bucket = units.bucket[drawn]
        for b, a_b in balloc.items():
            bi = cands.buckets.index(b) if b in cands.buckets else -1
            in_b = drawn[drawn_bucket == bi]
            f_alloc = min(a_b, int(math.floor(a_b * ratio)))
            fmask = units.focus[in_b]
            focus_idx = in_b[fmask]
            t1 = greedy_fill(units.tokens[focus_idx], f_alloc)
            chosen1 = focus_idx[t1]
            used1 = int(units.tokens[chosen1].sum())
            taken1 = np.zeros(len(in_b), dtype=bool)
            taken1[np.flatnonzero(fmask)[t1]] = True
            rest = in_b[~taken1]
            t2 = greedy_fill(units.tokens[rest], a_b - used1)
            chosen = np.concatenate([chosen1, rest[t2]])
            used = int(units.tokens[chosen].sum())
            if used > a_b:  # cannot happen; the guarantee is checked, not assumed
                raise RuntimeError(f"{name}/{b}: filled {used} tokens over allocation {a_b}")
            n_focus = int(units.focus[chosen].sum())
            buckets_out.append(BucketManifest(
                objective=name, bucket=b, allocation=a_b, tokens_used=used, rows=len(chosen),
                focus_rows=n_focus, focus_tokens=int(units.tokens[chosen][units.focus[chosen]].sum()),
                shortfall=a_b - used, available_tokens=avail.get(b, 0),
                focus_allocation=f_alloc, focus_available_tokens=focus_avail.get(b, 0)))
            parts.append(Selection(objective=name, bucket=b, cands=cands, units=units,
                                   chosen=chosen))
    if not mixed:
        table = assemble(prepared, parts, data_method(method))
    else:
        tables = []
        for rows_of in ("sft", "dpo"):
            group = [p for p in parts if data_method(trained[p.objective]) == rows_of]
            if group:
                t = assemble(prepared, group, rows_of)
                col = pc.take(pa.array([trained[o] for o in trained], pa.string()),
                              pc.index_in(t.column("objective"),
                                          pa.array(list(trained), pa.string())))
                tables.append(t.append_column("method", col))
        table = pa.concat_tables(tables, promote_options="default")
    total = int(pc.sum(table.column("tokens")).as_py() or 0) if table.num_rows else 0
    if total > budget:
        raise RuntimeError(f"selected {total} tokens over the budget {budget}")
    for name in prepared.objectives:
        used = sum(b.tokens_used for b in buckets_out if b.objective == name)
        if used > allocs.get(name, 0):
            raise RuntimeError(f"{name}: {used} tokens over its allocation {allocs.get(name, 0)}")
    short = [f"{b.objective}/{b.bucket} short by {b.shortfall}" for b in buckets_out
             if b.shortfall > max(0, b.allocation // 100)]
    if short:
        notes.append("shortfalls over 1% of allocation: " + ", ".join(short))
    if len(prepared.eval_hashes) == 0:
        notes.append("no eval item hashes given: the eval-overlap guard had nothing to compare")
    dropped_total = {r: sum(d.get(r, 0) for d in dropped_by.values())
                     for r in (*STATIC_REASONS, *ACTION_REASONS)}
    dropped_total = {r: v for r, v in dropped_total.items() if v}
    manifest = DatasetManifest(
        seed=seed, budget=budget, total_tokens=total, total_rows=table.num_rows, method=method,
        action_hash=_action_hash(action), pool_hashes=dict(prepared.pool_hashes),
        output_hash=hashlib.sha256(parquet_bytes(table)).hexdigest(), buckets=buckets_out,
        dropped=dropped_total, dropped_by_objective=dropped_by, allocations=allocs,
        windowed_rows=sum(p.windowed_rows() for p in parts),
        max_length=prepared.max_length, eval_items=int(len(prepared.eval_hashes)), notes=notes,
        methods=trained if mixed else {})
    return table, manifest


# --------------------------------------------------------------------------------------------
# Tool entry: check, then build (an invalid action never reaches the builder)
# --------------------------------------------------------------------------------------------


@dataclass
class BuildOutcome:
    verdict: "ActionVerdict"
    table: pa.Table | None = None
    manifest: DatasetManifest | None = None
    out_dir: Path | None = None


def check_and_build(raw_action: str | bytes | dict[str, Any], context: "ActionContext", *,
                    seed: int, out_dir: str | Path | None = None,
                    dry_run: bool = False) -> BuildOutcome:
    """Validate the proposal; build (and unless dry_run, write) only if the check passes."""
    context = dataclasses.replace(context, seed=seed)
    verdict = validate_action(raw_action, context)
    if not verdict.ok or verdict.action is None:
        return BuildOutcome(verdict=verdict)
    if context.pools is None:
        raise ValueError("the action context has no prepared pools to build from")
    table, manifest = build_training_set(context.pools, verdict.action, context.budget, seed)
    manifest = manifest.model_copy(update={"notes": [*verdict.notes, *manifest.notes]})
    written = None
    if not dry_run:
        if out_dir is None:
            raise ValueError("out_dir is required unless dry_run")
        written = write_training_set(out_dir, table, manifest)
    return BuildOutcome(verdict=verdict, table=table, manifest=manifest, out_dir=written)
