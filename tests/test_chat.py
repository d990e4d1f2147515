"""`mosaic chat` on a tiny run, driven by scripted stdin lines: edits and standing limits apply,
are logged with author `human` and bind the next executed action and the planner after it;
invalid edits change nothing; /quit pauses and a new session continues at the same pause."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mosaic.agents.chat import ChatInputError, apply_action_edit, apply_limit_edit, parse_command
from mosaic.audit import read_log, verify_log
from mosaic.cli import app
from mosaic.config import dump_config
from mosaic.schemas import ChatEdit

# ---- parsing and applying edits (no run needed) ----------------------------------------------


@pytest.mark.parametrize("line, edit", [
    ("/approve", ChatEdit(op="approve")),
    ("/reject too much refusal data", ChatEdit(op="reject", text="too much refusal data")),
    ("/mix safety=0.5 boundary=0.3 instruction=0.2",
     ChatEdit(op="mix", weights={"safety": 0.5, "boundary": 0.3, "instruction": 0.2})),
    ("/focus safety pc_patterns=P4_C3,P5_C3",
     ChatEdit(op="focus", objective="safety", key="pc_patterns", values=["P4_C3", "P5_C3"])),
    ("/exclude boundary friction=mid,high",
     ChatEdit(op="exclude", objective="boundary", key="friction", values=["mid", "high"])),
    ("/focus instruction inst_complexity=4,5",
     ChatEdit(op="focus", objective="instruction", key="inst_complexity", values=[4, 5])),
    ("/threshold safety 5", ChatEdit(op="threshold", objective="safety", value=5.0)),
    ("/threshold none", ChatEdit(op="threshold", value=None)),
    ("/floor boundary 0.3", ChatEdit(op="floor", objective="boundary", value=0.3)),
    ("/maxchange 0.1", ChatEdit(op="max_change", value=0.1)),
    ("/guard boundary 4.7", ChatEdit(op="guard", objective="boundary", value=4.7)),
])
def test_slash_commands_parse_to_typed_edits(line, edit):
    parsed = parse_command(line)
    assert parsed == edit
    assert parse_command(parsed.command()) == edit  # shown commands round-trip


@pytest.mark.parametrize("line, message", [
    ("approve", "commands start with '/'"),
    ("/mix safety=lots", "must be a number"),
    ("/focus safety", "/focus OBJECTIVE KEY=value1,value2"),
    ("/floor boundary nan", "finite number"),
    ("/frobnicate", "unknown command /frobnicate"),
])
def test_unreadable_commands_say_what_was_expected(line, message):
    with pytest.raises(ChatInputError, match=message):
        parse_command(line)


def test_edits_apply_to_a_copy_and_limits_are_validated():
    action = {"mixture": {"safety": 0.5, "boundary": 0.5}}
    edited = apply_action_edit(action, ChatEdit(op="focus", objective="safety", key="leak_types",
                                                values=["step_leak"]))
    assert action == {"mixture": {"safety": 0.5, "boundary": 0.5}}
    assert edited["objectives"]["safety"] == {"focus": {"include": {"leak_types": ["step_leak"]}},
                                              "focus_ratio": 0.5}
    names = ["safety", "boundary"]
    limits, problems = apply_limit_edit({}, ChatEdit(op="floor", objective="boundary", value=0.4), names)
    assert limits == {"floors": {"boundary": 0.4}} and problems == []
    same, problems = apply_limit_edit(limits, ChatEdit(op="ceiling", objective="boundary", value=0.3),
                                      names)
    assert same == limits and "above its ceiling" in problems[0]
    _, problems = apply_limit_edit(limits, ChatEdit(op="floor", objective="nope", value=0.1), names)
    assert "unknown objective 'nope'" in problems[0]
    _, problems = apply_limit_edit(limits, ChatEdit(op="floor", objective="safety", value=0.7), names)
    assert "floors sum to 1.1" in problems[0]


# ---- a scripted session on a tiny run ------------------------------------------------------------


def _chat(target, lines: list[str]):
    result = CliRunner().invoke(app, ["chat", str(target)], input="".join(l + "\n" for l in lines),
                                terminal_width=200)
    return result, " ".join(result.output.split())


@pytest.mark.slow
def test_a_scripted_chat_session_steers_pauses_and_resumes(tiny_run_config, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_run_config.model_copy(update={
        "run_dir": str(run_dir), "loop": tiny_run_config.loop.model_copy(update={"rounds": 2})})
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(cfg))

    first, out = _chat(cfg_file, [
        "/floor boundary 0.45",
        "/buckets safety complexity_9=1.0",
        "/mix safety=0.9 boundary=0.05 instruction=0.05",
        "/focus safety pc_patterns=P4_C3,P5_C3",
        "/approve",
        "/quit",
    ])
    assert first.exit_code == 0, first.output
    assert "round 1 of 2: the action waits for you" in out
    assert "[unknown_slice] $.objectives.safety.bucket_weights.complexity_9" in out
    assert "[below_floor] $.mixture.boundary" in out
    assert "paused at round 2" in out
    # The pause is shown once in full (failures, the action as a table); each command after it
    # shows only what changed, never the failure report or the action as raw JSON again.
    assert out.count("failures of round 0") == 1 and '"mixture":' not in out
    assert "objectives.safety.focus.include.pc_patterns: - -> P4_C3,P5_C3" in out

    log = read_log(run_dir)
    human = [e for e in log if e["event"].startswith("human_")]
    assert all(e["author"] == "human" for e in human)
    assert [(e["event"], e["data"].get("accepted", e["data"].get("decision"))) for e in human] == [
        ("human_limits", True), ("human_edit", False), ("human_edit", False),
        ("human_edit", True), ("human_decision", "approve")]
    refused = [e["data"]["problems"] for e in human if e["data"].get("accepted") is False]
    assert "unknown_slice" in refused[0] and "below_floor" in refused[1]
    executed = next(e for e in log if e["event"] == "executed" and e["round"] == 1)
    assert executed["author"] == "human"
    action = executed["data"]["action"]
    assert action["mixture"]["boundary"] >= 0.45  # the floor held in the executed action
    assert action["objectives"]["safety"]["focus"]["include"]["pc_patterns"] == ["P4_C3", "P5_C3"]
    # the run is paused at round 2's review, with the planner's proposal under the floor
    paused_at = [e for e in log if e["event"] == "verdict" and e["round"] == 2]
    assert paused_at and not any(e["event"] == "executed" and e["round"] == 2 for e in log)
    proposal2 = json.loads(next(e for e in log if e["event"] == "proposal"
                                and e["round"] == 2)["data"]["raw"])
    assert proposal2["mixture"]["boundary"] >= 0.45  # the standing floor binds the planner too

    second, out2 = _chat(run_dir, ["/approve"])
    assert second.exit_code == 0, second.output
    assert "round 2 of 2: the action waits for you" in out2  # the same pause, shown again
    assert "the run is finished" in out2
    log = read_log(run_dir)
    executed2 = next(e for e in log if e["event"] == "executed" and e["round"] == 2)
    assert executed2["author"] == "planner"
    assert executed2["data"]["action"]["mixture"]["boundary"] >= 0.45
    assert verify_log(run_dir).ok
    # the audit re-checks the human-edited action under the limits the person had set
    from mosaic.tools.verify_run import verify_run

    result = verify_run(run_dir)
    assert result.ok, result.problem
    tightened = run_dir / "config.yaml"
    text = tightened.read_text()
    assert "ceilings: {}" in text
    tightened.write_text(text.replace("ceilings: {}", "ceilings: {boundary: 0.4}"))
    bad = verify_run(run_dir)
    assert not bad.ok and "round 1" in bad.problem


@pytest.mark.slow
def test_free_text_becomes_typed_edits_that_are_shown_before_they_apply(openai_server,
                                                                       tiny_run_config, tmp_path):
    from openai_server import Text

    from mosaic.config import EndpointConfig

    run_dir = tmp_path / "run"
    cfg = tiny_run_config.model_copy(update={
        "run_dir": str(run_dir), "loop": tiny_run_config.loop.model_copy(update={"rounds": 1}),
        "chat": tiny_run_config.chat.model_copy(update={"endpoint": EndpointConfig(
            base_url=openai_server.base_url, model="chat-model", max_retries=0)})})
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(cfg))
    openai_server.push(
        Text(json.dumps({"edits": [{"op": "exclude", "objective": "boundary", "key": "friction",
                                    "values": ["mid", "high"]},
                                   {"op": "guard", "objective": "boundary", "value": 4.99}],
                         "explanation": "drop preachy answers; insist on boundary"})),
        Text("I would rather not answer in JSON."))
    result, out = _chat(cfg_file, [
        "/help", "/history", "/show slice safety complexity_5", "/examples safety complexity_5",
        "keep the boundary answers clean and never accept a boundary below 4.99",
        "y",
        "make it better somehow",
        "/approve",
    ])
    assert result.exit_code == 0, result.output
    assert "/exclude boundary friction=mid,high; /guard boundary 4.99" in out  # shown first
    assert "the chat model's reply is not a valid list of edits" in out
    assert '"share_of_need"' in out and "/floor OBJ X" in out  # /show and /help answered
    req = openai_server.requests[0]
    assert req.messages[-1]["content"].startswith("keep the boundary answers clean")
    log = read_log(run_dir)
    edit = next(e for e in log if e["event"] == "human_edit" and e["data"]["accepted"])
    assert edit["author"] == "human" and "keep the boundary" in edit["data"]["command"]
    executed = next(e for e in log if e["event"] == "executed")
    assert executed["data"]["action"]["objectives"]["boundary"]["focus"]["exclude"] == {
        "friction": ["mid", "high"]}
    # the guard (boundary >= 4.99) refused the round: it stays out of the archive
    archive = next(e for e in log if e["event"] == "archive")
    assert archive["data"]["accepted"] is False and "boundary" in archive["data"]["violated"]
    from mosaic.tools.archive import load_archive

    assert [p.round for p in load_archive(run_dir).points] == [0]
