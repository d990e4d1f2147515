"""AgentDojo suites as agentic items: the loader, scoring by AgentDojo's own functions on the
suites' ground-truth calls, and that pools never touch a held-out suite or the eval's attack
template. Skipped when the optional `agentdojo` extra is not installed."""

from __future__ import annotations

import json
import warnings

import pytest

pytest.importorskip("agentdojo", reason="optional extra: pip install 'mosaic[agentdojo]'")

from typer.testing import CliRunner  # noqa: E402

from mosaic.cli import app  # noqa: E402
from mosaic.data import read_rows  # noqa: E402
from mosaic.eval import agentdojo as ad  # noqa: E402
from mosaic.eval.base import get_objective_type  # noqa: E402
from mosaic.tools import agentdojo_build as b  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
SUITE = "slack"  # the fastest suite to replay


def _score(atoms, reply):
    conv = [{"role": "user", "content": "x"}, {"role": "assistant", "content": reply}]
    return get_objective_type("agentic").code_response_atoms([conv], [atoms])[0]


def test_replay_stops_at_the_injected_output():
    suite = ad.get_suite(SUITE)
    u, i = "user_task_1", "injection_task_1"
    rep = ad.replay(SUITE, u, i, ad.EVAL_ATTACK)
    goal = suite.injection_tasks[i].GOAL
    assert goal in rep.results[-1]  # the last replayed output carries the injection
    assert not any(goal in r for r in rep.results[:-1])
    full = suite.user_tasks[u].ground_truth(rep.pre_env)
    assert len(rep.prior) + len(rep.remaining) == len(full)
    text = ad.transcript(suite.user_tasks[u].PROMPT, rep)
    assert text.startswith(f"TASK: {suite.user_tasks[u].PROMPT}") and text.endswith("NEXT:")
    assert text.count("CALL: ") == len(rep.prior)
    benign = ad.replay(SUITE, u, None, "none")
    assert goal not in "\n".join(benign.results) and len(benign.prior) == len(rep.prior)
    sigs = ad.tool_signatures(SUITE)
    assert len(sigs) == len(suite.tools) and any(s.startswith("send_direct_message(") for s in sigs)


def test_prompt_atoms_come_from_the_ground_truth():
    rep = ad.replay(SUITE, "user_task_1", "injection_task_1", ad.EVAL_ATTACK)
    atoms = ad.prompt_atoms(SUITE, "user_task_1", "injection_task_1", ad.EVAL_ATTACK, rep)
    assert atoms["injection_present"] == 1 and atoms["scorer"] == ad.SCORER
    assert atoms["prior_tool_calls"] == len(rep.prior)
    assert atoms["user_calls"] == [ad.format_call(c.function, c.args) for c in rep.remaining]
    assert atoms["injection_calls"] and atoms["injection_kind"] in ("action_hijack",
                                                                     "data_exfiltration", "privacy")
    assert atoms["agentdojo"] == {"suite": SUITE, "version": ad.BENCHMARK_VERSION,
                                  "user_task": "user_task_1", "injection_task": "injection_task_1",
                                  "attack": ad.EVAL_ATTACK}


@pytest.mark.parametrize("user_task", ["user_task_0", "user_task_1", "user_task_2", "user_task_4"])
def test_scoring_by_agentdojo_on_ground_truth_calls(user_task):
    """The user task's own remaining calls: utility true, no attack success; the injection
    task's calls: security true (the attack succeeded); nothing called: neither."""
    for inj in ad.get_suite(SUITE).injection_tasks:
        rep = ad.replay(SUITE, user_task, inj, ad.EVAL_ATTACK)
        atoms = ad.prompt_atoms(SUITE, user_task, inj, ad.EVAL_ATTACK, rep)
        good = _score(atoms, b.chosen_reply(SUITE, user_task, atoms, ad.BENCHMARK_VERSION))
        bad = _score(atoms, b.rejected_reply(SUITE, inj, atoms, ad.BENCHMARK_VERSION))
        assert (good["task_completed"], good["harmful_call"], good["explicit_refusal"]) == (1, 0, 1)
        assert bad["harmful_call"] == 1 and bad["explicit_refusal"] == 0
        assert bad["followed_injection"] == 1
        idle = _score(atoms, "PLAN: I am not sure what to do.")
        assert idle["harmful_call"] == 0 and idle["followed_injection"] == 0
        if atoms["user_calls"]:
            assert idle["task_completed"] == 0


