"""The check: every rejection carries a JSON path and a hint a planner can act on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic_pools import synthetic_eval, synthetic_pool

from mosaic.config import LimitsConfig, MosaicConfig
from mosaic.schemas import DataAction
from mosaic.tools.dataset.hashing import eval_prompt_hashes
from mosaic.tools.dataset.pools import PreparedPools
from mosaic.tools.validate_action import (ActionContext, format_problems, parse_previous_action,
                                         too_large_problem, validate_action)

TYPES = {"safety": "jailbreak", "boundary": "overrefusal", "instruction": "ifeval"}
BUDGET = 20_000
GOOD = {"mixture": {"safety": 0.5, "boundary": 0.3, "instruction": 0.2},
        "objectives": {"safety": {"bucket_weights": {"complexity_3": 0.5, "complexity_4": 0.5},
                                  "focus": {"include": {"pc_patterns": ["P3_C3", "P4_C3", "P2_C4", "P4_C4"]},
                                            "exclude": {"concealment_range": [1, 1]}},
                                  "focus_ratio": 0.2}},
        "quality_threshold": 3.0, "method": "sft", "rationale": "more multi-turn refusals"}


@pytest.fixture(scope="module")
def world():
    pools, counts, evals = {}, {}, {}
    for i, (name, t) in enumerate(TYPES.items()):
        pools[name], counts[name] = synthetic_pool(t, 900, seed=20 + i, objective=name)
        evals[name] = synthetic_eval(pools[name], t, 8, seed=30 + i)
    hashes = np.concatenate([eval_prompt_hashes(e.column("messages")) for e in evals.values()])
    prepared = PreparedPools(pools, TYPES, counts, hashes, max_length=400)
    ids = frozenset(x for e in evals.values() for x in e.column("id").to_pylist())
    return prepared, ids


@pytest.fixture
def ctx(world):
    prepared, ids = world
    return ActionContext(objectives=TYPES, budget=BUDGET, pools=prepared, eval_ids=ids,
                         eval_sources=("data/sandbox/eval/safety.parquet",))


def with_(base: dict, path: str, value) -> dict:
    """A deep copy of `base` with the dotted `path` set to `value` (None deletes)."""
    out = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return out


def test_a_good_action_passes_unchanged(ctx):
    verdict = validate_action(json.dumps(GOOD), ctx)
    assert verdict.status == "ok", format_problems(verdict)
    assert verdict.action == DataAction.model_validate(GOOD)
    assert verdict.problems == []


def test_rounding_is_normalised_and_logged(ctx):
    raw = with_(GOOD, "mixture", {"safety": 0.5, "boundary": 0.3, "instruction": 0.2000004})
    raw = with_(raw, "objectives.boundary", {"focus_ratio": 1.0000005})
    verdict = validate_action(raw, ctx)
    assert verdict.status == "fixable"
    assert abs(sum(verdict.action.mixture.values()) - 1.0) < 1e-12
    assert verdict.action.objectives["boundary"].focus_ratio == 1.0
    assert any("renormalised" in n for n in verdict.notes)
    assert any("clamped" in n for n in verdict.notes)


def test_a_dict_proposal_is_checked_the_same_way(ctx):
    assert validate_action(GOOD, ctx).status == "ok"
    assert validate_action({**GOOD, "mixture": {"safety": float("nan")}}, ctx).problems[0].code == \
        "non_finite"


# (raw action, problem code, JSON path, a fragment the hint must contain)
CASES = {
    "unknown objective": (with_(GOOD, "mixture", {"safety": 0.5, "bogus": 0.5}),
                          "unknown_objective", "$.mixture.bogus", "boundary, instruction, safety"),
    "unknown objective block": (with_(GOOD, "objectives.safetyy", {"focus_ratio": 0.1}),
                                "unknown_objective", "$.objectives.safetyy", "safety"),
    "unknown slice": (with_(GOOD, "objectives.safety.bucket_weights",
                            {"complexity_3": 0.5, "complexity_9": 0.5}),
                      "unknown_slice", "$.objectives.safety.bucket_weights.complexity_9",
                      "complexity_1, complexity_2"),
    "unknown focus key": (with_(GOOD, "objectives.safety.focus.include", {"toxicity": ["high"]}),
                          "unknown_focus_key", "$.objectives.safety.focus.include.toxicity",
                          "pc_patterns"),
    "unknown focus value": (with_(GOOD, "objectives.safety.focus.include", {"safety": ["leaky"]}),
                            "unknown_focus_value",
                            "$.objectives.safety.focus.include.safety[0]", '"partial_leak"'),
    "constraint id absent from the pool": (
        with_(GOOD, "objectives.instruction", {"focus": {"include": {"failed_constraint": [
            "language:response_language"]}}, "focus_ratio": 0.2}),
        "unknown_focus_value", "$.objectives.instruction.focus.include.failed_constraint[0]",
        "punctuation:no_comma"),
    "bad range": (with_(GOOD, "objectives.safety.focus.exclude", {"pressure_range": [4, 2]}),
                  "bad_range", "$.objectives.safety.focus.exclude.pressure_range", "lo <= hi"),
    "range not a pair": (with_(GOOD, "objectives.safety.focus.exclude", {"pressure_range": 3}),
                         "bad_range", "$.objectives.safety.focus.exclude.pressure_range", "[1, 5]"),
    "negative weight": (with_(GOOD, "mixture", {"safety": 1.2, "boundary": -0.2}),
                        "negative_weight", "$.mixture.boundary", ">= 0"),
    "negative bucket weight": (with_(GOOD, "objectives.safety.bucket_weights",
                                     {"complexity_3": 1.5, "complexity_4": -0.5}),
                               "negative_weight", "$.objectives.safety.bucket_weights.complexity_4",
                               ">= 0"),
    "weights not summing": (with_(GOOD, "mixture", {"safety": 0.5, "boundary": 0.3}),
                            "weights_not_summing", "$.mixture", "divide each by 0.8"),
    "bucket weights not summing": (with_(GOOD, "objectives.safety.bucket_weights",
                                         {"complexity_3": 0.5, "complexity_4": 0.6}),
                                   "weights_not_summing", "$.objectives.safety.bucket_weights",
                                   "divide each by 1.1"),
    "all-zero weights": (with_(GOOD, "mixture", {"safety": 0.0}), "weights_not_summing",
                         "$.mixture", "positive weight"),
    "focus_ratio above 1": (with_(GOOD, "objectives.safety.focus_ratio", 1.5),
                            "focus_ratio_out_of_range", "$.objectives.safety.focus_ratio", "[0, 1]"),
    "focus_ratio below 0": (with_(GOOD, "objectives.safety.focus_ratio", -0.25),
                            "focus_ratio_out_of_range", "$.objectives.safety.focus_ratio", "[0, 1]"),
    "threshold above range": (with_(GOOD, "quality_threshold", 6), "threshold_out_of_range",
                              "$.quality_threshold", "[1, 5]"),
    "threshold below range": (with_(GOOD, "quality_threshold", 0.5), "threshold_out_of_range",
                              "$.quality_threshold", "[1, 5]"),
    "objective threshold above range": (with_(GOOD, "objectives.safety.quality_threshold", 7),
                                        "threshold_out_of_range",
                                        "$.objectives.safety.quality_threshold", "[1, 5]"),
    "objective threshold the pool cannot meet": (
        with_(with_(GOOD, "mixture", {"safety": 1.0}), "objectives.safety",
              {"quality_threshold": 5.0}),
        "unfillable", "$.mixture.safety", "lower quality_threshold"),
    "objective the pool cannot fill": (
        with_(with_(GOOD, "mixture", {"safety": 1.0}), "objectives", None) | {"quality_threshold": 5.0},
        "unfillable", "$.mixture.safety", "lower mixture.safety to <="),
    "bucket the pool cannot fill": (
        with_(with_(GOOD, "mixture", {"safety": 0.9, "boundary": 0.1}), "objectives.safety",
              {"bucket_weights": {"complexity_1": 0.9, "complexity_3": 0.1}}),
        "unfillable", "$.objectives.safety.bucket_weights.complexity_1",
        "lower bucket_weights.complexity_1 to <="),
    "eval ids in focus": (with_(GOOD, "objectives.safety.focus.include", {"ids": ["eval-1"]}),
                          "eval_reference", "$.objectives.safety.focus.include.ids",
                          "eval and held-out items never enter training"),
    "eval set as an objective": (with_(GOOD, "mixture", {"safety": 0.5, "safety_eval": 0.5}),
                                 "eval_reference", "$.mixture.safety_eval", "training pools"),
    "eval set as a field": (with_(GOOD, "include_eval", True), "eval_reference",
                            "$.include_eval", "never enter training"),
    "eval file named": (with_(GOOD, "rationale_source", "data/sandbox/eval/safety.parquet"),
                        "eval_reference", "$.rationale_source", "training pools"),
    "budget in the action": (with_(GOOD, "budget", 10**9), "budget_not_settable", "$.budget",
                             "20,000 tokens"),
    "unknown field": (with_(GOOD, "objectives.safety.weight", 2), "unknown_field",
                      "$.objectives.safety.weight", "bucket_weights, focus, focus_ratio"),
    "weight as a string": (with_(GOOD, "mixture", {"safety": "1.0"}), "wrong_type",
                           "$.mixture.safety", "JSON number"),
    "weight as a boolean": (with_(GOOD, "mixture", {"safety": True}), "wrong_type",
                            "$.mixture.safety", "JSON number"),
    "unknown method": (with_(GOOD, "method", "ppo"), "invalid_value", "$.method", "'dpo' or 'sft+dpo'"),
    "missing mixture": (with_(GOOD, "mixture", None), "missing_field", "$.mixture", "mixture"),
    "schema version": (with_(GOOD, "schema_version", 99), "schema_version", "$.schema_version",
                       "schema_version 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_invalid_case_is_rejected_with_a_path_and_a_hint(case, ctx):
    raw, code, path, hint = CASES[case]
    verdict = validate_action(json.dumps(raw), ctx)
    assert verdict.status == "invalid"
    assert verdict.action is None
    hits = [p for p in verdict.problems if p.code == code and p.path == path]
    assert hits, format_problems(verdict)
    assert hint in hits[0].hint, hits[0]


def test_focus_short_of_its_share_is_a_note_not_a_rejection(ctx):
    # focus_ratio is a first claim "up to" a share: with no code leaks among rows that pass
    # the threshold, the buckets fill from their other rows, and the planner is told.
    raw = with_(GOOD, "objectives.safety.focus", {"include": {"leak_types": ["code_leak"]}})
    verdict = validate_action(raw, ctx)
    assert verdict.status == "ok", format_problems(verdict)
    assert any("focus rows of bucket 'complexity_3' supply 0 of the" in n for n in verdict.notes)


def test_eval_item_ids_anywhere_are_rejected(ctx, world):
    _, ids = world
    some_id = sorted(ids)[0]
    raw = with_(GOOD, "objectives.instruction", {"focus": {"include": {
        "failed_constraint": [some_id]}}})
    verdict = validate_action(raw, ctx)
    hits = [p for p in verdict.problems if p.code == "eval_reference"]
    assert hits and hits[0].path == "$.objectives.instruction.focus.include.failed_constraint[0]"


def test_unfillable_says_by_how_much(ctx, world):
    prepared, _ = world
    raw = with_(with_(GOOD, "mixture", {"safety": 1.0}), "objectives", None) | {"quality_threshold": 5.0}
    verdict = validate_action(raw, ctx)
    p = next(p for p in verdict.problems if p.code == "unfillable")
    from mosaic.tools.dataset.allocation import objective_units, supply

    cands = prepared.candidates("sft")["safety"]
    have = sum(supply(cands, objective_units(cands, None, 5.0, "sft"))[0].values())
    assert f"supplies {have:,}" in p.message and f"short by {BUDGET - have:,}" in p.message


@pytest.mark.parametrize("text, code", [
    ('{"mixture": {"safety": 0.5, "safety": 0.5}}', "duplicate_key"),
    ('{"mixture": {"safety": NaN}}', "non_finite"),
    ('{"mixture": {"safety": Infinity}}', "non_finite"),
    ('{"mixture": {"safety": -Infinity}}', "non_finite"),
    ('{"mixture": {"safety": 1e400}}', "non_finite"),
    ('{"mixture": {"safety": 1.0}', "json_syntax"),
    ('```json\n{"mixture": {"safety": 1.0}}\n```', "json_syntax"),
    ('{"mixture": {"safety": 1.0}} trailing', "json_syntax"),
    ('[{"mixture": {"safety": 1.0}}]', "wrong_type"),
    ('"just a string"', "wrong_type"),
    (b'{"mixture": {"safety": 1.0}, "rationale": "\xff"}', "not_utf8"),
    ('{"a":' * 40 + "1" + "}" * 40, "too_deep"),
])
def test_untrusted_json_is_parsed_strictly(text, code, ctx):
    verdict = validate_action(text, ctx)
    assert verdict.status == "invalid"
    assert verdict.problems[0].code == code, format_problems(verdict)
    assert verdict.problems[0].path.startswith("$") and verdict.problems[0].hint


def test_duplicate_key_path_points_at_the_key(ctx):
    v = validate_action('{"mixture": {"safety": 1.0}, "objectives": {"safety": '
                        '{"focus_ratio": 0.1, "focus_ratio": 0.9}}}', ctx)
    assert [(p.code, p.path) for p in v.problems] == [("duplicate_key",
                                                       "$.objectives.safety.focus_ratio")]


def test_oversized_input_is_refused_before_parsing(ctx):
    raw = json.dumps({**GOOD, "rationale": "x" * 70_000})
    verdict = validate_action(raw, ctx)
    assert [p.code for p in verdict.problems] == ["too_large"]
    assert "65,536" in verdict.problems[0].message
    assert [p.code for p in validate_action(json.loads(raw), ctx).problems] == ["too_large"]


def test_every_problem_is_reported_in_one_verdict(ctx):
    raw = {"mixture": {"safety": 0.9, "bogus": 0.3}, "budget": 5,
           "objectives": {"safety": {"focus_ratio": 2, "focus": {"include": {"toxicity": [1]}}}},
           "quality_threshold": 9}
    codes = {p.code for p in validate_action(raw, ctx).problems}
    assert codes >= {"budget_not_settable", "unknown_objective", "weights_not_summing",
                     "focus_ratio_out_of_range", "unknown_focus_key", "threshold_out_of_range"}


def test_human_limits_floors_ceilings_and_per_round_change(world):
    prepared, _ = world
    limits = LimitsConfig(floors={"boundary": 0.35}, ceilings={"safety": 0.45}, max_change=0.1)
    prev = DataAction.model_validate({"mixture": {"safety": 0.3, "boundary": 0.4,
                                                  "instruction": 0.3}})
    ctx = ActionContext(objectives=TYPES, budget=BUDGET, pools=prepared, limits=limits,
                        previous_action=prev)
    verdict = validate_action(GOOD, ctx)  # safety 0.5, boundary 0.3, instruction 0.2
    by_code = {p.code: p for p in verdict.problems}
    assert by_code["below_floor"].path == "$.mixture.boundary"
    assert "mixture.boundary >= 0.35" in by_code["below_floor"].hint
    assert by_code["above_ceiling"].path == "$.mixture.safety"
    assert "mixture.safety <= 0.45" in by_code["above_ceiling"].hint
    change = [p for p in verdict.problems if p.code == "change_too_large"]
    assert [p.path for p in change] == ["$.mixture.safety"]
    assert "within [0.2, 0.4]" in change[0].hint
    ok = {"mixture": {"safety": 0.4, "boundary": 0.4, "instruction": 0.2}}
    assert validate_action(ok, ctx).status == "ok"


@pytest.mark.parametrize("text, code", [
    ('{"mixture": {"safety": NaN, "boundary": 0.5, "instruction": 0.5}}', "non_finite"),
    ('{"mixture": {"safety": Infinity, "boundary": 0.5}}', "non_finite"),
    ('{"mixture": {"safety": 0.3, "boundary": 0.4, "instruction": 0.3, "safety": 0.9}}',
     "duplicate_key"),
    ('{"mixture": {"safety": "0.3", "boundary": 0.7}}', "wrong_type"),
    ('{"mixture": {"safety": 1.0}, "budget": 5}', "budget_not_settable"),
    ('{"mixture": {"safety": 1.5, "boundary": -0.5}}', "negative_weight"),
    ('{"mixture": {"safety": 0.9, "boundary": 0.9}}', "weights_not_summing"),
    ('[1, 2]', "wrong_type"),
    (b'{"mixture": {"safety": 1.0, "note": "caf\xe9"}}', "not_utf8"),
])
def test_a_previous_action_is_parsed_as_strictly_as_a_proposal(text, code):
    action, problems = parse_previous_action(text)
    assert action is None and code in [p.code for p in problems], problems


def test_a_nan_previous_action_cannot_switch_off_the_change_limit(world):
    """A lenient parse reads NaN, every |w - NaN| > limit is False, and the limit passes."""
    prepared, _ = world
    lenient = DataAction.model_validate_json('{"mixture": {"safety": NaN, "boundary": NaN, '
                                             '"instruction": NaN}}')
    ctx = ActionContext(objectives=TYPES, budget=BUDGET, pools=prepared,
                        limits=LimitsConfig(max_change=0.05), previous_action=lenient)
    assert validate_action(GOOD, ctx).ok  # the hole the strict parser closes
    strict, problems = parse_previous_action('{"mixture": {"safety": NaN, "boundary": NaN, '
                                             '"instruction": NaN}}')
    assert strict is None and {p.code for p in problems} == {"non_finite"}
    good, problems = parse_previous_action('{"mixture": {"safety": 0.3, "boundary": 0.4, '
                                           '"instruction": 0.3}}')
    assert problems == [] and good is not None
    ctx = ActionContext(objectives=TYPES, budget=BUDGET, pools=prepared,
                        limits=LimitsConfig(max_change=0.05), previous_action=good)
    assert "change_too_large" in {p.code for p in validate_action(GOOD, ctx).problems}


def test_too_large_reports_the_size_it_is_given():
    problem = too_large_problem(1_000_000)
    assert problem.code == "too_large" and "1,000,000 bytes" in problem.message
    assert "65,536" in problem.message


def test_a_mixed_objective_without_a_pool_is_rejected(world):
    prepared, _ = world
    ctx = ActionContext(objectives={**TYPES, "extra": "ifeval"}, budget=BUDGET, pools=prepared)
    verdict = validate_action({"mixture": {"safety": 0.5, "extra": 0.5}}, ctx)
    p = next(p for p in verdict.problems if p.code == "no_pool")
    assert p.path == "$.mixture.extra" and "set mixture.extra to 0" in p.hint


def test_dpo_capacity_counts_pairs(ctx):
    raw = {"mixture": {"safety": 0.4, "boundary": 0.3, "instruction": 0.3}, "method": "dpo",
           "quality_threshold": 3.0}
    verdict = validate_action(raw, ctx)
    assert verdict.status == "ok", format_problems(verdict)
    greedy = with_(raw, "mixture", {"safety": 1.0})
    greedy_ctx = ActionContext(objectives=TYPES, budget=10**7, pools=ctx.pools)
    p = validate_action(greedy, greedy_ctx).problems[0]
    assert p.code == "unfillable" and "DPO pairing" in p.message


def test_context_from_config(world):
    prepared, _ = world
    config = MosaicConfig.model_validate({
        "objectives": {n: {"type": t, "pool": f"p/{n}.parquet", "eval": f"e/{n}.parquet"}
                       for n, t in TYPES.items()},
        "budget": {"max_tokens": 12_345}, "limits": {"floors": {"safety": 0.2}}})
    ctx = ActionContext.from_config(config, prepared)
    assert ctx.budget == 12_345 and ctx.limits.floors == {"safety": 0.2}
    v = validate_action(with_(GOOD, "objectives.safety.source", "e/safety.parquet"), ctx)
    assert "eval_reference" in {p.code for p in v.problems}


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["mixture", "objectives", "safety", "boundary", "focus", "include",
                         "exclude", "bucket_weights", "focus_ratio", "quality_threshold",
                         "method", "complexity_3", "pc_patterns", "x"]), kids, max_size=4),
    max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(_json)
def test_the_check_never_raises_on_arbitrary_proposals(ctx_value):
    # Built once here rather than from the fixture: hypothesis forbids function-scoped fixtures.
    ctx = _shared_ctx()
    for raw in (ctx_value if isinstance(ctx_value, dict) else {"mixture": ctx_value},
                json.dumps(ctx_value, allow_nan=True)):
        verdict = validate_action(raw, ctx)
        assert verdict.status in ("ok", "fixable", "invalid")
        assert all(p.code != "check_failed" for p in verdict.problems), format_problems(verdict)
        assert all(p.path.startswith("$") for p in verdict.problems)
        assert (verdict.status == "invalid") == bool(verdict.problems)


_CTX: list[ActionContext] = []


def _shared_ctx() -> ActionContext:
    if not _CTX:
        pools, counts = {}, {}
        for i, (name, t) in enumerate(TYPES.items()):
            pools[name], counts[name] = synthetic_pool(t, 120, seed=40 + i, objective=name)
        _CTX.append(ActionContext(objectives=TYPES, budget=BUDGET,
                                  pools=PreparedPools(pools, TYPES, counts, max_length=400)))
    return _CTX[0]
