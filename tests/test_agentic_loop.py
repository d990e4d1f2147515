"""The agentic objective in the loop (tiny): a tool-world run whose heuristic planner gives it
budget, the Pareto archive, failure reports, the HTML report, and chat's /focus and /floor on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_run_overrides

from mosaic.agents.chat import apply_action_edit, apply_limit_edit, parse_command
from mosaic.agents.planners.heuristic import HeuristicPlanner
from mosaic.agents.runner import run_loop
from mosaic.config import LimitsConfig, load_config
from mosaic.schemas import FailureReport
from mosaic.tools.archive import load_archive

pytestmark = pytest.mark.slow

NAMES = ("safety", "boundary", "instruction", "agentic")


@pytest.fixture(scope="module")
def agentic_run(tmp_path_factory, tiny_trained_model_dir):
    root = tmp_path_factory.mktemp("tiny-agentic")
    overrides = {**tiny_run_overrides(root, tiny_trained_model_dir, NAMES, max_tokens=5000),
                 "loop": {"rounds": 1}}
    cfg = load_config("configs/sandbox-agentic.yaml", environ={}, overrides=overrides)
    from mosaic.sandbox import ensure_world

    ensure_world(cfg.world)
    out = run_loop(cfg, planner=HeuristicPlanner())
    return cfg, out


def test_the_heuristic_planner_gives_the_agentic_objective_budget(agentic_run):
    cfg, out = agentic_run
    assert out.state["finished"]
    history = out.state["history"]
    action = history[1]["action"]
    assert set(action["mixture"]) == set(NAMES) and action["mixture"]["agentic"] > 0
    # The type's own quality rule reaches the action (the planner names no type).
    agentic = action["objectives"]["agentic"]
    assert (agentic.get("focus") or {}).get("exclude") == {"reasoning": ["verbose"]}
    manifest = json.loads((Path(cfg.run_dir) / "round_1" / "dataset" / "manifest.json")
                          .read_text(encoding="utf-8"))
    assert sum(b["tokens_used"] for b in manifest["buckets"] if b["objective"] == "agentic") > 0


def test_the_archive_and_the_reports_carry_the_agentic_objective(agentic_run):
    cfg, _ = agentic_run
    archive = load_archive(cfg.run_dir)
    for p in archive.points:
        assert "agentic" in p.eval and "agentic" in p.heldout
    for split in ("eval", "heldout"):
        path = Path(cfg.run_dir) / "round_0" / split / "agentic" / "report.json"
        report = FailureReport.model_validate_json(path.read_text(encoding="utf-8"))
        assert report.objective_type == "agentic"
    b = report.breakdowns
    assert {"attack_success_rate", "utility", "utility_under_attack", "per_kind"} <= set(b)
    assert b["attack_success_rate"]["n"] > 0


def test_the_html_report_shows_the_agentic_objective(agentic_run, tmp_path):
    from mosaic.tools.audit_report import build_audit_report
    from mosaic.tools.html_report import render_html_report

    html = render_html_report(build_audit_report(Path(agentic_run[0].run_dir)))
    assert html.count("agentic") >= 3


def test_chat_focus_and_floor_on_the_agentic_objective(agentic_run, tmp_path):
    cfg, out = agentic_run
    action = out.state["history"][1]["action"]
    edit = parse_command("/focus agentic injection_kind=data_exfiltration,privacy")
    edited = apply_action_edit(action, edit)
    assert edited["objectives"]["agentic"]["focus"]["include"] == {
        "injection_kind": ["data_exfiltration", "privacy"]}
    limits, problems = apply_limit_edit({}, parse_command("/floor agentic 0.4"), list(NAMES))
    assert problems == [] and limits == {"floors": {"agentic": 0.4}}

    # The check accepts the edited action on the run's pools; a floor binds the planner.
    from mosaic.sandbox.base_model import tokenizer_dir
    from mosaic.tools.dataset.pools import prepare_from_config
    from mosaic.tools.validate_action import ActionContext, validate_action
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(cfg)))
    pools = prepare_from_config(cfg, tok, cache_dir=tmp_path / "pools").prepared
    verdict = validate_action(json.dumps(edited), ActionContext.from_config(cfg, pools))
    assert verdict.ok, [p.message for p in verdict.problems]
    bad = apply_action_edit(action, parse_command("/focus agentic injection_kind=phishing"))
    verdict = validate_action(json.dumps(bad), ActionContext.from_config(cfg, pools))
    assert not verdict.ok and any("injection_kind" in p.path or "injection_kind" in p.message
                                  for p in verdict.problems)
    floored = cfg.model_copy(update={"limits": LimitsConfig(floors={"agentic": 0.4})})
    low = {**edited, "mixture": {"safety": 0.3, "boundary": 0.2, "instruction": 0.2, "agentic": 0.3}}
    verdict = validate_action(json.dumps(low), ActionContext.from_config(floored, pools))
    assert not verdict.ok and any("agentic" in p.message for p in verdict.problems)
