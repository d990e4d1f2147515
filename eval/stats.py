"""Need, slice reliability and seeded bootstrap confidence intervals (DESIGN.md, "Need, reliability")."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from mosaic.schemas import SliceStats

Reliability = Literal["low", "medium", "high"]

MEDIUM_N = 10  # n < 10 valid samples: low
HIGH_N = 30  # n < 30: medium; otherwise high
DEFAULT_RESAMPLES = 2000
MIN_RESAMPLES = 1000


def sample_need(valid: Sequence[bool] | np.ndarray, score: Sequence[float] | np.ndarray,
                weight: Sequence[float] | np.ndarray) -> np.ndarray:
    """need_i = valid x (6 - score) x weight, per sample."""
    valid = np.asarray(valid, dtype=bool)
    score = np.asarray(score, dtype=float)
    weight = np.asarray(weight, dtype=float)
    # np.where rather than a product: an invalid sample may carry a NaN score, and 0 x NaN is NaN.
    return np.where(valid, (6.0 - score) * weight, 0.0)


def reliability(n_valid: int) -> Reliability:
    if n_valid < MEDIUM_N:
        return "low"
    if n_valid < HIGH_N:
        return "medium"
    return "high"


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, seed: int | Sequence[int] = 0,
                 n_resamples: int = DEFAULT_RESAMPLES,
                 confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of the mean; (None, None) for no values.

    Resampling n values with replacement from the empirical distribution is the same as drawing
    multinomial counts over its distinct values, so scores (a handful of distinct levels) cost
    O(resamples x levels) instead of O(resamples x n), in one vectorised draw.
    """
    if n_resamples < MIN_RESAMPLES:
        raise ValueError(f"n_resamples must be at least {MIN_RESAMPLES}, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None, None
    if np.isnan(x).any():
        raise ValueError("bootstrap_ci got NaN values; pass the scores of valid samples only")
    levels, counts = np.unique(x, return_counts=True)
    if levels.size == 1:
        return float(levels[0]), float(levels[0])
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(x.size, counts / x.size, size=n_resamples)
    means = draws @ levels / x.size
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def slice_seed(seed: int, slice_name: str) -> list[int]:
    """Per-slice seed, so a slice's CI does not change when other slices gain or lose samples."""
    return [seed, zlib.crc32(slice_name.encode("utf-8"))]


def slice_stats(slices: Sequence[str] | np.ndarray, score: Sequence[float] | np.ndarray,
                valid: Sequence[bool] | np.ndarray, weight: Sequence[float] | np.ndarray,
                failure: Sequence[bool] | np.ndarray, *, slice_order: Sequence[str] = (),
                target: float | None = None, seed: int = 0,
                n_resamples: int = DEFAULT_RESAMPLES) -> list[SliceStats]:
    """Per-slice n, mean score with CI, fail rate, need, reliability and gap to target.

    Mean, CI and fail rate are over the slice's valid samples; `n` counts all of them. Every
    slice in `slice_order` is reported (an empty slice is itself information for the planner),
    followed by any other slice seen, sorted by name. gap_to_target = target - mean (> 0: short).
    """
    columns = {
        "slice": np.asarray(slices, dtype=object),
        "score": np.asarray(score, dtype=float),
        "valid": np.asarray(valid, dtype=bool),
        "weight": np.asarray(weight, dtype=float),
        "failure": np.asarray(failure, dtype=bool),
    }
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"slice_stats got columns of different lengths: {lengths}")
    frame = pd.DataFrame(columns)
    frame["need"] = sample_need(frame["valid"], frame["score"], frame["weight"])
    valid_rows = frame[frame["valid"]]
    n = frame.groupby("slice", sort=False).size()
    need = frame.groupby("slice", sort=False)["need"].sum()
    n_valid = valid_rows.groupby("slice", sort=False).size()
    mean = valid_rows.groupby("slice", sort=False)["score"].mean()
    fail_rate = valid_rows.groupby("slice", sort=False)["failure"].mean()
    scores_by_slice = {name: group.to_numpy() for name, group
                       in valid_rows.groupby("slice", sort=False)["score"]}

    names = list(slice_order) + sorted(set(n.index) - set(slice_order))
    out = []
    for name in names:
        nv = int(n_valid.get(name, 0))
        m = float(mean[name]) if nv else None
        lo, hi = bootstrap_ci(scores_by_slice.get(name, ()), seed=slice_seed(seed, name),
                              n_resamples=n_resamples)
        out.append(SliceStats(
            slice=name,
            n=int(n.get(name, 0)),
            n_valid=nv,
            mean=m,
            ci_low=lo,
            ci_high=hi,
            fail_rate=float(fail_rate[name]) if nv else None,
            need=float(need.get(name, 0.0)),
            reliability=reliability(nv),
            gap_to_target=(target - m) if (target is not None and m is not None) else None,
        ))
    return out