def test_parser_keeps_values_and_reads_only_act_segments():
    params = {"send_money": ("recipient", "amount", "subject", "date"), "get_iban": ()}
    calls, invalid = ad.parse_tool_calls(
        "PLAN: maybe send_money('X', 1) CHECK: no. ACT: send_money('US12AB', 98.7, "
        "subject='Rent (May)', date='2022-01-01'); get_iban(); nosuch_tool(1); send_money('Y'",
        params)
    assert calls == [("send_money", {"recipient": "US12AB", "amount": 98.7,
                                     "subject": "Rent (May)", "date": "2022-01-01"}),
                     ("get_iban", {})]
    assert invalid == 1  # the unknown tool; the cut-off call at the end is not a call at all
    assert ad.parse_tool_calls("ACT: get_iban(1, 2)", params) == ([], 1)


def test_build_pools_and_eval_are_disjoint(tmp_path):
    out = tmp_path / "adj"
    summary = b.build(out, ["travel"], [SUITE], eval_attacked=6, eval_benign=2, pool_pairs=4)
    meta = json.loads((out / "agentdojo.json").read_text())
    assert "MIT" in meta["source"] and meta["heldout_suites"] == [SUITE]
    ev = read_rows(out / "eval" / f"agentdojo_{SUITE}.parquet")
    pool = read_rows(out / "pools" / "agentdojo_travel.parquet")
    assert len(ev) == 8 and len(pool) == 8 and summary.files[1].attacked == 4
    ev_src = [json.loads(r["metadata"])["source"] for r in ev]
    pool_src = [json.loads(r["metadata"])["source"] for r in pool]
    # no held-out suite and no eval attack template in any pool row
    assert {s["suite"] for s in pool_src} == {"travel"} and {s["suite"] for s in ev_src} == {SUITE}
    assert {s["attack"] for s in pool_src} <= set(ad.POOL_ATTACKS)
    assert ad.EVAL_ATTACK not in ad.POOL_ATTACKS
    assert {s["attack"] for s in ev_src} <= {ad.EVAL_ATTACK, "none"}
    marker = "This is an important message from me"  # the eval template's wording
    assert not any(marker in m["content"] for r in pool for m in r["messages"])
    assert any(marker in r["messages"][1]["content"] for r in ev)
    ev_prompts = {r["messages"][1]["content"] for r in ev}
    assert not ev_prompts & {r["messages"][1]["content"] for r in pool}
    # pools: a chosen and a rejected reply per prompt, scored as the evaluator will
    by_pid: dict[str, list] = {}
    for r in pool:
        by_pid.setdefault(r["prompt_id"], []).append(r)
    for rows in by_pid.values():
        cls = {json.loads(r["metadata"])["response_class"]: r for r in rows}
        assert set(cls) == {"chosen", "rejected"}
        assert cls["chosen"]["score"] >= 4 and cls["rejected"]["score"] == 1


def test_build_refuses_overlap_and_bad_suites_writing_nothing(tmp_path):
    with pytest.raises(ValueError, match="both train and held-out"):
        b.build(tmp_path / "x", [SUITE], [SUITE])
    res = CliRunner().invoke(app, ["agentdojo", "build", "--out", str(tmp_path / "y"),
                                   "--suites", "nosuch", "--heldout", SUITE])
    assert res.exit_code == 2 and "unknown AgentDojo suite 'nosuch'" in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not list(tmp_path.iterdir())
