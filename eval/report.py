"""Failure reports: an objective's scored samples -> the typed `FailureReport` a planner reads."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mosaic.eval.base import ObjectiveType, get_objective_type
from mosaic.eval.stats import DEFAULT_RESAMPLES, bootstrap_ci, slice_stats
from mosaic.schemas import L1, BorderlineExample, FailureReport, SampleRecord

L1_COLUMNS = ("slice", "score", "valid", "weight", "failure")


# ---- anonymised excerpts ---------------------------------------------------------------------

# Placeholders such as `<HAZARD-STEP>` (and our own masks) carry meaning and are left intact.
_PLACEHOLDER = re.compile(r"(<[A-Z][A-Z0-9_-]*>)")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(r"\b(?:https?://|www\.)\S+")
# Digits with their separators in one mask, so a phone number or a date leaves one <NUM>.
_NUMBER = re.compile(r"\d(?:[\d,.:/-]*\d)?")
_TITLED = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof)\.?\s+[A-Z][\w'-]*")
_CAP_RUN = re.compile(r"\b[A-Z][a-z][\w'-]*(?:\s+[A-Z][a-z][\w'-]*)+")
_CAP_WORD = re.compile(r"\b[A-Z][a-z][\w'-]*")
_SENTENCE_END = tuple(".!?:;\"'([{\n\u201c")


def _mask_single_capitals(text: str) -> str:
    # A capitalised word that does not open a sentence is most likely a name; sentence-initial
    # words are ordinary words far more often. This errs towards masking (e.g. product names).
    def repl(m: re.Match[str]) -> str:
        before = text[:m.start()].rstrip(" \t")
        if not before or before.endswith(_SENTENCE_END):
            return m.group(0)
        return "<NAME>"

    return _CAP_WORD.sub(repl, text)


def _anonymise_plain(text: str) -> str:
    text = _EMAIL.sub("<EMAIL>", text)
    text = _URL.sub("<URL>", text)
    text = _NUMBER.sub("<NUM>", text)
    text = _TITLED.sub("<NAME>", text)
    text = _CAP_RUN.sub("<NAME>", text)
    return _mask_single_capitals(text)


def anonymise(text: str) -> str:
    """Mask e-mails, URLs, numbers and likely personal names; keep `<PLACEHOLDER>` tokens."""
    parts = _PLACEHOLDER.split(text)
    return "".join(p if i % 2 else _anonymise_plain(p) for i, p in enumerate(parts))


def excerpt(text: str, max_chars: int) -> str:
    """Anonymised, whitespace-collapsed and cut at a word boundary to at most `max_chars`."""
    flat = " ".join(anonymise(text).split())
    if len(flat) <= max_chars:
        return flat
    cut = flat[:max_chars - 1]
    if " " in cut:
        cut = cut[:cut.rindex(" ")]
    return cut + "\u2026"


# ---- normalising the input -----------------------------------------------------------------


def _py(value: Any) -> Any:
    """numpy / Arrow cell values -> plain Python, so the report serialises as JSON."""
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_py(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _py(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class _Samples:
    ids: list[str]
    slice: np.ndarray
    score: np.ndarray
    valid: np.ndarray
    weight: np.ndarray
    failure: np.ndarray
    l2: list[dict[str, Any]]
    messages: Callable[[int], Sequence[Mapping[str, Any]] | None]


def _from_records(records: Sequence[SampleRecord], objective: str) -> _Samples:
    for r in records:
        if r.objective != objective:
            raise ValueError(f"sample {r.id!r} belongs to objective {r.objective!r}, "
                             f"not {objective!r}")
        if r.l1 is None or r.l2 is None:
            raise ValueError(f"sample {r.id!r} of objective {objective!r} is not scored "
                             "(l2/l1 missing); score it with its objective type first")
    return _Samples(
        ids=[r.id for r in records],
        slice=np.array([r.l1.slice for r in records], dtype=object),
        score=np.array([r.l1.score for r in records], dtype=float),
        valid=np.array([r.l1.valid for r in records], dtype=bool),
        weight=np.array([r.l1.weight for r in records], dtype=float),
        failure=np.array([r.l1.failure for r in records], dtype=bool),
        l2=[dict(r.l2) for r in records],
        messages=lambda i: [m.model_dump() for m in records[i].messages],
    )


def _from_frame(df: pd.DataFrame, otype: ObjectiveType, objective: str) -> _Samples:
    missing = [c for c in L1_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"samples of objective {objective!r} lack L1 columns {missing}; "
                         "annotate them first (mosaic.data.annotate_pool)")
    if df["score"].isna().any():
        row = int(np.flatnonzero(df["score"].isna().to_numpy())[0])
        raise ValueError(f"samples of objective {objective!r}: row {row} has no score; "
                         "annotate the frame first (mosaic.data.annotate_pool)")
    if "l2" in df.columns:
        l2 = [_py(json.loads(v) if isinstance(v, str) else v) for v in df["l2"]]
    else:
        cols = [f"l2_{f}" for f in otype.l2_columns]
        absent = [c for c in cols if c not in df.columns]
        if absent:
            raise ValueError(f"samples of objective {objective!r} lack L2 columns {absent} "
                             f"(type {otype.type_name!r}); annotate them first")
        # Column by column: numeric and string columns come out of `tolist` as plain Python
        # already; only object cells (arrays, lists) need `_py` (a 1M-row pool in seconds).
        columns = [df[f"l2_{f}"] for f in otype.l2_columns]
        values = [c.tolist() if c.dtype != object else [_py(v) for v in c.tolist()]
                  for c in columns]
        l2 = [dict(zip(otype.l2_columns, row)) for row in zip(*values)] if values else \
            [{} for _ in range(len(df))]
    ids = df["id"].astype(str).tolist() if "id" in df.columns else [str(i) for i in range(len(df))]
    msgs = df["messages"] if "messages" in df.columns else None
    return _Samples(
        ids=ids,
        slice=df["slice"].astype(str).to_numpy(dtype=object),
        score=df["score"].to_numpy(dtype=float),
        valid=df["valid"].to_numpy(dtype=bool),
        weight=df["weight"].to_numpy(dtype=float),
        failure=df["failure"].to_numpy(dtype=bool),
        l2=l2,
        messages=(lambda i: _py(msgs.iloc[i])) if msgs is not None else (lambda i: None),
    )


# ---- borderline examples -------------------------------------------------------------------


def _borderline_indices(s: _Samples, slice_need: Mapping[str, float], n_examples: int,
                        seed: int) -> list[int]:
    """Valid samples closest to the pass/fail boundary, alternating failed and passed ones; on
    each side the neediest slices first, and one per slice before any slice gets a second."""
    valid = np.flatnonzero(s.valid)
    if n_examples <= 0 or valid.size == 0:
        return []
    failed = valid[s.failure[valid]]
    passed = valid[~s.failure[valid]]
    if failed.size and passed.size:
        boundary = (s.score[failed].max() + s.score[passed].min()) / 2
    elif failed.size:
        boundary = s.score[failed].max()
    else:
        boundary = s.score[passed].min()
    rng = np.random.default_rng(seed)

    def ranked(idx: np.ndarray) -> list[int]:
        idx = idx[rng.permutation(idx.size)]  # seeded tie-break, not file order
        need = np.array([slice_need.get(s.slice[i], 0.0) for i in idx])
        order = np.lexsort((-need, np.abs(s.score[idx] - boundary)))
        return idx[order].tolist()

    def one_per_slice_first(order: list[int]) -> list[int]:
        first, rest, seen = [], [], set()
        for i in order:
            (rest if s.slice[i] in seen else first).append(i)
            seen.add(s.slice[i])
        return first + rest

    sides = [one_per_slice_first(ranked(failed)), one_per_slice_first(ranked(passed))]
    shorter = min(len(sides[0]), len(sides[1]))
    merged = [i for pair in zip(*sides) for i in pair]
    merged += sides[0][shorter:] + sides[1][shorter:]
    return merged[:n_examples]


def _example(s: _Samples, i: int, otype: ObjectiveType, chars: int) -> BorderlineExample | None:
    messages = s.messages(i)
    if not messages:
        return None
    users = [m["content"] for m in messages if m["role"] == "user"]
    prompt = excerpt(users[-1] if users else "", chars)
    if len(users) > 1:
        prompt = f"(last of {len(users)} user turns) {prompt}"
    response = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    l2 = {k: s.l2[i][k] for k in otype.l2_columns if k in s.l2[i]}
    return BorderlineExample(slice=str(s.slice[i]), score=float(s.score[i]),
                             prompt_excerpt=prompt,
                             response_excerpt=excerpt(response, chars), l2=_py(l2))


# ---- the report ------------------------------------------------------------------------------


def _score_key(score: float) -> str:
    return str(int(score)) if float(score).is_integer() else f"{score:g}"


def build_failure_report(objective_name: str, objective_type: str | ObjectiveType, round: int,
                         records: Sequence[SampleRecord] | pd.DataFrame,
                         target: float | None = None, *, seed: int = 0, n_examples: int = 6,
                         excerpt_chars: int = 160,
                         n_resamples: int = DEFAULT_RESAMPLES) -> FailureReport:
    """f, score distribution, per-slice statistics, the type's breakdowns and borderline examples.

    `records` are scored `SampleRecord`s, or a frame in pool format (L1 columns, `l2_<field>`
    columns or an `l2` column of dicts, optional `id` and `messages`).
    """
    otype = get_objective_type(objective_type) if isinstance(objective_type, str) else objective_type
    if isinstance(records, pd.DataFrame):
        s = _from_frame(records, otype, objective_name)
    else:
        s = _from_records(list(records), objective_name)

    stats = slice_stats(s.slice, s.score, s.valid, s.weight, s.failure, slice_order=otype.slices,
                        target=target, seed=seed, n_resamples=n_resamples)
    valid_scores = s.score[s.valid]
    distribution = {str(k): 0 for k in range(1, 6)}
    for value, count in zip(*np.unique(valid_scores, return_counts=True)):
        distribution[_score_key(value)] = int(count)

    l1_rows = [L1(slice=str(sl), score=sc, valid=v, weight=w, failure=fl)
               for sl, sc, v, w, fl in zip(s.slice.tolist(), s.score.tolist(), s.valid.tolist(),
                                           s.weight.tolist(), s.failure.tolist())]
    breakdowns = _py(otype.breakdowns(s.l2, l1_rows))

    need = {st.slice: st.need for st in stats}
    examples = [ex for i in _borderline_indices(s, need, n_examples, seed)
                if (ex := _example(s, i, otype, excerpt_chars)) is not None]
    f = float(valid_scores.mean()) if valid_scores.size else None
    if f is not None and not math.isfinite(f):
        raise ValueError(f"objective {objective_name!r}: valid samples carry non-finite scores")
    ci_low, ci_high = bootstrap_ci(valid_scores, seed=[seed, 1], n_resamples=n_resamples)
    return FailureReport(
        objective=objective_name,
        objective_type=otype.type_name,
        round=round,
        f=f,
        f_ci_low=ci_low,
        f_ci_high=ci_high,
        n=len(s.ids),
        n_valid=int(s.valid.sum()),
        target=target,
        score_distribution=distribution,
        slices=stats,
        breakdowns=breakdowns,
        examples=examples,
    )


def render_failure_report(report: FailureReport, *, max_items: int = 8) -> str:
    """The report as the planner reads it (prompts/reports/failure_report.j2)."""
    from mosaic.prompts import render

    return render("reports/failure_report.j2", report=report, max_items=max_items)
