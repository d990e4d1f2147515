"""The one loop driver (agents/runner.py) on a finished tiny run: `loop.rounds` lowered on resume
stops the run or is refused, a bug in the check is a crash (not a skipped round), langgraph.json's
`make_graph` takes the run lock and the settings check, and chat shows the action compactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from scripted import GOOD, ScriptedPlanner
from typer.testing import CliRunner

from mosaic.agents.runner import run_loop
from mosaic.audit import read_log, verify_log
from mosaic.config import dump_config
from mosaic.run_store import CONFIG_FILE, RunBusyError, RunConfigError, saved_config


def _rounds(cfg, n: int):
    return cfg.model_copy(update={"loop": cfg.loop.model_copy(update={"rounds": n})})


@pytest.fixture(scope="module")
def finished_run(tiny_run_config, tmp_path_factory):
    """A finished run: baseline + one round (held-out sets at the baseline only)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    cfg = tiny_run_config.model_copy(update={
        "run_dir": str(run_dir),
        "loop": tiny_run_config.loop.model_copy(update={"rounds": 1,
                                                        "heldout_every_round": False})})
    out = run_loop(cfg)
    assert out.state["finished"]
    return cfg


def _copy(finished_run, tmp_path, rounds: int):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run_dir)
    return _rounds(finished_run, rounds).model_copy(update={"run_dir": str(run_dir)})


class _Stop(Exception):
    """Stands for a crash in a node (the process would die there)."""


class _StoppingPlanner(ScriptedPlanner):
    def propose(self, context):
        raise _Stop(f"stopped while planning round {context.round}")


# ---- loop.rounds lowered on resume ---------------------------------------------------------------


@pytest.mark.slow
def test_rounds_lowered_between_rounds_stop_the_run_there(finished_run, tmp_path):
    cfg = _copy(finished_run, tmp_path, rounds=3)
    with pytest.raises(_Stop):  # extended to 3, then stopped while planning round 2
        run_loop(cfg, planner=_StoppingPlanner([]))
    said = []
    out = run_loop(_rounds(cfg, 1), planner=ScriptedPlanner([]), on_start=said.append)
    assert said == ["resumed"]
    assert out.state["finished"] and out.state["rounds"] == 1
    assert [h["round"] for h in out.state["history"]] == [0, 1]
    log = read_log(cfg.run_dir)
    assert log[-1]["event"] == "run_finished" and log[-1]["data"]["rounds"] == 1
    assert not [e for e in log if e["round"] == 2]  # nothing of round 2 was run
    assert saved_config(cfg.run_dir).loop.rounds == 1
    assert verify_log(cfg.run_dir).ok


@pytest.mark.slow
def test_rounds_lowered_below_what_ran_are_refused_and_nothing_is_written(finished_run, tmp_path,
                                                                          monkeypatch):
    import mosaic.tools.run_round as run_round

    cfg = _copy(finished_run, tmp_path, rounds=2)
    config_text = (tmp_path / "run" / CONFIG_FILE).read_text()
    # A finished run with one round cannot be cut to none.
    with pytest.raises(RunConfigError, match=r"loop.rounds 0 is below what this run already did "
                                             r"\(1 round ran\).*loop.rounds 1 or more"):
        run_loop(_rounds(cfg, 0))
    assert (tmp_path / "run" / CONFIG_FILE).read_text() == config_text

    def crash(*a, **k):
        raise _Stop("killed while building")

    monkeypatch.setattr(run_round, "dataset_stage", crash)
    with pytest.raises(_Stop):
        run_loop(cfg, planner=ScriptedPlanner([json.dumps(GOOD)]))
    monkeypatch.undo()
    text = (tmp_path / "run" / CONFIG_FILE).read_text()
    log_size = len(read_log(cfg.run_dir))
    with pytest.raises(RunConfigError, match="round 2 is under way.*loop.rounds 2 or more"):
        run_loop(_rounds(cfg, 1))
    assert (tmp_path / "run" / CONFIG_FILE).read_text() == text  # refused before writing
    assert len(read_log(cfg.run_dir)) == log_size

    # From the command line: exit 2 with the message.
    from mosaic.cli import app

    result = CliRunner().invoke(app, ["run", "--resume", cfg.run_dir],
                                env={"MOSAIC__loop__rounds": "1", "COLUMNS": "300"})
    assert result.exit_code == 2, (result.output, result.exception)
    assert "round 2 is under way" in " ".join(result.output.split())


