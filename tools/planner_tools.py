"""The planner's tools as plain functions: diagnose a slice, inspect examples, ask a pool what it
can supply, dry-run an action through the check. The heuristic planner calls them directly; the
LLM planner gets them as function tools. None of them can change the budget, skip the check or
reach the builder: they only read.

Examples come from the eval set's responses, anonymised and cut short (`eval.report.excerpt`),
and are returned as data: the LLM planner fences them and labels them untrusted, because a
prompt in an eval set may carry instructions aimed at whoever reads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mosaic.eval.base import get_objective_type
from mosaic.schemas import (L1, DataAction, ExampleView, FailureReport, ObjectiveAction,
                            PoolCapacity, SliceDiagnosis, TrainMethod)

Which = Literal["failed", "passed", "any"]


# ---- the arguments a model may pass (the LLM planner's tool schemas are made from these) -------


class ToolArgs(BaseModel):
    """Arguments of one tool call from a model: unknown keys are an error the model is told."""

    model_config = ConfigDict(extra="forbid")


class DiagnoseSliceArgs(ToolArgs):
    objective: str = Field(description="an objective of this run")
    slice: str = Field(description="one of the objective type's slices")


class InspectExamplesArgs(ToolArgs):
    objective: str = Field(description="an objective of this run")
    slice: str | None = Field(None, description="only samples of this slice")
    which: Which = Field("failed", description="failed samples first (lowest score), passed "
                                               "ones (highest score), or any")
    n: int = Field(3, ge=1, le=10, description="how many samples")


class PoolCapacityArgs(ToolArgs):
    objective: str = Field(description="an objective of this run")
    method: TrainMethod = Field("sft", description="sft counts rows; dpo and sft+dpo count "
                                                   "preference pairs")
    quality_threshold: float | None = Field(None, description="drop pool rows whose quality "
                                                              "score is below this")
    include: dict[str, Any] | None = Field(None, description="focus criteria: rows to prefer")
    exclude: dict[str, Any] | None = Field(None, description="focus criteria: rows to leave out")


class DryRunActionArgs(ToolArgs):
    action: dict[str, Any] = Field(description="a data action (the JSON you would answer with)")


def _samples(eval_dir: Path, objective: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    samples = pq.read_table(eval_dir / objective / "samples.parquet").to_pylist()
    convs = {r["id"]: r["messages"] for r in
             pq.read_table(eval_dir / objective / "responses.parquet",
                           columns=["id", "messages"]).to_pylist()}
    for s in samples:
        s["messages"] = convs.get(s["id"]) or []
        s["l2"] = json.loads(s["l2"]) if s["l2"] else {}
    return [s for s in samples if s["slice"] is not None]


def diagnose_slice(report: FailureReport, slice: str, *, eval_dir: str | Path | None = None,
                   history: Mapping[int, FailureReport] | None = None) -> SliceDiagnosis:
    """One slice of an objective: its statistics, its share of the objective's need, its mean in
    earlier rounds, and the objective type's breakdown over just this slice's samples."""
    otype = get_objective_type(report.objective_type)
    if slice not in otype.slices:
        raise ValueError(f"{slice!r} is not a slice of {report.objective!r} "
                         f"(slices: {', '.join(otype.slices)})")
    by_need = sorted(report.slices, key=lambda s: -s.need)
    stats = next((s for s in report.slices if s.slice == slice), None)
    total = sum(s.need for s in report.slices)
    rank = next((i for i, s in enumerate(by_need, 1) if s.slice == slice), len(by_need) + 1)
    past = {}
    for r, rep in sorted((history or {}).items()):
        st = next((s for s in rep.slices if s.slice == slice), None)
        past[r] = st.mean if st is not None else None
    breakdown: dict[str, Any] = {}
    if eval_dir is not None and (Path(eval_dir) / report.objective / "samples.parquet").is_file():
        rows = [s for s in _samples(Path(eval_dir), report.objective) if s["slice"] == slice]
        l1 = [L1(slice=s["slice"], score=s["score"], valid=s["valid"], weight=s["weight"],
                 failure=s["failure"]) for s in rows]
        breakdown = otype.breakdowns([s["l2"] for s in rows], l1) if rows else {}
    advice = []
    if stats is None or stats.n_valid == 0:
        advice.append("no valid eval samples in this slice: its score says nothing")
    else:
        if stats.reliability != "high":
            advice.append(f"{stats.reliability} reliability (n={stats.n_valid}): treat its mean "
                          f"as noisy")
        if stats.fail_rate is not None and stats.fail_rate >= 0.5:
            advice.append(f"most samples fail ({stats.fail_rate:.0%})")
    return SliceDiagnosis(objective=report.objective, slice=slice, stats=stats,
                          share_of_need=(stats.need / total) if stats is not None and total else 0.0,
                          rank_by_need=rank, history=past, breakdown=breakdown, advice=advice)


def inspect_examples(eval_dir: str | Path, objective: str, *, slice: str | None = None,
                     which: Which = "failed", n: int = 3, chars: int = 200) -> list[ExampleView]:
    """Up to `n` eval samples of an objective (optionally one slice), failed or passed ones
    first by how far below/above the boundary they are; anonymised excerpts of the last user
    turn and the model's reply."""
    from mosaic.eval.report import excerpt

    if which not in ("failed", "passed", "any"):
        raise ValueError(f"which must be 'failed', 'passed' or 'any', got {which!r}")
    if not 1 <= n <= 20:
        raise ValueError(f"n must be between 1 and 20, got {n}")
    rows = [s for s in _samples(Path(eval_dir), objective)
            if s["valid"] and (slice is None or s["slice"] == slice)
            and (which == "any" or bool(s["failure"]) == (which == "failed"))]
    rows.sort(key=lambda s: (s["score"], s["id"]) if which != "passed" else (-s["score"], s["id"]))
    out = []
    for s in rows[:n]:
        users = [m["content"] for m in s["messages"] if m["role"] == "user"]
        reply = s["messages"][-1]["content"] if s["messages"] else ""
        out.append(ExampleView(id=s["id"], slice=s["slice"], score=s["score"],
                               failed=bool(s["failure"]), turns=len(users),
                               prompt_excerpt=excerpt(users[-1] if users else "", chars),
                               response_excerpt=excerpt(reply, chars), l2=s["l2"]))
    return out


