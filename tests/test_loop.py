"""The closed loop end to end on a tiny world: LangGraph graph, scripted planners, revise/refuse,
Pareto archive, hash-chained audit log, checkpoints, resume and extension."""

from __future__ import annotations

import json
import pytest

from scripted import GOOD, ScriptedPlanner

from mosaic.agents.context import StageEvent
from mosaic.agents.runner import run_loop
from mosaic.audit import read_log, verify_log
from mosaic.tools.archive import load_archive

pytestmark = pytest.mark.slow



def _config(tiny_run_config, tmp_path, rounds=2, **over):
    return tiny_run_config.model_copy(update={
        "run_dir": str(tmp_path / "run"),
        "loop": tiny_run_config.loop.model_copy(update={"rounds": rounds}), **over})


def test_baseline_and_two_rounds_with_a_scripted_planner(tiny_run_config, tmp_path):
    cfg = _config(tiny_run_config, tmp_path)
    second = {**GOOD, "mixture": {"safety": 0.2, "boundary": 0.4, "instruction": 0.4}}
    planner = ScriptedPlanner([json.dumps(GOOD), json.dumps(second)])
    events: list[StageEvent] = []
    out = run_loop(cfg, planner=planner, progress=events.append)

    assert out.ran and out.state["finished"]
    history = out.state["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert history[1]["action"]["mixture"] == GOOD["mixture"]
    assert history[2]["action"]["mixture"] == second["mixture"]
    assert all(h["heldout"] for h in history)  # held-out scores for every point
    # the planner saw the latest round's reports and the history
    assert planner.seen[0].reports_round == 0 and planner.seen[1].reports_round == 1
    assert [r.round for r in planner.seen[1].history] == [0, 1]

    archive = load_archive(cfg.run_dir)
    assert [p.round for p in archive.points] == [0, 1, 2]
    assert set(archive.front) <= {0, 1, 2} and archive.front
    assert archive.hypervolume > 0

    assert verify_log(cfg.run_dir).ok
    log = read_log(cfg.run_dir)
    kinds = [e["event"] for e in log]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    for k in (1, 2):
        seq = [e["event"] for e in log if e["round"] == k]
        assert seq == ["proposal", "verdict", "executed", "manifest", "trained", "scores",
                       "archive"], seq
    stages = {(e.stage, e.status) for e in events}
    assert {("baseline", "done"), ("train", "done"), ("evaluate", "done")} <= stages

    # Rerunning a finished run prints its results without recomputing anything.
    again = run_loop(cfg, planner=ScriptedPlanner([]))
    assert not again.ran and again.state["history"] == history


def test_an_invalid_proposal_is_revised_with_the_verdicts_text(tiny_run_config, tmp_path):
    cfg = _config(tiny_run_config, tmp_path, rounds=1)
    bad = {**GOOD, "mixture": {"safety": 0.7, "boundary": 0.7}}
    planner = ScriptedPlanner([json.dumps(bad), "not json at all", json.dumps(GOOD)])
    out = run_loop(cfg, planner=planner)
    assert out.state["history"][1]["author"] == "planner"
    # the second proposal saw the first verdict's problems, verbatim
    assert any("[weights_not_summing] $.mixture" in f for f in planner.seen[1].feedback)
    assert any("[json_syntax]" in f for f in planner.seen[2].feedback)
    log = read_log(cfg.run_dir)
    r1 = [e["event"] for e in log if e["round"] == 1]
    assert r1[:7] == ["proposal", "verdict", "revision", "proposal", "verdict", "revision",
                      "proposal"]
    verdicts = [e["data"]["status"] for e in log if e["event"] == "verdict"]
    assert verdicts == ["invalid", "invalid", "ok"]


def test_after_max_revisions_the_fallback_planner_runs(tiny_run_config, tmp_path):
    cfg = _config(tiny_run_config, tmp_path, rounds=1)
    cfg = cfg.model_copy(update={"planner": cfg.planner.model_copy(update={"max_revisions": 1})})
    planner = ScriptedPlanner(['{"mixture": {"nonsense": 1.0}}'] * 2)
    out = run_loop(cfg, planner=planner)
    assert len(planner.seen) == 2  # the first proposal and one revision
    entry = out.state["history"][1]
    assert entry["author"] == "fallback" and not entry["skipped"]
    log = read_log(cfg.run_dir)
    events = [e["event"] for e in log if e["round"] == 1]
    assert events[:6] == ["proposal", "verdict", "revision", "proposal", "verdict", "refusal"]
    fallback = next(e for e in log if e["event"] == "fallback")
    assert fallback["author"] == "fallback" and fallback["data"]["source"] == "heuristic planner"
    executed = next(e for e in log if e["event"] == "executed")
    assert executed["author"] == "fallback"
    assert verify_log(cfg.run_dir).ok


def test_a_finished_run_is_extended_when_rounds_are_raised(tiny_run_config, tmp_path):
    cfg = _config(tiny_run_config, tmp_path, rounds=1)
    run_loop(cfg, planner=ScriptedPlanner([]))
    more = _config(tiny_run_config, tmp_path, rounds=2)
    said = []
    out = run_loop(more, planner=ScriptedPlanner([]), on_start=said.append)
    assert said == ["extended"] and out.ran
    assert [h["round"] for h in out.state["history"]] == [0, 1, 2]
    assert verify_log(cfg.run_dir).ok


def _stamps(run_dir, rounds):
    out = {}
    for k in rounds:
        rd = run_dir / f"round_{k}"
        for rel in ("eval/safety/responses.parquet", "heldout/safety/responses.parquet",
                    "dataset/train.parquet", "adapter/adapter_model.safetensors"):
            if (rd / rel).is_file():
                out[f"round_{k}/{rel}"] = (rd / rel).stat().st_mtime_ns
    return out


def test_a_killed_mosaic_run_resumes_without_redoing_finished_rounds(tiny_run_config, tmp_path):
    """SIGKILL a real `mosaic run` while it trains round 2, then resume it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mosaic.config import dump_config

    run_dir = tmp_path / "run"
    cfg = _config(tiny_run_config, tmp_path, rounds=2)
    # More epochs so training lasts long enough to be caught in the act.
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"epochs": 12})})
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mosaic", "run", str(cfg_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            staging = list((run_dir / "round_2").glob(".adapter.train-*"))
            if staging and not (run_dir / "round_2" / "adapter.done.json").exists():
                break
            assert proc.poll() is None, "mosaic run ended before round 2 trained"
            time.sleep(0.02)
        else:
            pytest.fail("round 2 never started training")
        time.sleep(0.5)  # well inside the training step loop
        before = _stamps(run_dir, (0, 1))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "round_2" / "adapter.done.json").exists()  # killed during training
    assert len(before) == 6  # rounds 0-1 had finished: eval, held-out, dataset, adapter

    resumed = subprocess.run([sys.executable, "-m", "mosaic", "run", "--resume", str(run_dir)],
                             env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming the run" in " ".join(resumed.stdout.split())
    assert _stamps(run_dir, (0, 1)) == before  # rounds 0-1 were not redone
    assert (run_dir / "round_2" / "round.json").is_file()
    assert [p.round for p in load_archive(run_dir).points] == [0, 1, 2]
    assert verify_log(run_dir).ok
    log = read_log(run_dir)
    ids = [e["id"] for e in log if e["id"]]
    assert len(ids) == len(set(ids))  # nothing logged twice by the re-run node
    assert sum(e["event"] == "run_resumed" for e in log) == 1
    assert [e["round"] for e in log if e["event"] == "trained"] == [1, 2]
    assert not list((run_dir / "round_2").glob(".adapter.train-*"))  # staging cleaned up
