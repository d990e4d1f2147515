"""The check: a proposed data action against the schema, the pools, the budget and human limits.

A proposal usually comes from a model, so a bad one is data, not an exception: the verdict lists
one `Problem` per issue, each with a JSON path and a hint that says what would be valid (allowed
keys, existing slices, the tokens a bucket can supply after filters, the floor or ceiling).
Status `fixable` means only rounding-level repairs were needed (weights off by <= 1e-6), and the
verdict's action carries them, with a note each; anything more is `invalid`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from mosaic.config import LimitsConfig
from mosaic.eval.base import ObjectiveType, get_objective_type
from mosaic.schemas import (SCHEMA_VERSION, ActionVerdict, DataAction, FocusCriteria,
                            ObjectiveAction, Problem, data_method)

if TYPE_CHECKING:
    from mosaic.config import MosaicConfig
    from mosaic.tools.dataset.pools import PreparedPools

MAX_ACTION_BYTES = 64 * 1024
MAX_DEPTH = 12
ROUNDING_TOL = 1e-6
ROUNDING_NOTE = "(rounding only)"
SCORE_RANGE = (1.0, 5.0)
# Keys a planner might use to pull specific items (or whole eval sets) into training. Actions
# select rows only through per-type focus keys, so any of these is an attempt to touch items.
_ITEM_KEY = re.compile(r"(^|_)(ids?|item|items|rows?|eval|evals|heldout|held_out|test|benchmark)($|_)",
                       re.IGNORECASE)
_BUDGET_KEYS = {"budget", "max_tokens", "token_budget", "total_tokens", "tokens", "t_max"}


@dataclass(frozen=True)
class ActionContext:
    """Everything the check needs besides the proposal itself."""

    objectives: Mapping[str, str]  # objective name -> objective type name
    budget: int  # the run's T_max; an action can never change it
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    pools: "PreparedPools | None" = None
    previous_action: DataAction | None = None
    eval_ids: frozenset[str] = frozenset()
    eval_sources: tuple[str, ...] = ()  # eval / held-out file paths
    score_range: tuple[float, float] = SCORE_RANGE
    max_bytes: int = MAX_ACTION_BYTES
    # The build seed, when known: DPO pairs break score ties with it, so the supply the check
    # computes is then exactly the builder's (without it, ties go by pool order).
    seed: int | None = None

    @classmethod
    def from_config(cls, config: "MosaicConfig", pools: "PreparedPools | None" = None, *,
                    previous_action: DataAction | None = None,
                    eval_ids: frozenset[str] | set[str] = frozenset()) -> "ActionContext":
        sources = tuple(p for o in config.objectives.values() for p in (o.eval, o.heldout) if p)
        return cls(objectives={n: o.type for n, o in config.objectives.items()},
                   budget=config.budget.max_tokens, limits=config.limits, pools=pools,
                   previous_action=previous_action, eval_ids=frozenset(eval_ids),
                   eval_sources=sources)


# --------------------------------------------------------------------------------------------
# Strict parsing of untrusted JSON
# --------------------------------------------------------------------------------------------


class _Pairs(dict):
    """A JSON object that remembers keys it saw more than once."""

    duplicates: list[str]


class _NonFinite:
    def __init__(self, literal: str) -> None:
        self.literal = literal


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _Pairs:
    out = _Pairs()
    out.duplicates = []
    for k, v in pairs:
        if k in out:
            out.duplicates.append(k)
        out[k] = v
    return out


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"{path}[{json.dumps(key)}]"


def _walk(node: Any, path: str, depth: int, problems: list[Problem]) -> Any:
    """Report duplicates, non-finite numbers and over-deep nesting; return plain JSON values."""
    if depth > MAX_DEPTH:
        problems.append(Problem(code="too_deep", path=path,
                                message=f"nesting deeper than {MAX_DEPTH} levels",
                                hint="a data action is at most 5 levels deep"))
        return None
    if isinstance(node, _NonFinite) or (isinstance(node, float) and not math.isfinite(node)):
        literal = node.literal if isinstance(node, _NonFinite) else repr(node)
        problems.append(Problem(code="non_finite", path=path,
                                message=f"{literal} is not a finite number",
                                hint="use a finite number (weights and ratios lie in [0, 1])"))
        return None
    if isinstance(node, dict):
        for k in getattr(node, "duplicates", []):
            problems.append(Problem(code="duplicate_key", path=_key_path(path, k),
                                    message=f"key {k!r} appears more than once",
                                    hint="give each key once; JSON readers disagree on which "
                                         "duplicate wins"))
        out = {}
        for k, v in node.items():
            if not isinstance(k, str):
                problems.append(Problem(code="wrong_type", path=path,
                                        message=f"object key {k!r} is not a string",
                                        hint="JSON object keys are strings"))
                continue
            out[k] = _walk(v, _key_path(path, k), depth + 1, problems)
        return out
    if isinstance(node, (list, tuple)):
        return [_walk(v, f"{path}[{i}]", depth + 1, problems) for i, v in enumerate(node)]
    if node is None or isinstance(node, (str, bool, int, float)):
        return node
    problems.append(Problem(code="wrong_type", path=path,
                            message=f"{type(node).__name__} is not a JSON value",
                            hint="use objects, arrays, strings, numbers, booleans or null"))
    return None


def too_large_problem(size: int, max_bytes: int = MAX_ACTION_BYTES) -> Problem:
    """The one wording of an oversize action; callers that read a capped prefix of a file pass
    the file's real size."""
    return Problem(code="too_large", path="$",
                   message=f"action is {size:,} bytes; the limit is {max_bytes:,}",
                   hint="an action is a few hundred bytes: mixture, per-objective weights and "
                        "focus, threshold, method, short rationale")