# ---- a step's writes saved, its checkpoint lost ---------------------------------------------------


@pytest.mark.slow
def test_writes_saved_without_their_checkpoint_resume_instead_of_finishing(finished_run, tmp_path,
                                                                           monkeypatch):
    """The window the old drivers took for "finished": a node's writes are in the checkpoint
    database but the checkpoint after it is not (a crash between the two), so LangGraph shows an
    empty `next`. Made here by deleting the newest checkpoint of a run stopped in training."""
    import sqlite3

    import mosaic.tools.run_round as run_round
    from mosaic.agents.runner import CHECKPOINT_FILE, THREAD_ID, open_checkpointer
    from mosaic.agents.graph import build_graph

    cfg = _copy(finished_run, tmp_path, rounds=2)

    def crash(*a, **k):
        raise _Stop("killed while training")

    monkeypatch.setattr(run_round, "train_stage", crash)
    with pytest.raises(_Stop):
        run_loop(cfg, planner=ScriptedPlanner([json.dumps(GOOD)]))
    monkeypatch.undo()
    db = sqlite3.connect(tmp_path / "run" / CHECKPOINT_FILE)
    with db:
        (newest,) = db.execute("SELECT max(checkpoint_id) FROM checkpoints WHERE thread_id = ? "
                               "AND checkpoint_ns = ''", (THREAD_ID,)).fetchone()
        db.execute("DELETE FROM checkpoints WHERE checkpoint_id = ?", (newest,))
        db.execute("DELETE FROM writes WHERE checkpoint_id = ?", (newest,))
    db.close()
    gcfg = {"configurable": {"thread_id": THREAD_ID}}
    with open_checkpointer(tmp_path / "run") as saver:
        snapshot = build_graph(checkpointer=saver).get_state(gcfg)
    assert snapshot.next == () and not snapshot.values.get("finished")  # looks "done"

    said = []
    out = run_loop(cfg, planner=ScriptedPlanner([]), on_start=said.append)
    assert said == ["resumed"] and out.ran
    assert out.state["finished"] and [h["round"] for h in out.state["history"]] == [0, 1, 2]
    log = read_log(cfg.run_dir)
    assert [e["round"] for e in log if e["event"] == "trained"] == [1, 2]
    ids = [e["id"] for e in log if e["id"]]
    assert len(ids) == len(set(ids))
    assert verify_log(cfg.run_dir).ok


# ---- a bug in the check --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_bug_in_the_check_is_a_crash_not_a_skipped_round(finished_run, tmp_path, monkeypatch):
    import mosaic.tools.validate_action as va
    from mosaic.cli import app

    cfg = _copy(finished_run, tmp_path, rounds=2)

    def broken(raw, ctx):
        raise ZeroDivisionError("a defect in the check")

    monkeypatch.setattr(va, "_validate", broken)
    with pytest.raises(ZeroDivisionError):
        run_loop(cfg, planner=ScriptedPlanner(["not json at all"]))
    events = [e["event"] for e in read_log(cfg.run_dir) if e["round"] == 2]
    assert events == ["proposal"]  # no verdict, no revision, no refusal, no skipped round

    result = CliRunner().invoke(app, ["run", "--resume", cfg.run_dir], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)
    monkeypatch.undo()
    # Fixed, the check runs again on the same proposal: bad planner output is still a verdict
    # with reasons, the planner revises, and the run goes on.
    out = run_loop(cfg, planner=ScriptedPlanner([json.dumps(GOOD)]))
    assert out.state["finished"]
    verdicts = [e["data"] for e in read_log(cfg.run_dir) if e["event"] == "verdict"
                and e["round"] == 2]
    assert verdicts[0]["status"] == "invalid" and verdicts[0]["problems"][0]["code"] == "json_syntax"
    assert verdicts[-1]["status"] == "ok"


