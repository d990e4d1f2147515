"""Allocation and selection under an action: per-objective filters (threshold, exclude,
include), SFT rows or DPO pairs, token allocations per objective and bucket, the seeded draw
order and the greedy fill that never exceeds an allocation.

Semantics (DESIGN.md "Dataset building"), with the choices the design leaves open:
- objective allocation = floor(T_max x mixture weight); bucket allocation = floor(A_o x weight)
  for listed buckets (unlisted buckets get nothing). Without bucket_weights, buckets get A_o in
  proportion to the tokens they can supply after filters, which is uniform sampling over the
  filtered pool.
- rows are drawn in a seeded random order (one key per pool row, so a small change to the action
  keeps most of the selection); a row that does not fit is skipped and the fill goes on.
- DPO: rows sharing `prompt_id` form one pair: chosen = highest score >= threshold, rejected =
  lowest score, gap > 0, ties broken by the seeded key; exclude removes rows before pairing;
  a pair is a focus pair if either response matches include; pair tokens = prompt + chosen +
  rejected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import xxhash

from mosaic.schemas import ObjectiveAction
from mosaic.tools.dataset.pools import Candidates, criteria_mask

ACTION_REASONS = ("below_quality", "excluded", "prompt_mismatch", "no_pair")


@dataclass
class Units:
    """What one objective can draw under one action: SFT rows or DPO pairs."""

    bucket: np.ndarray
    tokens: np.ndarray
    focus: np.ndarray
    first: np.ndarray  # candidate index (the row, or the chosen row of a pair)
    second: np.ndarray | None  # DPO: candidate index of the rejected row
    dropped: dict[str, int]


def objective_units(cands: Candidates, oa: ObjectiveAction | None, threshold: float | None,
                    method: str, keys: np.ndarray | None = None) -> Units:
    """Apply an action's per-objective filters to the candidates (vectorised). The objective's own
    quality_threshold, when set, replaces the action's global `threshold`."""
    if oa is not None and oa.quality_threshold is not None:
        threshold = oa.quality_threshold
    n = len(cands.rows)
    focus = oa.focus if oa is not None else None
    alive = np.ones(n, dtype=bool)
    dropped: dict[str, int] = {}
    if method == "sft" and threshold is not None:
        low = cands.score < threshold
        dropped["below_quality"] = int(low.sum())
        alive &= ~low
    if focus is not None and focus.exclude:
        ex = criteria_mask(cands, focus.exclude) & alive
        dropped["excluded"] = int(ex.sum())
        alive &= ~ex
    inc = criteria_mask(cands, focus.include) if focus is not None and focus.include else \
        np.zeros(n, dtype=bool)
    if method == "sft":
        idx = np.flatnonzero(alive)
        return Units(bucket=cands.bucket[idx], tokens=cands.tokens[idx], focus=inc[idx], first=idx,
                     second=None, dropped=dropped)
    return _pairs(cands, alive, inc, threshold, keys, dropped)


def _pairs(cands: Candidates, alive: np.ndarray, inc: np.ndarray, threshold: float | None,
           keys: np.ndarray | None, dropped: dict[str, int]) -> Units:
    idx = np.flatnonzero(alive)
    code = cands.prompt_code[idx]
    score = cands.score[idx]
    tie = keys[idx] if keys is not None else np.zeros(len(idx))
    elig = score >= threshold if threshold is not None else np.ones(len(idx), dtype=bool)
    # Chosen: eligible first, then highest score, then the seeded key; rejected: lowest score.
    oc = np.lexsort((tie, -score, ~elig, code))
    orj = np.lexsort((tie, score, code))
    starts_c = np.flatnonzero(np.diff(code[oc], prepend=-1) != 0)
    starts_r = np.flatnonzero(np.diff(code[orj], prepend=-1) != 0)
    chosen, rejected = idx[oc[starts_c]], idx[orj[starts_r]]
    ok = elig[oc[starts_c]] & (cands.score[chosen] > cands.score[rejected])
    same_prompt = cands.prompt_raw[chosen] == cands.prompt_raw[rejected]
    dropped["prompt_mismatch"] = int((ok & ~same_prompt).sum())
    dropped["no_pair"] = int((~ok).sum())
    ok &= same_prompt
    chosen, rejected = chosen[ok], rejected[ok]
    if cands.last_tokens is not None:
        tokens = cands.tokens[chosen] + cands.last_tokens[rejected]
    else:  # no per-message counts: count the prompt twice, which can only under-spend
        tokens = cands.tokens[chosen] + cands.tokens[rejected]
    return Units(bucket=cands.bucket[chosen], tokens=tokens, focus=inc[chosen] | inc[rejected],
                 first=chosen, second=rejected, dropped=dropped)


