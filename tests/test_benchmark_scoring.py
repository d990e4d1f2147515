"""Scoring of the search-quality benchmark: hypervolume over rounds, the final point, paired tests."""

from __future__ import annotations

import pytest

from mosaic.tools.benchmark import (final_point, mean_std, paired, rounds_to_target, score_run,
                                    sign_test)

OBJ = ["a", "b"]


def _h(r, a, b, ha=None, hb=None, **kw):
    return {"round": r, "eval": {"a": a, "b": b},
            "heldout": {"a": ha, "b": hb} if ha is not None else None, **kw}


def test_score_run_measures_improvement_over_the_baseline():
    history = [_h(0, 2.0, 4.0, 1.8, 3.8), _h(1, 3.0, 3.9, 2.5, 3.5), _h(2, 2.5, 4.2, 2.0, 4.0),
               _h(3, 1.9, 3.5, 1.5, 3.0), _h(4, 9.0, 9.0, skipped=True),
               _h(5, 9.0, 9.0, accepted=False)]
    s = score_run(history, OBJ)
    assert s["rounds"] == 3  # skipped and guard-refused rounds do not count
    # vs the baseline (2, 4): round 1 adds nothing (b below base), round 2 adds 0.5 x 0.2
    assert s["hv_vs_baseline"] == pytest.approx(0.5 * 0.2)
    assert s["hv_by_round"] == pytest.approx([0.0, 0.1, 0.1])
    assert s["hv_by_round_vs_ones"] == pytest.approx([2 * 2.9, 2 * 2.9 + 1.5 * 0.3,
                                                      2 * 2.9 + 1.5 * 0.3])
    # vs (1, 1): the union of [1,3]x[1,3.9] and [1,2.5]x[1,4.2]
    assert s["hv_vs_ones"] == pytest.approx(2 * 2.9 + 1.5 * 0.3)
    assert s["best"] == {"a": 3.0, "b": 4.2}
    assert s["hv_vs_baseline_ci"] is None  # no CI given
    # vs the baseline's CI lower ends (1.9, 3.85): round 1's small dip in b now counts
    tolerant = score_run(history, OBJ, baseline_ci_low={"a": 1.9, "b": 3.85})
    # the union of [1.9,3]x[3.85,3.9] and [1.9,2.5]x[3.9,4.2]
    assert tolerant["hv_vs_baseline_ci"] == pytest.approx(1.1 * 0.05 + 0.6 * 0.3)
    # max-min improvement: round 2 (min(0.5, 0.2) = 0.2) beats round 1 (min(1.0, -0.1))
    assert s["final_round"] == 2
    assert s["final_eval_delta"] == pytest.approx({"a": 0.5, "b": 0.2})
    assert s["final_heldout_delta"] == pytest.approx({"a": 0.2, "b": 0.2})


def test_final_point_ties_go_to_the_earlier_round():
    rounds = [_h(1, 3.0, 5.0), _h(2, 3.0, 5.0)]
    assert final_point(rounds, {"a": 2.0, "b": 4.0}, OBJ)["round"] == 1
    assert final_point([], {"a": 0, "b": 0}, OBJ) is None


def test_rounds_to_target():
    assert rounds_to_target([0.0, 0.1, 0.3], 0.25) == 3
    assert rounds_to_target([0.0, 0.1], 0.25) is None


def test_sign_test_and_paired_differences():
    assert sign_test([1, 1, 1]) == pytest.approx(0.25)
    assert sign_test([1, -1]) == 1.0 and sign_test([0, 0]) == 1.0
    assert sign_test([1] * 10) == pytest.approx(2 / 1024)
    p = paired([1.0, 2.0, 3.0], [0.5, 1.0, 1.0])
    assert p["mean_diff"] == pytest.approx(7.0 / 6) and p["wins"] == 3 and p["n"] == 3
    assert p["ci"][0] <= p["mean_diff"] <= p["ci"][1]
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])


def test_mean_std_ignores_missing_values():
    assert mean_std([1.0, None, 3.0]) == {"mean": 2.0, "std": pytest.approx(1.4142, abs=1e-4), "n": 2}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}
