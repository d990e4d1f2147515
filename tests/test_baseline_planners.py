"""The benchmark's baseline planners: same action space as the heuristic, valid actions only."""

from __future__ import annotations

import json

import pytest
from test_heuristic_planner import TYPES, FakeTools, context, reports

from mosaic.agents.planners.base import RoundRecord
from mosaic.agents.planners.baselines import (OptunaPlanner, RandomPlanner, UniformPlanner,
                                              action_from_params, make_baseline,
                                              params_from_action)
from mosaic.schemas import DataAction


def _action(planner, ctx):
    proposal = planner.propose(ctx)
    action = json.loads(proposal.raw)
    DataAction.model_validate(action)
    assert sum(action["mixture"].values()) == pytest.approx(1.0)
    return action


def test_uniform_is_one_static_equal_mixture():
    action = _action(UniformPlanner(), context(reports()))
    assert set(action["mixture"]) == set(TYPES)
    assert max(action["mixture"].values()) - min(action["mixture"].values()) < 1e-5
    assert "objectives" not in action


def test_random_is_seeded_by_seed_and_round_and_spans_the_space():
    ctx = context(reports())
    a, b = _action(RandomPlanner(1), ctx), _action(RandomPlanner(1), ctx)
    assert a == b and a != _action(RandomPlanner(2), ctx)
    seen_thresholds = set()
    for seed in range(12):
        act = _action(RandomPlanner(seed), ctx)
        for oa in act.get("objectives", {}).values():
            seen_thresholds.add(oa.get("quality_threshold"))
            if "bucket_weights" in oa:
                assert sum(oa["bucket_weights"].values()) == pytest.approx(1.0)
    assert {3.0, 4.0, 5.0} & seen_thresholds


def test_random_draws_again_when_the_check_refuses():
    tools = FakeTools(refuse=['"quality_threshold": 5.0'])
    action = _action(RandomPlanner(3), context(reports(), tools=tools))
    assert "5.0" not in json.dumps(action.get("objectives", {}))
    assert len(tools.checked) >= 1


def test_params_round_trip_through_an_action():
    ctx = context(reports())
    params = {"w:safety": 0.5, "w:boundary": 0.3, "w:instruction": 0.2, "q:safety": "5",
              "q:boundary": "none", "q:instruction": "4",
              **{f"b:safety:complexity_{k}": 0.2 for k in range(1, 6)}}
    action = DataAction.model_validate(action_from_params(params, ctx))
    back = params_from_action(action, ctx, {"safety": [f"complexity_{k}" for k in range(1, 6)],
                                            "boundary": [], "instruction": []})
    assert back["w:safety"] == pytest.approx(0.5) and back["q:safety"] == "5"
    assert back["q:boundary"] == "none" and back["q:instruction"] == "4"
    assert back["b:safety:complexity_3"] == pytest.approx(0.2)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_optuna_learns_from_the_history_and_never_sends_a_refused_action(sampler):
    base = {"safety": 2.4, "boundary": 4.9, "instruction": 1.7}
    history = [RoundRecord(0, None, "system", base)]
    tools = FakeTools(refuse=['"quality_threshold": 3.0'])
    planner = OptunaPlanner(sampler, seed=0, startup=2)
    for k in range(1, 5):
        ctx = context(reports(), tools=tools, history=list(history))
        action = _action(planner, ctx)
        assert "3.0" not in json.dumps(action.get("objectives", {}))
        scores = {"safety": 2.4 + action["mixture"]["safety"], "boundary": 4.9 - 0.1 * k,
                  "instruction": 1.7}
        history.append(RoundRecord(k, DataAction.model_validate(action), "planner", scores))
    # rebuilt from the history: the same history asks the same next point
    ctx = context(reports(), tools=FakeTools(), history=history)
    assert OptunaPlanner(sampler, seed=0).propose(ctx).raw == OptunaPlanner(sampler, seed=0).propose(ctx).raw


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_a_rebuilt_study_goes_on_instead_of_repeating_its_first_point(sampler):
    """The study is rebuilt from the history every round: before the fix, TPE's two start-up
    rounds were the seed's first draw twice and NSGA-II (every rebuilt trial in generation 0)
    proposed that draw in all five rounds of the benchmark."""
    history = [RoundRecord(0, None, "system", {"safety": 2.4, "boundary": 4.9, "instruction": 1.7})]
    planner = OptunaPlanner(sampler, seed=0, startup=2)
    seen: list[str] = []
    for k in range(1, 6):
        action = _action(planner, context(reports(), tools=FakeTools(), history=list(history)))
        point = json.dumps({k: v for k, v in action.items() if k != "rationale"}, sort_keys=True)
        assert point not in seen, (k, action)
        seen.append(point)
        scores = {"safety": 2.4 + action["mixture"].get("safety", 0.0), "boundary": 4.9 - 0.1 * k,
                  "instruction": 1.7 + action["mixture"].get("instruction", 0.0)}
        history.append(RoundRecord(k, DataAction.model_validate(action), "planner", scores))


def test_make_baseline_names():
    assert make_baseline("uniform").name == "uniform"
    assert make_baseline("tpe", 1).name == "tpe" and make_baseline("nsga2", 1).name == "nsga2"
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("grid")