def supply(cands: Candidates, units: Units) -> tuple[dict[str, int], dict[str, int]]:
    """Tokens each bucket can supply, and how many of them come from focus units."""
    nb = len(cands.buckets)
    tot = np.bincount(units.bucket, weights=units.tokens, minlength=nb)
    foc = np.bincount(units.bucket[units.focus], weights=units.tokens[units.focus], minlength=nb)
    return ({b: int(tot[i]) for i, b in enumerate(cands.buckets)},
            {b: int(foc[i]) for i, b in enumerate(cands.buckets)})


def _clamp_sum(alloc: dict[str, int], total: int) -> dict[str, int]:
    # Float products can round a floor up by one; the budget guarantee must not depend on luck.
    excess = sum(alloc.values()) - total
    for key in sorted(alloc, key=lambda k: (-alloc[k], k)):
        if excess <= 0:
            break
        cut = min(excess, alloc[key])
        alloc[key] -= cut
        excess -= cut
    return alloc


def objective_allocations(budget: int, mixture: Mapping[str, float]) -> dict[str, int]:
    return _clamp_sum({o: max(0, int(math.floor(budget * w))) for o, w in mixture.items()}, budget)


def bucket_allocations(allocation: int, bucket_weights: Mapping[str, float] | None,
                       available: Mapping[str, int]) -> dict[str, int]:
    if bucket_weights is not None:
        return _clamp_sum({b: max(0, int(math.floor(allocation * w)))
                           for b, w in sorted(bucket_weights.items())}, allocation)
    total = sum(available.values())
    if total == 0:
        return {}
    # Integer arithmetic: proportional shares are exact and never sum above the allocation.
    return {b: allocation * a // total for b, a in sorted(available.items()) if a > 0}


def greedy_fill(tokens: np.ndarray, cap: int) -> np.ndarray:
    """Mask of the items a sequential 'take it if it still fits' pass would take, in order.

    Vectorised in rounds: each round takes the longest fitting prefix (a cumsum), skips the
    item that broke it and drops every item larger than what is left (it can never fit again,
    since what is left only shrinks). Equal to the sequential pass, item for item.
    """
    n = len(tokens)
    take = np.zeros(n, dtype=bool)
    remaining = int(cap)
    cand = np.flatnonzero(tokens <= remaining)
    rounds = 0
    while cand.size and remaining > 0:
        rounds += 1
        if rounds > 64:  # pathological size mixes: finish the (by now short) tail sequentially
            for i in cand.tolist():
                t = int(tokens[i])
                if t <= remaining:
                    take[i] = True
                    remaining -= t
            break
        cs = np.cumsum(tokens[cand])
        k = int(np.searchsorted(cs, remaining, side="right"))
        take[cand[:k]] = True
        remaining -= int(cs[k - 1]) if k else 0
        if k >= cand.size:
            break
        rest = cand[k + 1:]
        cand = rest[tokens[rest] <= remaining]
    return take


def _stable_id(name: str) -> int:
    return xxhash.xxh3_64_intdigest(name.encode("utf-8")) & 0xFFFFFFFF


def _draw_order(keys: np.ndarray) -> np.ndarray:
    """`np.argsort(keys, kind="stable")`, faster: numpy's default sort is SIMD and ~5x quicker,
    and without ties every correct sort gives the same order; ties (rare: 53-bit keys) get the
    stable sort, so the order never depends on the sort's internals or the CPU."""
    order = np.argsort(keys)
    ranked = keys[order]
    if len(ranked) > 1 and bool((ranked[1:] == ranked[:-1]).any()):
        return np.argsort(keys, kind="stable")
    return order


def row_keys(seed: int, objective: str, n_pool_rows: int) -> np.ndarray:
    """The seeded random draw order: one key per pool row, independent of the other pools."""
    return np.random.default_rng([int(seed), _stable_id(objective)]).random(n_pool_rows)
