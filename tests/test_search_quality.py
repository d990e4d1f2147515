"""The search-quality benchmark's --quick mode runs every method's rounds within budget and
writes its results in the documented shape (who wins is not asserted: that is the benchmark's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_quick_benchmark_runs_every_method_within_budget(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import search_quality

    summary = search_quality.main(["--quick", "--out", str(tmp_path), "--jobs", "2"])
    out = tmp_path / "quick"
    results = json.loads((out / "results.json").read_text())
    assert (out / "hv_by_round.svg").read_text().lstrip().startswith("<?xml")
    methods = ["uniform", "random", "tpe", "nsga2", "mosaic-heuristic"]
    assert results["methods"] == methods and results["seeds"] == [0] and results["rounds"] == 2
    assert results["quick"] and results["budget"] == 4000
    for m in methods:
        row = results["table"][m]
        for key in ("hv_vs_baseline", "hv_vs_baseline_ci", "hv_vs_ones", "rounds_to_target",
                    "wall_s"):
            assert {"mean", "std", "n"} <= set(row[key])
        for o in ("safety", "boundary", "instruction"):
            assert f"best:{o}" in row and f"final_heldout_delta:{o}" in row
    assert set(results["comparisons"]) == {"mosaic-heuristic"}
    assert results["best_optuna"] in ("tpe", "nsga2")
    comparison = results["comparisons"]["mosaic-heuristic"]
    assert set(comparison) == {"uniform", "random", "tpe", "nsga2"}
    for key in ("hv_vs_baseline", "hv_vs_baseline_ci", "hv_vs_ones", "final_heldout_delta:boundary"):
        assert {"sign_p", "ci", "wins", "n"} <= set(comparison["random"][key]), key
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == set(methods)
    for m, r in runs.items():
        assert r["over_budget_rounds"] == [], m  # every manifest within the round budget
        assert len(r["authors"]) == 2 and all(a == "planner" for a in r["authors"]), (m, r["authors"])
        assert r["score"]["rounds"] == 2
        assert r["score"]["hv_vs_baseline_ci"] is not None
    assert summary["wall_s"] > 0
    # A rerun finds every run finished, computes nothing and reports the first wall times.
    again = search_quality.main(["--quick", "--out", str(tmp_path), "--jobs", "2"])
    for first, second in zip(results["runs"], again["runs"]):
        assert not second["computed"] and second["wall_s"] == first["wall_s"]