def pool_capacity(pools: Any, objective: str, budget: int, *, method: str = "sft",
                  quality_threshold: float | None = None,
                  include: Mapping[str, Any] | None = None,
                  exclude: Mapping[str, Any] | None = None) -> PoolCapacity:
    """Tokens a pool can supply per bucket under a threshold and focus criteria (the same
    computation the check and the builder use). `pools` is a `PreparedPools`."""
    from mosaic.schemas import FocusCriteria, data_method
    from mosaic.tools.dataset.allocation import objective_units, supply

    if objective not in pools.tables:
        raise ValueError(f"no pool for objective {objective!r}; pools: {pools.objectives}")
    from mosaic.tools.validate_action import _focus_value_problems

    otype = pools.types[objective]
    for which, criteria in (("include", include or {}), ("exclude", exclude or {})):
        for key, value in criteria.items():
            if key not in otype.focus_keys:
                raise ValueError(f"{key!r} is not a focus key of {objective!r}; keys: "
                                 f"{', '.join(sorted(otype.focus_keys))}")
            # The check's own rules for a value, so a malformed one (a number where a list
            # goes) is the caller's error, said the way the check says it, not a TypeError.
            problems = _focus_value_problems(otype, key, value, f"$.{which}.{key}", None)
            if problems:
                raise ValueError("; ".join(f"{p.path}: {p.message}" + (f" ({p.hint})" if p.hint
                                                                        else "")
                                           for p in problems))
    if method not in ("sft", "dpo", "sft+dpo"):
        raise ValueError(f"unknown method {method!r}; expected sft, dpo or sft+dpo")
    rows_of = data_method(method)  # sft+dpo draws the same pairs as dpo
    cands = pools.candidates(rows_of)[objective]
    focus = FocusCriteria(include=dict(include or {}), exclude=dict(exclude or {}))
    oa = ObjectiveAction(focus=focus if (include or exclude) else None,
                         quality_threshold=quality_threshold)
    units = objective_units(cands, oa, None, rows_of)
    avail, focus_avail = supply(cands, units)
    total = sum(avail.values())
    return PoolCapacity(objective=objective, method=method,  # type: ignore[arg-type]
                        quality_threshold=quality_threshold, available_tokens=avail,
                        focus_tokens=focus_avail, total_tokens=total,
                        max_mixture_weight=min(1.0, total / budget) if budget else 0.0,
                        dropped={**cands.dropped, **units.dropped})


def dry_run_action(raw: str | bytes | dict[str, Any], context: Any):
    """The check's verdict on an action, without building anything (`ActionContext` given)."""
    from mosaic.tools.validate_action import validate_action

    return validate_action(raw, context)


def action_json(action: DataAction) -> str:
    """An action as the compact JSON a planner proposes (defaults left out)."""
    return json.dumps(action.model_dump(mode="json", exclude_defaults=True), sort_keys=True)


def summarise(result: Any, limit: int = 400) -> str:
    """A short text of a tool result for the audit log."""
    if isinstance(result, Sequence) and not isinstance(result, str):
        text = json.dumps([getattr(r, "model_dump", lambda **_: r)(mode="json") for r in result])
    elif hasattr(result, "model_dump_json"):
        text = result.model_dump_json()
    else:
        text = json.dumps(result, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"
