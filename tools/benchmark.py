"""Scoring for the search-quality benchmark (bench/search_quality.py): what one method's run
achieved, and whether one method beats another over seeds.

Per run (a method and a seed), over its accepted rounds (the baseline excluded):
- hypervolume of the Pareto set of eval scores against the baseline's scores (improvement over
  the base model; a round no better than the base anywhere adds nothing), against the lower
  ends of the baseline's 95% CIs (the same, but a round that is worse than the base only within
  the base's own uncertainty still counts: where the base sits near an objective's ceiling, as
  the sandbox's boundary score does at 4.93 of 5, every round dips a few hundredths below it
  and the strict reference scores every method 0), and against all 1s;
- hypervolume after each round (how fast the search finds good points), against the baseline
  (`hv_by_round`) and against all 1s (`hv_by_round_vs_ones`), and the first round at which it
  reaches a target;
- the best eval score per objective;
- the chosen final point: the round with the largest worst-case improvement over the baseline
  (max over rounds of min over objectives of eval - baseline; ties to the earlier round), and
  its held-out scores, where a method that fits the eval templates is caught.
Across seeds: mean and standard deviation, and paired differences against a reference method
with a two-sided sign test and a bootstrap CI of the mean difference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mosaic.tools.archive import dominates, hypervolume


def _front(points: Sequence[Mapping[str, float]], objectives: Sequence[str]) -> list[Mapping[str, float]]:
    return [p for p in points if not any(dominates(q, p, objectives) for q in points if q is not p)]


def final_point(rounds: Sequence[Mapping[str, Any]], baseline: Mapping[str, float],
                objectives: Sequence[str]) -> Mapping[str, Any] | None:
    """The max-min improvement round (see the module docstring)."""
    if not rounds:
        return None
    return max(rounds, key=lambda h: (min(h["eval"][o] - baseline[o] for o in objectives),
                                      -h["round"]))


def scored_rounds(history: Sequence[Mapping[str, Any]], objectives: Sequence[str]
                  ) -> list[Mapping[str, Any]]:
    """The rounds a run is scored on: evaluated on every objective, not skipped, not refused by
    an acceptance guard; the baseline (round 0) excluded."""
    return [h for h in history if h["round"] > 0 and not h.get("skipped")
            and h.get("accepted", True) and all(o in h["eval"] for o in objectives)]


def score_run(history: Sequence[Mapping[str, Any]], objectives: Sequence[str],
              baseline_ci_low: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The figures of one run from its loop history (round 0 = the baseline); with
    `baseline_ci_low` (the lower ends of the baseline's eval CIs) also `hv_vs_baseline_ci`."""
    base = next(h for h in history if h["round"] == 0)
    rounds = scored_rounds(history, objectives)
    ref_base = {o: base["eval"][o] for o in objectives}
    ones = {o: 1.0 for o in objectives}
    by_round, by_round_ones = [], []
    for r in sorted({h["round"] for h in rounds}):
        upto = _front([h["eval"] for h in rounds if h["round"] <= r], objectives)
        by_round.append(hypervolume(upto, objectives, ref_base))
        by_round_ones.append(hypervolume(upto, objectives, ones))
    evals = [h["eval"] for h in rounds]
    front = _front(evals, objectives)
    final = final_point(rounds, ref_base, objectives)
    base_ho = base.get("heldout") or {}
    return {
        "rounds": len(rounds),
        "hv_vs_baseline": hypervolume(front, objectives, ref_base),
        "hv_vs_baseline_ci": (hypervolume(front, objectives,
                                          {o: baseline_ci_low[o] for o in objectives})
                              if baseline_ci_low is not None else None),
        "hv_vs_ones": hypervolume(front, objectives, ones),
        "hv_by_round": by_round,
        "hv_by_round_vs_ones": by_round_ones,
        "best": {o: max((e[o] for e in evals), default=None) for o in objectives},
        "final_round": final["round"] if final else None,
        "final_eval": dict(final["eval"]) if final else None,
        "final_eval_delta": ({o: final["eval"][o] - ref_base[o] for o in objectives}
                             if final else None),
        "final_heldout": dict(final.get("heldout") or {}) if final else None,
        "final_heldout_delta": ({o: final["heldout"][o] - base_ho[o] for o in objectives
                                 if final.get("heldout") and o in base_ho} if final else None),
        "baseline_eval": ref_base,
        "baseline_heldout": dict(base_ho),
    }


def rounds_to_target(hv_by_round: Sequence[float], target: float) -> int | None:
    """The first round (1-based) whose hypervolume reaches `target`, or None."""
    return next((i + 1 for i, hv in enumerate(hv_by_round) if hv >= target), None)


def mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def sign_test(diffs: Sequence[float]) -> float:
    """Two-sided exact sign test p-value over the non-zero paired differences."""
    nz = [d for d in diffs if d != 0]
    n, k = len(nz), sum(d > 0 for d in nz)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000,
           seed: int = 0) -> dict[str, Any]:
    """Paired comparison of a vs b over the same seeds: mean difference, sign test, bootstrap
    95% CI of the mean difference, and how many seeds a wins."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size == 0:
        return {"mean_diff": None, "sign_p": None, "ci": [None, None], "wins": 0, "n": 0}
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    return {"mean_diff": float(d.mean()), "sign_p": sign_test(d.tolist()),
            "ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "wins": int((d > 0).sum()), "n": int(d.size)}