def parse_untrusted(raw: str | bytes | dict[str, Any], max_bytes: int = MAX_ACTION_BYTES
                    ) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Parse a proposal strictly: size limit, UTF-8, no duplicate keys, no NaN/Infinity,
    an object at the top. Returns (data, problems); data is None when it cannot be used."""
    problems: list[Problem] = []
    if isinstance(raw, dict):
        tree: Any = raw
    else:
        if isinstance(raw, str):
            data = raw.encode("utf-8", errors="surrogatepass")
        elif isinstance(raw, (bytes, bytearray)):
            data = bytes(raw)
        else:
            return None, [Problem(code="wrong_type", path="$",
                                  message=f"expected JSON text or an object, got {type(raw).__name__}",
                                  hint="send the action as one JSON object")]
        if len(data) > max_bytes:
            return None, [too_large_problem(len(data), max_bytes)]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, [Problem(code="not_utf8", path="$", message=f"not UTF-8: {e}",
                                  hint="send UTF-8 JSON")]
        try:
            tree = json.loads(text, object_pairs_hook=_pairs_hook, parse_constant=_NonFinite)
        except json.JSONDecodeError as e:
            return None, [Problem(code="json_syntax", path="$",
                                  message=f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                                  hint="send exactly one JSON object, no comments, no trailing "
                                       "commas, no code fences")]
        except RecursionError:
            return None, [Problem(code="too_deep", path="$", message="JSON nested too deeply",
                                  hint="a data action is at most 5 levels deep")]
    clean = _walk(tree, "$", 0, problems)
    if isinstance(raw, dict) and not problems:
        size = len(json.dumps(clean).encode("utf-8"))
        if size > max_bytes:
            return None, [Problem(code="too_large", path="$",
                                  message=f"action is {size:,} bytes as JSON; the limit is "
                                          f"{max_bytes:,}",
                                  hint="an action is a few hundred bytes: mixture, per-objective "
                                       "weights and focus, threshold, method, short rationale")]
    if not isinstance(clean, dict):
        problems.append(Problem(code="wrong_type", path="$",
                                message=f"top level is {type(tree).__name__}, not an object",
                                hint='send one object: {"mixture": {...}, "objectives": {...}, ...}'))
        return None, problems
    return clean, problems


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

_MODEL_FIELDS = {
    "action": sorted(DataAction.model_fields),
    "objective": sorted(ObjectiveAction.model_fields),
    "focus": sorted(FocusCriteria.model_fields),
}


def _path(loc: tuple[Any, ...]) -> str:
    out = "$"
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else _key_path(out, str(part))
    return out


def _fields_at(loc: tuple[Any, ...]) -> list[str] | None:
    if len(loc) == 1:
        return _MODEL_FIELDS["action"]
    if len(loc) == 3 and loc[0] == "objectives":
        return _MODEL_FIELDS["objective"]
    if len(loc) == 4 and loc[0] == "objectives" and loc[2] == "focus":
        return _MODEL_FIELDS["focus"]
    return None


def _schema_problems(err: ValidationError, budget: int | None) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = _path(loc)
        kind = e["type"]
        last = str(loc[-1]) if loc else ""
        if kind == "extra_forbidden":
            if last.lower() in _BUDGET_KEYS:
                out.append(Problem(code="budget_not_settable", path=path,
                                   message=f"an action cannot set the token budget ({last!r})",
                                   hint=(f"the budget is the run's: {budget:,} tokens; "
                                         if budget is not None else "the budget is the run's; ")
                                        + "shape how it is spent with mixture and bucket_weights"))
            elif _ITEM_KEY.search(last):
                out.append(Problem(code="eval_reference", path=path,
                                   message=f"{last!r} would select specific items or sets",
                                   hint="actions select pool rows only through focus keys; eval "
                                        "and held-out items never enter training"))
            else:
                allowed = _fields_at(loc) or []
                out.append(Problem(code="unknown_field", path=path,
                                   message=f"unknown field {last!r}",
                                   hint=f"allowed fields here: {', '.join(allowed)}"))
        elif kind == "missing":
            out.append(Problem(code="missing_field", path=path, message=f"{last!r} is required",
                               hint='e.g. "mixture": {"<objective>": <weight>, ...} summing to 1'))
        elif kind == "literal_error":
            out.append(Problem(code="invalid_value", path=path,
                               message=f"{e['input']!r} is not allowed",
                               hint=f"expected {e.get('ctx', {}).get('expected', 'one of the allowed values')}"))
        elif kind in ("float_type", "int_type", "float_parsing", "finite_number"):
            out.append(Problem(code="wrong_type", path=path,
                               message=f"{e['input']!r} is not a number",
                               hint="use a JSON number (not a string or boolean)"))
        elif kind in ("dict_type", "model_type"):
            out.append(Problem(code="wrong_type", path=path,
                               message=f"expected an object, got {type(e['input']).__name__}",
                               hint="use a JSON object here"))
        else:
            out.append(Problem(code="wrong_type", path=path, message=e["msg"],
                               hint="see `mosaic schema` for the DataAction JSON Schema"))
    return out


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _normalise_weights(weights: Mapping[str, float], path: str, what: str,
                       problems: list[Problem], notes: list[str]) -> dict[str, float] | None:
    """Non-negative, summing to 1; within ROUNDING_TOL it is renormalised and noted."""
    ok = True
    for k, w in weights.items():
        if w < 0:
            problems.append(Problem(code="negative_weight", path=_key_path(path, k),
                                    message=f"{what} weight {_fmt(w)} is negative",
                                    hint="weights are >= 0; use 0 (or leave the key out) to give "
                                         "it nothing"))
            ok = False
    if not ok:
        return None
    total = sum(weights.values())
    if not weights or total <= 0:
        problems.append(Problem(code="weights_not_summing", path=path,
                                message=f"{what} weights are empty or all zero",
                                hint="give at least one positive weight; weights sum to 1"))
        return None
    if abs(total - 1.0) > ROUNDING_TOL:
        fixed = {k: round(w / total, 6) for k, w in weights.items()}
        problems.append(Problem(code="weights_not_summing", path=path,
                                message=f"{what} weights sum to {_fmt(total)}, not 1",
                                hint=f"divide each by {_fmt(total)}: {json.dumps(fixed)}"))
        return None
    if total != 1.0:
        notes.append(f"{path}: weights summed to {total!r}; renormalised {ROUNDING_NOTE}")
        return {k: w / total for k, w in weights.items()}
    return dict(weights)


def _focus_value_problems(otype: ObjectiveType, key: str, value: Any, path: str,
                          present: set[Any] | None) -> list[Problem]:
    spec = otype.focus_keys[key]
    if spec.kind == "range":
        ok = (isinstance(value, list) and len(value) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        lo_b, hi_b = spec.bounds or (-math.inf, math.inf)
        if not ok:
            return [Problem(code="bad_range", path=path,
                            message=f"{key} must be [lo, hi], got {json.dumps(value)}",
                            hint=f"two numbers with {lo_b:g} <= lo <= hi <= {hi_b:g}, e.g. "
                                 f"[{lo_b:g}, {hi_b:g}]")]
        lo, hi = value
        if lo > hi or lo < lo_b or hi > hi_b:
            return [Problem(code="bad_range", path=path,
                            message=f"{key} {json.dumps(value)} is empty or outside "
                                    f"[{lo_b:g}, {hi_b:g}]",
                            hint=f"use {lo_b:g} <= lo <= hi <= {hi_b:g}")]
        return []
    if not isinstance(value, list) or not value:
        return [Problem(code="wrong_type", path=path,
                        message=f"{key} must be a non-empty list of values, got {json.dumps(value)}",
                        hint=_allowed_values_hint(spec, present))]
    out = []
    for i, v in enumerate(value):
        allowed = spec.values
        bad_type = isinstance(v, bool) or not isinstance(v, (str, int))
        if allowed is not None:
            unknown = bad_type or v not in allowed
        else:
            unknown = bad_type or (present is not None and v not in present)
        if unknown:
            out.append(Problem(code="unknown_focus_value", path=f"{path}[{i}]",
                               message=f"{json.dumps(v)} is not a value of {key}"
                                       + ("" if allowed is not None else " present in the pool"),
                               hint=_allowed_values_hint(spec, present)))
    return out


def _allowed_values_hint(spec: Any, present: set[Any] | None) -> str:
    vals = list(spec.values) if spec.values is not None else sorted(present or [], key=str)
    shown = ", ".join(json.dumps(v) for v in vals[:30]) + (" ..." if len(vals) > 30 else "")
    return f"allowed values: {shown}" if vals else "no values of this key exist in the pool"


def _present_values(pools: "PreparedPools | None", name: str, method: str,
                    column: str) -> set[Any] | None:
    if pools is None or name not in pools.tables:
        return None
    import pyarrow as pa
    import pyarrow.compute as pc

    cands = pools.candidates(method)[name]
    col = cands.focus_table.column(column)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        col = pc.list_flatten(col)
    return set(pc.unique(col).to_pylist()) - {None}


def _strings(node: Any, path: str) -> list[tuple[str, str]]:
    """Every (path, string) of a JSON tree, keys included."""
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            p = _key_path(path, k)
            out.append((p, k))
            out.extend(_strings(v, p))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_strings(v, f"{path}[{i}]"))
    elif isinstance(node, str):
        out.append((path, node))
    return out


def _eval_reference_problems(data: dict[str, Any], ctx: ActionContext) -> list[Problem]:
    out = []
    sources = {s for s in ctx.eval_sources}
    stems = {s.rsplit("/", 1)[-1] for s in sources}
    for path, s in _strings({k: v for k, v in data.items() if k != "rationale"}, "$"):
        if s in ctx.eval_ids:
            out.append(Problem(code="eval_reference", path=path,
                               message=f"{s!r} is the id of an eval or held-out item",
                               hint="eval and held-out items never enter training; select pool "
                                    "rows with the objective type's focus keys"))
        elif s in sources or s in stems:
            out.append(Problem(code="eval_reference", path=path,
                               message=f"{s!r} names an eval or held-out set",
                               hint="actions draw only from the configured training pools"))
    return out


def _limit_problems(mixture: Mapping[str, float], ctx: ActionContext) -> list[Problem]:
    out = []
    lim = ctx.limits
    for name, floor in sorted(lim.floors.items()):
        w = mixture.get(name, 0.0)
        if w < floor - 1e-9:
            out.append(Problem(code="below_floor", path=_key_path("$.mixture", name),
                               message=f"mixture weight {_fmt(w)} is below the floor {_fmt(floor)} "
                                       f"a person set for {name!r}",
                               hint=f"set mixture.{name} >= {_fmt(floor)} and take the difference "
                                    f"from objectives without a floor"))
    for name, ceiling in sorted(lim.ceilings.items()):
        w = mixture.get(name, 0.0)
        if w > ceiling + 1e-9:
            out.append(Problem(code="above_ceiling", path=_key_path("$.mixture", name),
                               message=f"mixture weight {_fmt(w)} is above the ceiling "
                                       f"{_fmt(ceiling)} a person set for {name!r}",
                               hint=f"set mixture.{name} <= {_fmt(ceiling)}"))
    if lim.max_change is not None and ctx.previous_action is not None:
        prev = ctx.previous_action.mixture
        for name in sorted(set(prev) | set(mixture)):
            w, p = mixture.get(name, 0.0), prev.get(name, 0.0)
            if abs(w - p) > lim.max_change + 1e-9:
                lo, hi = max(0.0, p - lim.max_change), min(1.0, p + lim.max_change)
                out.append(Problem(code="change_too_large", path=_key_path("$.mixture", name),
                                   message=f"{name!r} moves {_fmt(p)} -> {_fmt(w)}, more than the "
                                           f"per-round limit {_fmt(lim.max_change)}",
                                   hint=f"keep mixture.{name} within [{_fmt(lo)}, {_fmt(hi)}]"))
    return out


def _capacity_problems(action: DataAction, ctx: ActionContext, notes: list[str]) -> list[Problem]:
    from mosaic.tools.dataset.allocation import (bucket_allocations, objective_allocations,
                                                 objective_units, row_keys, supply)

    pools = ctx.pools
    out: list[Problem] = []
    allocs = objective_allocations(ctx.budget, action.mixture)
    q = action.quality_threshold
    for name, a_o in allocs.items():
        if a_o == 0:
            continue
        mpath = _key_path("$.mixture", name)
        if pools is None or name not in pools.tables:
            out.append(Problem(code="no_pool", path=mpath,
                               message=f"objective {name!r} has no training pool to draw from",
                               hint=f"set mixture.{name} to 0, or add objectives.{name}.pool to the "
                                    f"config"))
            continue
        rows_of = data_method(action.method_of(name))
        cands = pools.candidates(rows_of)[name]
        oa = action.objectives.get(name)
        keys = (row_keys(ctx.seed, name, cands.n_pool_rows)[cands.rows]
                if ctx.seed is not None and rows_of == "dpo" else None)
        units = objective_units(cands, oa, q, rows_of, keys)
        avail, focus_avail = supply(cands, units)
        total = sum(avail.values())
        q_o = oa.quality_threshold if oa is not None and oa.quality_threshold is not None else q
        filters = (f"quality >= {_fmt(q_o)}, " if q_o is not None and rows_of == "sft" else "") + \
            ("exclude criteria, " if oa and oa.focus and oa.focus.exclude else "") + \
            "dedup, eval overlap, length" + (", DPO pairing" if rows_of == "dpo" else "")
        opath = _key_path("$.objectives", name)
        bw = oa.bucket_weights if oa is not None else None
        if bw is None and total < a_o:
            max_w = total / ctx.budget
            out.append(Problem(code="unfillable", path=mpath,
                               message=f"{name!r} needs {a_o:,} tokens but its pool supplies "
                                       f"{total:,} after filters ({filters}): short by "
                                       f"{a_o - total:,}",
                               hint=f"lower mixture.{name} to <= {max_w:.6f}"
                                    + (" or lower quality_threshold" if q_o is not None else "")
                                    + (" or relax exclude" if oa and oa.focus and oa.focus.exclude else "")))
            continue
        balloc = bucket_allocations(a_o, bw, avail)
        # Without include criteria there are no focus rows and focus_ratio has no effect.
        has_include = bool(oa is not None and oa.focus is not None and oa.focus.include)
        ratio = oa.focus_ratio if has_include else 0.0
        spare = {b: avail[b] - balloc.get(b, 0) for b in avail if avail[b] > balloc.get(b, 0)}
        for b, a_b in balloc.items():
            have = avail.get(b, 0)
            bpath = _key_path(f"{opath}.bucket_weights", b) if bw is not None else mpath
            if have < a_b:
                max_bw = have / a_o if a_o else 0.0
                others = ", ".join(f"{k} (+{v:,})" for k, v in sorted(spare.items()) if k != b)
                out.append(Problem(code="unfillable", path=bpath,
                                   message=f"bucket {b!r} of {name!r} needs {a_b:,} tokens but "
                                           f"supplies {have:,} after filters ({filters}): short by "
                                           f"{a_b - have:,}",
                                   hint=f"lower bucket_weights.{b} to <= {max_bw:.6f}"
                                        + (f"; buckets with spare tokens: {others}" if others else "")
                                        + f"; or lower mixture.{name}"))
                continue
            f_alloc = min(a_b, int(math.floor(a_b * ratio)))
            f_have = focus_avail.get(b, 0)
            if f_alloc > f_have:
                # focus_ratio is a first claim "up to" a share, not a quota: the bucket is still
                # filled from its other rows, so this is worth knowing but not a rejection.
                notes.append(f"{opath}.focus_ratio: focus rows of bucket {b!r} supply {f_have:,} "
                             f"of the {f_alloc:,} tokens focus_ratio asks; the rest of the "
                             f"bucket comes from its other rows (max focus_ratio here: "
                             f"{f_have / a_b if a_b else 0:.6f})")
    return out


def validate_action(raw: str | bytes | dict[str, Any], context: ActionContext) -> ActionVerdict:
    """Check a proposed action; never raises on bad input (the verdict says what is wrong).

    An exception from here is a defect in the check, not a verdict on the action: it propagates
    (a crash with a traceback, exit 1), because turning it into an "invalid" verdict would send
    the planner to revise a valid action, refuse it, skip the round and exit 0 as if all went
    well."""
    return _validate(raw, context)


def _validate(raw: str | bytes | dict[str, Any], ctx: ActionContext) -> ActionVerdict:
    data, problems = parse_untrusted(raw, ctx.max_bytes)
    if data is None or problems:
        return ActionVerdict(status="invalid", problems=problems)
    problems.extend(_eval_reference_problems(data, ctx))
    try:
        action = DataAction.model_validate(data, strict=True)
    except ValidationError as e:
        problems.extend(_schema_problems(e, ctx.budget))
        # Unknown fields alone do not stop the remaining checks: the planner gets every
        # problem in one round trip.
        salvaged = _without_extras(data, e)
        if salvaged is None:
            return ActionVerdict(status="invalid", problems=problems)
        try:
            action = DataAction.model_validate(salvaged, strict=True)
        except ValidationError:
            return ActionVerdict(status="invalid", problems=problems)
    notes: list[str] = []
    if action.schema_version != SCHEMA_VERSION:
        problems.append(Problem(code="schema_version", path="$.schema_version",
                                message=f"schema_version {action.schema_version} is not "
                                        f"{SCHEMA_VERSION}",
                                hint=f"use schema_version {SCHEMA_VERSION} (or leave it out)"))
    known = sorted(ctx.objectives)

    def unknown_objective(path: str, name: str) -> Problem:
        if _ITEM_KEY.search(name):
            return Problem(code="eval_reference", path=path,
                           message=f"{name!r} is not a training pool",
                           hint=f"only training pools can be mixed: {', '.join(known)}")
        return Problem(code="unknown_objective", path=path, message=f"unknown objective {name!r}",
                       hint=f"objectives of this run: {', '.join(known)}")

    mixture_ok = True
    for name in action.mixture:
        if name not in ctx.objectives:
            problems.append(unknown_objective(_key_path("$.mixture", name), name))
            mixture_ok = False
    mixture = _normalise_weights(action.mixture, "$.mixture", "mixture", problems, notes)
    if mixture is None:
        mixture_ok = False
    if mixture_ok and mixture is not None:
        problems.extend(_limit_problems(mixture, ctx))

    q = action.quality_threshold
    lo, hi = ctx.score_range
    if q is not None and not lo <= q <= hi:
        problems.append(Problem(code="threshold_out_of_range", path="$.quality_threshold",
                                message=f"quality_threshold {_fmt(q)} is outside the score range "
                                        f"[{_fmt(lo)}, {_fmt(hi)}]",
                                hint=f"use a value in [{_fmt(lo)}, {_fmt(hi)}], or null for no "
                                     f"threshold"))

    new_objectives: dict[str, ObjectiveAction] = {}
    for name, oa in action.objectives.items():
        opath = _key_path("$.objectives", name)
        if name not in ctx.objectives:
            problems.append(unknown_objective(opath, name))
            continue
        otype = get_objective_type(ctx.objectives[name])
        bw = oa.bucket_weights
        if bw is not None:
            bpath = f"{opath}.bucket_weights"
            present = _present_slices(ctx, name, data_method(action.method_of(name)))
            for b in bw:
                if b not in otype.slices:
                    problems.append(Problem(
                        code="unknown_slice", path=_key_path(bpath, b),
                        message=f"{b!r} is not a slice of {name!r} (type {otype.type_name})",
                        hint=f"slices: {', '.join(otype.slices)}"
                             + (f"; present in the pool: {', '.join(present)}" if present else "")))
            bw = _normalise_weights(bw, bpath, "bucket", problems, notes)
        q_o = oa.quality_threshold
        if q_o is not None and not lo <= q_o <= hi:
            problems.append(Problem(code="threshold_out_of_range", path=f"{opath}.quality_threshold",
                                    message=f"quality_threshold {_fmt(q_o)} is outside the score "
                                            f"range [{_fmt(lo)}, {_fmt(hi)}]",
                                    hint=f"use a value in [{_fmt(lo)}, {_fmt(hi)}], or null to use "
                                         f"the action's quality_threshold"))
        ratio = oa.focus_ratio
        if not 0.0 <= ratio <= 1.0:
            if -ROUNDING_TOL <= ratio <= 1.0 + ROUNDING_TOL:
                notes.append(f"{opath}.focus_ratio {ratio!r} clamped to [0, 1] {ROUNDING_NOTE}")
                ratio = min(1.0, max(0.0, ratio))
            else:
                problems.append(Problem(code="focus_ratio_out_of_range", path=f"{opath}.focus_ratio",
                                        message=f"focus_ratio {_fmt(ratio)} is outside [0, 1]",
                                        hint="the share of each bucket's allocation drawn from "
                                             "focus rows first: a number in [0, 1]"))
        focus = oa.focus
        if focus is not None:
            for part in ("include", "exclude"):
                crit = getattr(focus, part)
                ppath = f"{opath}.focus.{part}"
                for key, value in crit.items():
                    kpath = _key_path(ppath, key)
                    if key not in otype.focus_keys:
                        if _ITEM_KEY.search(key):
                            problems.append(Problem(
                                code="eval_reference", path=kpath,
                                message=f"focus key {key!r} would select specific items",
                                hint=f"eval and held-out items never enter training; select "
                                     f"pool rows by their labels with the focus keys for "
                                     f"{name!r}: {', '.join(sorted(otype.focus_keys))}"))
                        else:
                            problems.append(Problem(
                                code="unknown_focus_key", path=kpath,
                                message=f"{key!r} is not a focus key of type {otype.type_name}",
                                hint=f"focus keys for {name!r}: "
                                     f"{', '.join(sorted(otype.focus_keys))}"))
                        continue
                    spec = otype.focus_keys[key]
                    # Open-ended values (ifeval constraint ids) must exist in the pool to be
                    # worth including; excluding an absent one is a harmless no-op.
                    present = (_present_values(ctx.pools, name,
                                               data_method(action.method_of(name)), spec.column)
                               if spec.values is None and spec.kind == "set" and part == "include"
                               else None)
                    problems.extend(_focus_value_problems(otype, key, value, kpath, present))
            if ratio > 0 and not focus.include:
                notes.append(f"{opath}: focus_ratio {ratio} without include criteria has no effect")
        new_objectives[name] = oa.model_copy(update={"bucket_weights": bw, "focus_ratio": ratio})

    if problems or not mixture_ok or mixture is None:
        return ActionVerdict(status="invalid", problems=problems)
    fixed = action.model_copy(update={"mixture": mixture, "objectives": new_objectives})
    for name in sorted(set(ctx.objectives) - set(mixture)):
        notes.append(f"{name!r} is not in the mixture: it gets no tokens this round")
    for name, oa in fixed.objectives.items():
        if mixture.get(name, 0.0) == 0.0:
            notes.append(f"objectives.{name} is set but {name!r} has mixture weight 0")
    # Capacity is only meaningful for a well-formed action, so it is checked last.
    problems.extend(_capacity_problems(fixed, ctx, notes))
    if ctx.pools is not None:
        for name in ctx.pools.objectives:
            n = ctx.pools.candidates(data_method(fixed.method_of(name)))[name].dropped.get(
                "eval_overlap", 0)
            if n:
                notes.append(f"{name}: {n} pool rows match eval/held-out prompts and are never "
                             f"used")
    if problems:
        return ActionVerdict(status="invalid", problems=problems, notes=notes)
    rounding = any(n.endswith(ROUNDING_NOTE) for n in notes)
    return ActionVerdict(status="fixable" if rounding else "ok", action=fixed, notes=notes)


def parse_previous_action(raw: str | bytes, max_bytes: int = MAX_ACTION_BYTES
                          ) -> tuple[DataAction | None, list[Problem]]:
    """A previous round's action (the reference of `limits.max_change`), parsed as strictly as
    a proposal: duplicate keys, NaN/Infinity, unknown fields, wrong types, negative weights or
    a mixture not summing to 1 all make it unusable. A lenient parse would let NaN through, and
    NaN fails every comparison, so the per-round limit would pass silently."""
    data, problems = parse_untrusted(raw, max_bytes)
    if data is None or problems:
        return None, problems
    try:
        action = DataAction.model_validate(data, strict=True)
    except ValidationError as e:
        return None, _schema_problems(e, None)
    notes: list[str] = []
    if _normalise_weights(action.mixture, "$.mixture", "mixture", problems, notes) is None:
        return None, problems
    return action, []


def _without_extras(data: dict[str, Any], err: ValidationError) -> dict[str, Any] | None:
    if any(e["type"] != "extra_forbidden" for e in err.errors()):
        return None
    out = json.loads(json.dumps(data))
    for e in err.errors():
        node = out
        *parents, last = e["loc"]
        for part in parents:
            node = node[part]
        node.pop(last, None)
    return out


def _present_slices(ctx: ActionContext, name: str, method: str) -> list[str]:
    if ctx.pools is None or name not in ctx.pools.tables:
        return []
    return list(ctx.pools.candidates(method)[name].buckets)


def format_problems(verdict: ActionVerdict) -> str:
    """The verdict as plain lines (for a planner's revision prompt or a terminal)."""
    lines = [f"status: {verdict.status}"]
    for p in verdict.problems:
        lines.append(f"- [{p.code}] {p.path}: {p.message}" + (f" (hint: {p.hint})" if p.hint else ""))
    for n in verdict.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)