# ---- langgraph.json's entry ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_langgraph_json_entry_takes_the_lock_and_the_settings_check(finished_run, tmp_path):
    from mosaic.agents.runner import make_graph
    from mosaic.agents.runner import THREAD_ID

    root = Path(__file__).resolve().parents[1]
    entry = json.loads((root / "langgraph.json").read_text())["graphs"]["mosaic"]
    assert entry == "./agents/runner.py:make_graph"
    cfg = _copy(finished_run, tmp_path, rounds=2)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(cfg))
    server_config = {"configurable": {"mosaic_config": str(cfg_file)}}

    changed = tmp_path / "changed.yaml"
    changed.write_text(dump_config(cfg.model_copy(update={"seed": cfg.seed + 1})))
    with pytest.raises(RunConfigError, match="seed"):
        with make_graph({"configurable": {"mosaic_config": str(changed)}}):
            pass

    with make_graph(server_config) as graph:
        with pytest.raises(RunBusyError):  # the run lock is held while the tooling has the graph
            with make_graph(server_config):
                pass
        # The tooling streams without a context of its own: the run's is bound to the graph.
        for _ in graph.stream(None, {"configurable": {"thread_id": THREAD_ID}},
                              stream_mode="updates"):
            pass
        state = graph.get_state({"configurable": {"thread_id": THREAD_ID}}).values
    assert state["finished"] and [h["round"] for h in state["history"]] == [0, 1, 2]
    log = read_log(cfg.run_dir)
    assert any(e["event"] == "run_resumed" and e["data"].get("extended_to") == 2 for e in log)
    assert verify_log(cfg.run_dir).ok
    with make_graph(server_config):  # released when the tooling is done
        pass


# ---- chat shows the pending action compactly ----------------------------------------------------


def test_the_pending_action_is_a_compact_table_and_an_edit_shows_what_changed():
    from rich.console import Console

    from mosaic.agents.chat_session import action_changes, action_table

    action = {"mixture": {"safety": 0.5, "boundary": 0.3, "instruction": 0.2}, "method": "sft",
              "rationale": "why not",
              "objectives": {"safety": {"bucket_weights": {"complexity_5": 1.0},
                                        "focus": {"include": {"pc_patterns": ["P4_C3", "P5_C3"]},
                                                  "exclude": {}},
                                        "focus_ratio": 0.5, "quality_threshold": 4.0}}}
    console = Console(width=120, record=True)
    console.print(action_table(action))
    text = console.export_text()
    assert "method sft" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()
            and line.split()[0] in ("safety", "boundary", "instruction")}
    assert "0.50" in rows["safety"] and "complexity_5=1" in rows["safety"]
    assert "4" in rows["safety"] and "pc_patterns=P4_C3,P5_C3 (ratio 0.5)" in rows["safety"]
    assert "0.30" in rows["boundary"] and rows["boundary"].count("-") >= 3
    assert "why not" not in text and "{" not in text  # no raw JSON; the rationale is shown apart

    edited = json.loads(json.dumps(action))
    edited["mixture"] = {"safety": 0.9, "boundary": 0.05, "instruction": 0.05}
    edited["objectives"]["safety"]["focus"]["include"]["pc_patterns"] = ["P4_C3"]
    assert action_changes(action, edited) == [
        "mixture.boundary: 0.3 -> 0.05", "mixture.instruction: 0.2 -> 0.05",
        "mixture.safety: 0.5 -> 0.9",
        "objectives.safety.focus.include.pc_patterns: P4_C3,P5_C3 -> P4_C3"]
    assert action_changes(action, action) == []
