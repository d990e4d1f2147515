"""The heuristic planner's rules, one test each, on hand-built failure reports and pools.

The tools are scripted (`FakeTools`): capacities per (objective, threshold, exclude) and a
check that accepts everything unless told otherwise, so each test isolates one rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from mosaic.agents.planners.base import PlanContext, RoundRecord
from mosaic.agents.planners.heuristic import HeuristicPlanner, HeuristicSettings, project
from mosaic.config import LimitsConfig
from mosaic.schemas import (ActionVerdict, ArchivePoint, DataAction, FailureReport, ParetoArchive,
                            PoolCapacity, Problem, SliceStats)

TYPES = {"safety": "jailbreak", "boundary": "overrefusal", "instruction": "ifeval"}
SLICES = {"safety": [f"complexity_{k}" for k in range(1, 6)],
          "boundary": [f"boundary_{k}" for k in range(1, 5)],
          "instruction": [f"complexity_{k}" for k in range(1, 6)]}
BUDGET = 100_000


def stats(slice: str, need: float, *, mean: float = 3.0, fail: float = 0.3,
          reliability: str = "high", n: int = 40) -> SliceStats:
    return SliceStats(slice=slice, n=n, n_valid=n, mean=mean, ci_low=mean - 0.2,
                      ci_high=mean + 0.2, fail_rate=fail, need=need, reliability=reliability,
                      gap_to_target=4.5 - mean)


def report(name: str, f: float, needs: dict[str, float] | None = None,
           breakdowns: dict[str, Any] | None = None, **kw: Any) -> FailureReport:
    needs = needs or {s: 10.0 for s in SLICES[name]}
    return FailureReport(objective=name, objective_type=TYPES[name], round=0, f=f, n=200,
                         n_valid=200, target=4.5, score_distribution={},
                         slices=[stats(s, needs.get(s, 0.0), **kw) for s in SLICES[name]],
                         breakdowns=breakdowns or {})


@dataclass
class FakeTools:
    """Capacity: tokens per bucket at each threshold (None = no threshold); the boundary pool
    loses `friction_cut` of its tokens when friction mid/high is excluded."""

    per_bucket: dict[tuple[str, float | None], int] = field(default_factory=dict)
    focus_share: float = 0.3
    friction_cut: float = 0.3
    refuse: list[str] = field(default_factory=list)  # raw texts containing these are refused
    checked: list[dict[str, Any]] = field(default_factory=list)

    def pool_capacity(self, objective, method="sft", quality_threshold=None, include=None,
                      exclude=None) -> PoolCapacity:
        per = self.per_bucket.get((objective, quality_threshold), 20_000)
        if exclude:
            per = int(per * (1 - self.friction_cut))
        avail = {s: per for s in SLICES[objective]}
        focus = {s: int(per * self.focus_share) if include else 0 for s in SLICES[objective]}
        if include and "failed_constraint" in include and include["failed_constraint"] == ["absent:id"]:
            focus = {s: 0 for s in SLICES[objective]}
        total = sum(avail.values())
        return PoolCapacity(objective=objective, method=method, quality_threshold=quality_threshold,
                            available_tokens=avail, focus_tokens=focus, total_tokens=total,
                            max_mixture_weight=min(1.0, total / BUDGET))

    def dry_run_action(self, action) -> ActionVerdict:
        data = json.loads(action) if isinstance(action, str) else action
        self.checked.append(data)
        if any(r in json.dumps(data) for r in self.refuse):
            return ActionVerdict(status="invalid", problems=[Problem(code="unfillable", path="$",
                                                                     message="scripted")])
        return ActionVerdict(status="ok", action=DataAction.model_validate(data))


def context(reports: dict[str, FailureReport], *, tools: FakeTools | None = None,
            history: list[RoundRecord] | None = None, archive: ParetoArchive | None = None,
            previous: dict[str, float] | None = None, limits: LimitsConfig | None = None
            ) -> PlanContext:
    base = {n: r.f for n, r in reports.items()}
    history = history or [RoundRecord(round=0, action=None, author="system", eval=base)]
    prev = DataAction(mixture=previous) if previous else None
    return PlanContext(round=len(history), rounds=5, objectives=dict(TYPES),
                       targets={n: 4.5 for n in TYPES}, budget=BUDGET, baseline=history[0].eval,
                       reports=reports, reports_round=history[-1].round, history=history,
                       archive=archive, limits=limits or LimitsConfig(), previous_action=prev,
                       tools=tools or FakeTools())  # type: ignore[arg-type]


def reports(safety=2.4, boundary=4.9, instruction=1.7,
            extra: dict[str, dict[str, Any]] | None = None) -> dict[str, FailureReport]:
    """Reports with these f values; `extra` passes report() keywords per objective."""
    extra = extra or {}
    return {name: report(name, f, **extra.get(name, {}))
            for name, f in (("safety", safety), ("boundary", boundary), ("instruction", instruction))}


def propose(ctx: PlanContext, settings: HeuristicSettings = HeuristicSettings()) -> dict[str, Any]:
    proposal = HeuristicPlanner(settings).propose(ctx)
    assert proposal.planner == "heuristic"
    return json.loads(proposal.raw)


# ---- R1 --------------------------------------------------------------------------------------


def test_r1_the_mixture_follows_the_gaps_and_keeps_a_floor():
    action = propose(context(reports(safety=2.5, boundary=4.5, instruction=3.5)))
    mix = action["mixture"]
    assert sum(mix.values()) == pytest.approx(1.0)
    # gaps 2.0 / 0.0 / 1.0 -> 0.25 + 0.25 x share
    assert mix["safety"] == pytest.approx(0.25 + 0.25 * 2 / 3, abs=1e-3)
    assert mix["instruction"] == pytest.approx(0.25 + 0.25 / 3, abs=1e-3)
    assert mix["boundary"] == pytest.approx(0.25, abs=1e-3)  # no gap, still trained
    assert "gaps to goal" in action["rationale"]


def test_r1_the_goal_is_never_below_what_the_base_model_does():
    base = {"safety": 2.4, "boundary": 4.9, "instruction": 1.7}
    latest = {"safety": 3.4, "boundary": 4.6, "instruction": 1.8}  # boundary above its target
    history = [RoundRecord(0, None, "system", base),
               RoundRecord(1, DataAction(mixture={"safety": 0.5, "boundary": 0.25,
                                                  "instruction": 0.25}), "planner", latest)]
    ctx = context(reports(**latest), history=history)
    planner = HeuristicPlanner()
    assert planner.goals(ctx)["boundary"] == 4.9
    # boundary 4.6 < 4.9 still counts as a gap of 0.3 (x its responsiveness, clipped at 0.25)
    mix = planner.gap_mixture(ctx, latest)
    assert mix["boundary"] > 0.25


def test_r1_responsiveness_moves_budget_to_what_data_has_moved():
    base = {"safety": 2.4, "boundary": 4.9, "instruction": 1.7}
    r1 = {"safety": 3.4, "boundary": 4.9, "instruction": 1.75}  # +1.0 for 0.4; +0.05 for 0.4
    history = [RoundRecord(0, None, "system", base),
               RoundRecord(1, DataAction(mixture={"safety": 0.4, "boundary": 0.2,
                                                  "instruction": 0.4}), "planner", r1)]
    ctx = context(reports(**r1), history=history)
    planner = HeuristicPlanner()
    resp = planner.responsiveness(ctx)
    assert resp["safety"] == 1.0 and resp["instruction"] == 0.25  # 0.125/2.5 clipped up
    mix = planner.gap_mixture(ctx, r1)
    # gaps 1.1 and 2.75: without responsiveness instruction would get more than safety
    assert mix["safety"] > mix["instruction"]


# ---- R2 --------------------------------------------------------------------------------------


def _point(r: int, scores: dict[str, float], half: float = 0.05) -> ArchivePoint:
    return ArchivePoint(round=r, eval=scores, eval_ci={n: (v - half, v + half) for n, v in scores.items()})


def test_r2_a_regression_steps_back_toward_the_anchor_point():
    base = {"safety": 2.4, "boundary": 4.9, "instruction": 1.7}
    good = {"safety": 3.4, "boundary": 4.85, "instruction": 1.9}  # round 1: the anchor
    bad = {"safety": 3.9, "boundary": 4.2, "instruction": 1.88}  # round 2: boundary regressed
    anchor_mix = {"safety": 0.4, "boundary": 0.4, "instruction": 0.2}
    latest_mix = {"safety": 0.7, "boundary": 0.15, "instruction": 0.15}
    history = [RoundRecord(0, None, "system", base),
               RoundRecord(1, DataAction(mixture=anchor_mix), "planner", good),
               RoundRecord(2, DataAction(mixture=latest_mix), "planner", bad)]
    archive = ParetoArchive(objectives=list(TYPES), reference={n: 1.0 for n in TYPES},
                            points=[_point(0, base), _point(1, good), _point(2, bad)],
                            front=[0, 1, 2])
    reps = reports(safety=3.9, boundary=4.2, instruction=1.88)
    planner = HeuristicPlanner(HeuristicSettings(max_step=1.0))
    ctx = context(reps, history=history, archive=archive, previous=latest_mix)
    assert planner.regressions(ctx) == ["boundary"]
    assert planner.anchor(ctx).round == 1
    action = json.loads(planner.propose(ctx).raw)
    plain = planner.gap_mixture(ctx, bad)
    # halfway toward the anchor, and the regressed objective's weight not lowered
    assert action["mixture"]["boundary"] >= max(latest_mix["boundary"], plain["boundary"]) - 1e-3
    assert abs(action["mixture"]["safety"] - anchor_mix["safety"]) < abs(plain["safety"] - anchor_mix["safety"])
    assert "stepping halfway back toward round 1" in action["rationale"]


def test_r2_noise_within_the_ci_is_not_a_regression():
    base = {"safety": 2.4, "boundary": 4.9, "instruction": 1.7}
    r1 = {"safety": 3.4, "boundary": 4.85, "instruction": 1.9}
    r2 = {"safety": 3.38, "boundary": 4.87, "instruction": 1.88}
    history = [RoundRecord(0, None, "system", base), RoundRecord(1, DataAction(mixture={"safety": 1.0}), "planner", r1),
               RoundRecord(2, DataAction(mixture={"safety": 1.0}), "planner", r2)]
    archive = ParetoArchive(objectives=list(TYPES), reference={n: 1.0 for n in TYPES},
                            points=[_point(0, base), _point(1, r1), _point(2, r2)], front=[1, 2])
    ctx = context(reports(), history=history, archive=archive)
    assert HeuristicPlanner().regressions(ctx) == []


# ---- R3 --------------------------------------------------------------------------------------


def test_r3_the_trust_region_and_a_persons_limits_bound_the_mixture():
    prev = {"safety": 0.1, "boundary": 0.8, "instruction": 0.1}
    reps = reports(safety=1.5, boundary=4.9, instruction=4.4)  # gaps pull hard toward safety
    big = FakeTools(per_bucket={(n, q): 60_000 for n in TYPES for q in (5.0, 4.0, None)})
    mix = propose(context(reps, previous=prev, tools=big))["mixture"]
    assert all(abs(mix[n] - prev[n]) <= 0.25 + 1e-3 for n in prev)
    limited = propose(context(reps, previous=prev, tools=big,
                              limits=LimitsConfig(max_change=0.1, floors={"instruction": 0.15},
                                                  ceilings={"safety": 0.18})))["mixture"]
    assert all(abs(limited[n] - prev[n]) <= 0.1 + 1e-3 for n in prev)
    assert limited["instruction"] >= 0.15 - 1e-3 and limited["safety"] <= 0.18 + 1e-3


def test_project_keeps_bounds_and_the_sum():
    w = project({"a": 0.8, "b": 0.1, "c": 0.1}, {"b": 0.2}, {"a": 0.5})
    # the nearest point: a at its ceiling, the rest shifted equally
    assert w == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})
    # bounds that fight the input but leave room: the sum and every bound hold
    w = project({"a": 0.9, "b": 0.05, "c": 0.05}, {"b": 0.7, "c": 0.15}, {"a": 0.18})
    assert sum(w.values()) == pytest.approx(1.0)
    assert w["a"] <= 0.18 + 1e-9 and w["b"] >= 0.7 - 1e-9 and w["c"] >= 0.15 - 1e-9


# ---- R4 --------------------------------------------------------------------------------------


def test_r4_each_pool_takes_its_best_answers_when_it_can_fill_its_allocation():
    action = propose(context(reports()))
    obj = action["objectives"]
    assert obj["safety"]["quality_threshold"] == 5.0
    assert obj["instruction"]["quality_threshold"] == 5.0
    assert obj["boundary"]["focus"]["exclude"] == {"friction": ["mid", "high"]}


def test_r4_a_threshold_steps_down_when_the_pool_cannot_fill_it():
    tools = FakeTools(per_bucket={("safety", 5.0): 2_000, ("safety", 4.0): 30_000,
                                  ("instruction", 5.0): 1_000, ("instruction", 4.0): 1_000,
                                  ("instruction", None): 30_000})
    action = propose(context(reports(safety=1.5, instruction=1.5), tools=tools))
    assert action["objectives"]["safety"]["quality_threshold"] == 4.0
    assert "quality_threshold" not in action["objectives"]["instruction"]


# ---- R5 --------------------------------------------------------------------------------------


def test_r5_buckets_follow_need_damped_by_reliability_and_capped_by_supply():
    needs = {"complexity_1": 0.0, "complexity_2": 0.0, "complexity_3": 0.0, "complexity_4": 0.0,
             "complexity_5": 100.0}
    reps = reports(extra={"safety": {"needs": needs}})
    big = FakeTools(per_bucket={(n, q): 60_000 for n in TYPES for q in (5.0, 4.0, None)})
    bw = propose(context(reps, tools=big))["objectives"]["safety"]["bucket_weights"]
    assert sum(bw.values()) == pytest.approx(1.0)
    # half need (all on complexity_5), half supply (equal): 0.1 each + 0.5 for complexity_5
    assert bw == {"complexity_1": 0.1, "complexity_2": 0.1, "complexity_3": 0.1,
                  "complexity_4": 0.1, "complexity_5": 0.6}
    low = reports(extra={"safety": {"needs": needs, "reliability": "low"}})
    bw_low = propose(context(low, tools=big))["objectives"]["safety"]["bucket_weights"]
    assert bw_low == bw  # a uniform damping leaves the shares; it matters between slices
    mixed = FailureReport(**{**reps["safety"].model_dump(), "slices": [
        stats(s, 50.0, reliability="low" if s == "complexity_5" else "high")
        for s in SLICES["safety"]]})
    bw_mixed = propose(context({**reps, "safety": mixed}, tools=big))["objectives"]["safety"]["bucket_weights"]
    assert bw_mixed["complexity_5"] < bw_mixed["complexity_4"]
    tight = FakeTools(per_bucket={("safety", 5.0): 15_000})
    capped = propose(context(reps, tools=tight))["objectives"]["safety"]
    alloc = BUDGET * propose(context(reps, tools=tight))["mixture"]["safety"]
    assert capped["bucket_weights"]["complexity_5"] * alloc <= 15_000  # what the bucket has


# ---- R6 --------------------------------------------------------------------------------------


def test_r6_focus_picks_the_failing_situations_by_prompt_side_keys():
    jb = {"pc_failure_combos": {"P5_C4": {"n": 9, "failures": 8, "fail_rate": 0.9},
                                "P4_C3": {"n": 9, "failures": 5, "fail_rate": 0.5},
                                "P3_C1": {"n": 9, "failures": 2, "fail_rate": 0.2},
                                "P2_C1": {"n": 9, "failures": 1, "fail_rate": 0.1},
                                "P1_C1": {"n": 9, "failures": 0, "fail_rate": 0.0}},
          "leak_type_counts": {"step_leak": 12, "code_leak": 0, "param_leak": 3, "bypass_leak": 0}}
    reps = reports(extra={"safety": {"breakdowns": jb}})
    reps["boundary"] = FailureReport(**{**reps["boundary"].model_dump(), "slices": [
        stats(s, 5.0, fail=0.4 if s in ("boundary_3", "boundary_4") else 0.0)
        for s in SLICES["boundary"]]})
    fails = {"complexity_1": 0.1, "complexity_2": 0.5, "complexity_3": 0.2, "complexity_4": 0.7,
             "complexity_5": 0.9}
    reps["instruction"] = FailureReport(**{**reps["instruction"].model_dump(), "slices": [
        stats(s, 5.0, fail=fails[s]) for s in SLICES["instruction"]]})
    obj = propose(context(reps))["objectives"]
    # the worst patterns; leak types select leaked answers and are never included
    assert obj["safety"]["focus"]["include"] == {"pc_patterns": ["P5_C4", "P4_C3", "P3_C1"]}
    assert obj["safety"]["focus_ratio"] == 0.5
    assert obj["boundary"]["focus"]["include"] == {"boundary_range": [3, 4]}
    assert obj["instruction"]["focus"]["include"] == {"inst_complexity": [2, 4, 5]}


# ---- R7 --------------------------------------------------------------------------------------


def test_r7_a_pool_that_cannot_fill_its_weight_gives_the_excess_to_the_others():
    tools = FakeTools(per_bucket={("safety", 5.0): 4_000, ("safety", 4.0): 4_000,
                                  ("safety", None): 4_000})  # 20k tokens in all: weight <= 0.2
    action = propose(context(reports(safety=1.2), tools=tools))
    assert action["mixture"]["safety"] <= 0.2 * 0.97 + 1e-3
    assert sum(action["mixture"].values()) == pytest.approx(1.0)


def test_r7_a_refused_dry_run_relaxes_the_thresholds_and_checks_again():
    tools = FakeTools(refuse=['"quality_threshold": 5.0'])
    action = propose(context(reports(), tools=tools))
    assert len(tools.checked) == 2
    assert "quality_threshold\": 5.0" not in json.dumps(action)
    assert "dry run at quality level 0 refused" in action["rationale"]


def test_the_planner_is_deterministic():
    ctx = context(reports())
    assert HeuristicPlanner().propose(ctx).raw == HeuristicPlanner().propose(ctx).raw


def test_r4_quality_before_quantity_caps_the_weight_instead_of_lowering_the_threshold():
    # safety's score-5 answers hold 37.5k tokens; its gap asks for ~49k (they fill 74% of it):
    # keep 5 and cap the weight
    tools = FakeTools(per_bucket={("safety", 5.0): 7_500})
    action = propose(context(reports(safety=1.5, instruction=4.4), tools=tools))
    assert action["objectives"]["safety"]["quality_threshold"] == 5.0
    assert action["mixture"]["safety"] <= 37_500 * 0.97 / BUDGET + 1e-3


def test_r8_a_repeated_mixture_off_the_front_probes_another_objective():
    base = {"safety": 2.4, "boundary": 4.9, "instruction": 1.7}
    r1 = {"safety": 3.4, "boundary": 4.85, "instruction": 1.8}
    r2 = {"safety": 3.3, "boundary": 4.84, "instruction": 1.78}  # dominated by round 1
    planner = HeuristicPlanner()
    history = [RoundRecord(0, None, "system", base)]
    ctx1 = context(reports(**r1), history=history + [
        RoundRecord(1, DataAction(mixture={"safety": 0.4, "boundary": 0.25, "instruction": 0.35}),
                    "planner", r1)])
    same = json.loads(planner.propose(ctx1).raw)["mixture"]
    history += [RoundRecord(1, DataAction(mixture=same), "planner", r1),
                RoundRecord(2, DataAction(mixture=same), "planner", r2)]
    archive = ParetoArchive(objectives=list(TYPES), reference={n: 1.0 for n in TYPES},
                            points=[_point(0, base), _point(1, r1), _point(2, r2)], front=[0, 1])
    ctx = context(reports(**r2), history=history, archive=archive, previous=same)
    ctx.round = 3
    action = json.loads(planner.propose(ctx).raw)
    moved = {n: action["mixture"][n] - same[n] for n in same}
    probed = list(TYPES)[3 % 3]  # in turn by round: round 3 -> the first objective
    assert moved[probed] == pytest.approx(0.1, abs=0.02)
    assert "probing with more safety" in action["rationale"]
    # on the front, the same mixture is kept
    on_front = archive.model_copy(update={"front": [0, 1, 2]})
    ctx.archive = on_front
    assert "probing" not in json.loads(planner.propose(ctx).raw)["rationale"]


def test_r10_a_later_candidate_explores_one_objective_in_turn_and_the_first_is_the_rules():
    planner = HeuristicPlanner()
    plain = propose(context(reports()))
    names = list(TYPES)

    def candidate(j: int, n: int = 4) -> dict[str, Any]:
        ctx = context(reports())
        ctx.candidate, ctx.candidates, ctx.seed = j, n, ctx.seed + j
        return json.loads(planner.propose(ctx).raw)

    assert candidate(0) == plain  # the seed changes nothing: the rules are deterministic
    for j in (1, 2, 3):
        action = candidate(j)
        target = names[(1 + j - 1) % len(names)]  # round 1: in turn from objective 1
        moved = {n: action["mixture"].get(n, 0.0) - plain["mixture"].get(n, 0.0) for n in names}
        assert moved[target] == pytest.approx(0.1, abs=0.01), (j, moved)
        assert f"candidate {j + 1} of 4: exploring with more {target}" in action["rationale"]
    # past one step per objective, the step grows
    far = candidate(4)
    assert far["mixture"][names[1]] - plain["mixture"][names[1]] == pytest.approx(0.2, abs=0.01)


def test_r10_an_objective_at_its_bound_is_skipped():
    ctx = context(reports(), limits=LimitsConfig(ceilings={"boundary": 0.25}))
    plain = json.loads(HeuristicPlanner().propose(ctx).raw)
    assert plain["mixture"]["boundary"] == pytest.approx(0.25, abs=1e-3)
    ctx.candidate, ctx.candidates = 1, 2  # round 1, candidate 1: boundary first, at its ceiling
    action = json.loads(HeuristicPlanner().propose(ctx).raw)
    assert action["mixture"]["boundary"] <= 0.25 + 1e-9
    assert "exploring with more instruction" in action["rationale"]
