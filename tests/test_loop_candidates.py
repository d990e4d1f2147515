"""`loop.candidates: N` in the loop: the plan node asks the planner for N candidate actions, the
passing ones are built, trained and evaluated side by side (`run_candidates`), the archive's
best is kept, placed in the round folder and archived, and the audit log has one verified entry
per candidate. The setting, the heuristic's exploration, the LLM planner's prompt, placing the
kept candidate and the settings check are tested without training; a tiny `mosaic run` with two
candidates (on the local engine and as Ray tasks) and a SIGKILL inside the candidate stage with
training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mosaic.config import ConfigError, load_config
from mosaic.tools.candidates import data_hash, keep_candidate

SAFETY_HEAVY = {"mixture": {"safety": 0.8, "boundary": 0.1, "instruction": 0.1},
                "method": "sft", "rationale": "safety first"}


# ---- without training -------------------------------------------------------------------------


def test_loop_candidates_defaults_to_one_and_must_be_at_least_one(tmp_path):
    assert load_config("configs/sandbox.yaml", environ={}).loop.candidates == 1
    assert load_config("configs/sandbox.yaml", environ={},
                       overrides={"loop": {"candidates": 3}}).loop.candidates == 3
    with pytest.raises(ConfigError, match="loop.candidates"):
        load_config("configs/sandbox.yaml", environ={}, overrides={"loop": {"candidates": 0}})


def test_a_resume_may_not_change_the_number_of_candidates(tmp_path):
    from mosaic.run_store import RunConfigError, open_run

    def config(n: int):
        return load_config("configs/sandbox.yaml", environ={},
                           overrides={"run_dir": str(tmp_path / "run"), "loop": {"candidates": n}})

    assert open_run(config(2)) == []
    with pytest.raises(RunConfigError, match=r"loop.candidates: 2 -> 1"):
        open_run(config(1))


def test_duplicates_are_the_same_action_apart_from_the_rationale():
    other_words = {**SAFETY_HEAVY, "rationale": "the same mixture, said differently"}
    other_mix = {**SAFETY_HEAVY, "mixture": {"safety": 0.7, "boundary": 0.2, "instruction": 0.1}}
    assert data_hash(json.dumps(SAFETY_HEAVY)) == data_hash(json.dumps(other_words))
    assert data_hash(json.dumps(SAFETY_HEAVY)) != data_hash(json.dumps(other_mix))
    assert data_hash("not an action") is None


def _candidate_folder(root: Path, j: int, marker: str) -> None:
    d = root / "candidates" / str(j)
    for rel in ("action.json", "verdict.json", "dataset/manifest.json", "dataset/train.parquet",
                "dataset.done.json", "adapter/adapter_model.safetensors", "adapter.done.json",
                "eval/eval_report.json", "eval/safety/report.json"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(f"{marker} {rel}")
    (d / "round.json").write_text("the candidate's own summary")


def test_the_kept_candidate_is_placed_in_the_round_folder_and_placing_it_again_is_a_no_op(tmp_path):
    for j in (0, 1):
        _candidate_folder(tmp_path, j, f"candidate {j}")
    (tmp_path / "candidates" / "0" / "heldout").mkdir()
    (tmp_path / "candidates" / "0" / "heldout" / "eval_report.json").write_text("held-out 0")
    (tmp_path / "candidates" / "0" / "eval" / "only_in_0.json").write_text("x")

    # A crashed attempt had placed candidate 0; candidate 1 is the kept one.
    keep_candidate(tmp_path, 0)
    placed = keep_candidate(tmp_path, 1)
    assert (tmp_path / "eval" / "eval_report.json").read_text() == "candidate 1 eval/eval_report.json"
    assert os.path.samefile(tmp_path / "adapter" / "adapter_model.safetensors",
                            tmp_path / "candidates" / "1" / "adapter" / "adapter_model.safetensors")
    # nothing of candidate 0's is left, and round.json stays the caller's to write
    assert not (tmp_path / "heldout").exists() and not (tmp_path / "eval" / "only_in_0.json").exists()
    assert not (tmp_path / "round.json").exists()
    inodes = {p: p.stat().st_ino for p in placed}
    assert keep_candidate(tmp_path, 1) == placed
    assert {p: p.stat().st_ino for p in placed} == inodes


def test_the_llm_planner_is_told_the_earlier_candidates_only_when_there_are_several():
    from mosaic.agents.planners.base import EarlierCandidate, PlanContext
    from mosaic.agents.planners.llm import LLMPlanner
    from mosaic.config import EndpointConfig, LimitsConfig

    planner = LLMPlanner(EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m"))
    ctx = PlanContext(round=2, rounds=3, objectives={"safety": "jailbreak"},
                      targets={"safety": 4.5}, budget=1000, baseline={"safety": 2.0},
                      reports={}, reports_round=1, history=[], archive=None,
                      limits=LimitsConfig(), previous_action=None, tools=None)  # type: ignore[arg-type]
    single = planner.messages(ctx)[1]["content"]
    assert "candidate" not in single.lower()
    ctx.candidates, ctx.candidate = 3, 2
    ctx.earlier_candidates = [
        EarlierCandidate(index=0, raw=json.dumps(SAFETY_HEAVY), status="ok"),
        EarlierCandidate(index=1, raw='{"mixture": {"nonsense": 1.0}}', status="invalid",
                         problems=("[unknown_objective] $.mixture.nonsense: no such objective",))]
    text = planner.messages(ctx)[1]["content"]
    assert text.startswith(single)  # the single-action prompt, with the candidates after it
    assert "You are proposing candidate 3 of 3" in text
    assert f"candidate 1 (check: ok): {json.dumps(SAFETY_HEAVY)}" in text
    assert "candidate 2 (check: invalid)" in text and "[unknown_objective]" in text
    assert "Propose a different action" in text


# ---- a tiny run with two candidates ----------------------------------------------------------


def _candidates_config(tiny_run_config, root: Path, *, engine: str = "local"):
    runtime = tiny_run_config.runtime.model_copy(update={
        "engine": engine, "threads": 1,
        "ray": tiny_run_config.runtime.ray.model_copy(update={"workers": 2, "cpus_per_worker": 1})})
    return tiny_run_config.model_copy(update={
        "run_dir": str(root / "run"), "runtime": runtime,
        # its own stage cache: every adapter here is trained by this run
        "cache": tiny_run_config.cache.model_copy(update={"stages_dir": str(root / "stages")}),
        "loop": tiny_run_config.loop.model_copy(update={"rounds": 1, "candidates": 2,
                                                        "heldout_every_round": False})})


def _outcome(run_dir: Path) -> dict:
    """What must not depend on how the run got there: the candidates' figures, the kept one,
    the archive's points and the audit log's event sequence."""
    from mosaic.audit import read_log
    from mosaic.io import read_record
    from mosaic.tools.archive import load_archive
    from mosaic.tools.candidates import CANDIDATES_FILE, CandidateRound

    record = read_record(run_dir / "round_1" / CANDIDATES_FILE, CandidateRound)
    archive = load_archive(run_dir)
    assert archive is not None
    return {
        "kept": record.kept,
        "candidates": [(c.status, c.result.action.model_dump(mode="json") if c.result.action
                        else None, c.result.manifest.output_hash if c.result.manifest else None,
                        (c.result.train.steps, c.result.train.final_loss) if c.result.train
                        else None, c.result.scores, c.decision) for c in record.candidates],
        "archive": [(p.round, p.eval, p.action_hash) for p in archive.points],
        "front": archive.front,
        # run_finished's id names the opening that finished (a resumed run has more)
        "events": [(e["event"], e["id"] if e["event"] != "run_finished" else None)
                   for e in read_log(run_dir) if e["event"] not in ("run_started", "run_resumed")],
    }


@pytest.fixture(scope="module")
def candidates_run(tiny_run_config, tmp_path_factory):
    """One uninterrupted run with two candidates (in process, the driver `mosaic run` uses)."""
    from mosaic.agents.runner import run_loop

    config = _candidates_config(tiny_run_config, tmp_path_factory.mktemp("candidates-local"))
    out = run_loop(config)
    assert out.state["finished"] and [h["round"] for h in out.state["history"]] == [0, 1]
    return config


@pytest.mark.slow
def test_a_run_with_two_candidates_trains_both_keeps_one_and_its_audit_verifies(candidates_run):
    from mosaic.audit import read_log
    from mosaic.io import read_record
    from mosaic.schemas import RoundResult
    from mosaic.tools.audit_report import build_audit_report
    from mosaic.tools.candidates import CANDIDATES_FILE, CandidateRound
    from mosaic.tools.html_report import render_html_report
    from mosaic.tools.verify_run import verify_run

    run_dir = Path(candidates_run.run_dir)
    rd = run_dir / "round_1"
    record = read_record(rd / CANDIDATES_FILE, CandidateRound)
    # Two different actions (the heuristic's second one explores), both trained and evaluated.
    assert [c.status for c in record.candidates] == ["done", "done"]
    assert record.candidates[0].result.action != record.candidates[1].result.action
    assert "candidate 2 of 2: exploring with more" in record.candidates[1].result.action.rationale
    for j in (0, 1):
        assert (rd / "candidates" / str(j) / "adapter" / "adapter_model.safetensors").is_file()
    # One kept: the larger hypervolume, placed in the round folder and archived.
    kept = record.kept_outcome
    assert kept is not None and sum(c.kept for c in record.candidates) == 1
    assert kept.decision.hypervolume_after == max(c.decision.hypervolume_after
                                                 for c in record.candidates)
    assert os.path.samefile(rd / "eval" / "eval_report.json",
                            rd / "candidates" / str(kept.index) / "eval" / "eval_report.json")
    summary = read_record(rd / "round.json", RoundResult)
    assert summary.action == kept.result.action and summary.scores == kept.result.scores
    outcome = _outcome(run_dir)
    assert [p[0] for p in outcome["archive"]] == [0, 1]
    assert outcome["archive"][1][1] == kept.result.scores

    # The audit log: both proposals and verdicts, one entry per candidate, the kept one executed.
    log = read_log(run_dir)
    cands = [e for e in log if e["event"] == "candidate"]
    assert [(e["data"]["index"], e["data"]["kept"]) for e in cands] == [
        (0, kept.index == 0), (1, kept.index == 1)]
    assert [e["id"] for e in log if e["event"] == "proposal"] == ["r1/proposal/0-0",
                                                                   "r1/proposal/0-1"]
    executed = next(e for e in log if e["event"] == "executed")
    assert executed["data"]["candidate"] == kept.index
    assert executed["data"]["action_hash"] == next(e["data"]["action_hash"] for e in cands
                                                   if e["data"]["kept"])
    from mosaic.audit import read_entries
    from mosaic.audit_events import CandidateRan

    for e in read_entries(run_dir):  # every entry fits its typed record, nothing undeclared
        assert not e.payload().model_extra
    assert all(isinstance(e.payload(), CandidateRan) for e in read_entries(run_dir)
               if e.event == "candidate")
    verified = verify_run(run_dir)  # what `mosaic audit --verify` checks
    assert verified.ok, verified.problem
    assert any("candidate 1 (done) matches candidates.json" in c for c in verified.checked)

    # The reports show the round's candidates.
    report = build_audit_report(run_dir)
    shown = report.rounds[1].candidates
    assert [(c.index, c.status, c.kept) for c in shown] == [
        (0, "done", kept.index == 0), (1, "done", kept.index == 1)]
    assert [p.candidate for p in report.rounds[1].proposals] == [0, 1]
    html = render_html_report(report)
    assert "Candidates (kept: the largest archive hypervolume)" in html
    from rich.console import Console

    from mosaic.display import audit_round

    console = Console(width=200, record=True)
    for part in audit_round(report.rounds[1]):  # `mosaic audit RUN_DIR` in the terminal
        console.print(part)
    text = console.export_text()
    assert "candidates (the kept one: the largest hypervolume)" in text
    assert "proposal 0 candidate 2 by planner" in text
    hashes = [e["data"]["action_hash"][:12] for e in cands]
    assert all(h in text for h in hashes)


@pytest.mark.slow
def test_verify_catches_a_candidate_record_that_disagrees_with_the_log(candidates_run, tmp_path):
    import shutil

    from mosaic.tools.candidates import CANDIDATES_FILE
    from mosaic.tools.verify_run import verify_run

    run_dir = tmp_path / "run"
    shutil.copytree(candidates_run.run_dir, run_dir)
    record_file = run_dir / "round_1" / CANDIDATES_FILE
    record = json.loads(record_file.read_text())
    record["candidates"][0]["kept"] = not record["candidates"][0]["kept"]
    record_file.write_text(json.dumps(record))
    verified = verify_run(run_dir)
    assert not verified.ok
    assert "candidates.json: candidate 0 differs from audit.jsonl" in verified.problem


@pytest.mark.slow
def test_a_resume_with_another_number_of_candidates_and_chat_with_several_are_refused(
        candidates_run):
    from mosaic.agents.runner import LoopDriver, run_loop
    from mosaic.run_store import RunConfigError

    with pytest.raises(RunConfigError, match=r"loop.candidates: 2 -> 3"):
        run_loop(candidates_run.model_copy(update={"loop": candidates_run.loop.model_copy(
            update={"candidates": 3})}))
    with pytest.raises(RunConfigError, match="mosaic chat pauses"):
        with LoopDriver(candidates_run, review=True, mode="chat"):
            pass


@pytest.mark.slow
def test_refused_and_duplicate_candidates_are_recorded_without_being_built(tiny_run_config,
                                                                          tmp_path):
    from mosaic.schemas import ActionVerdict, Problem
    from mosaic.tools.candidates import Candidate, run_candidates

    bad = {**SAFETY_HEAVY, "mixture": {"safety": 0.9, "nonsense": 0.1}}
    refused = ActionVerdict(status="invalid", problems=[Problem(
        code="above_ceiling", path="$.mixture.safety", message="a person's ceiling")])
    got = run_candidates(tiny_run_config, [
        Candidate(action=json.dumps(SAFETY_HEAVY), refused=refused),
        Candidate(action=json.dumps(bad)),
        Candidate(action=json.dumps({**bad, "rationale": "the same, said otherwise"}))],
        tmp_path, round_index=1, heldout=False)
    assert [c.status for c in got.candidates] == ["rejected", "rejected", "duplicate"]
    assert got.kept is None and got.candidates[2].duplicate_of == 1
    assert got.candidates[0].result.verdict == refused
    assert [p.code for p in got.candidates[2].result.verdict.problems] == ["duplicate_candidate"]
    # only the one the caller had not refused and that repeats nothing was checked here
    assert sorted(p.name for p in (tmp_path / "candidates").iterdir()) == ["1"]
    assert not list(tmp_path.rglob("adapter"))


@pytest.mark.slow
def test_the_llm_planners_second_candidate_hears_of_the_first_and_a_refused_one_is_not_built(
        openai_server, tiny_run_config, tmp_path):
    from openai_server import Text

    from mosaic.agents.planners.llm import LLMPlanner
    from mosaic.agents.runner import run_loop
    from mosaic.config import EndpointConfig
    from mosaic.io import read_record
    from mosaic.tools.candidates import CANDIDATES_FILE, CandidateRound
    from mosaic.tools.verify_run import verify_run

    config = _candidates_config(tiny_run_config, tmp_path)
    over_one = {**SAFETY_HEAVY, "mixture": {"safety": 0.9, "boundary": 0.3, "instruction": 0.2}}
    openai_server.push(Text(json.dumps(over_one)), Text(json.dumps(SAFETY_HEAVY)))
    planner = LLMPlanner(EndpointConfig(base_url=openai_server.base_url, model="planner-model",
                                        timeout_s=5, max_retries=0), backoff_s=0.01)
    out = run_loop(config, planner=planner)
    assert out.state["finished"]

    asked = [r for r in openai_server.requests if (r.body or {}).get("tools")]
    assert len(asked) == 2  # one request per candidate
    first, second = (r.messages[1]["content"] for r in asked)
    assert "You are proposing candidate 1 of 2" in first and "already proposed" not in first
    assert "You are proposing candidate 2 of 2" in second
    assert f"candidate 1 (check: invalid): {json.dumps(over_one)}" in second
    assert "[weights_not_summing]" in second

    run_dir = Path(config.run_dir)
    record = read_record(run_dir / "round_1" / CANDIDATES_FILE, CandidateRound)
    assert [c.status for c in record.candidates] == ["rejected", "done"] and record.kept == 1
    assert not (run_dir / "round_1" / "candidates" / "0").exists()  # refused: never built
    assert out.state["history"][1]["action"]["mixture"] == SAFETY_HEAVY["mixture"]
    verified = verify_run(run_dir)
    assert verified.ok, verified.problem


# ---- a SIGKILL inside the candidate stage ------------------------------------------------------

# Planning candidate 0, checking it, between the two candidates' training, after both with the
# kept one placed but not logged, after the node, inside the archive node.
CRASH_POINTS = ("r1/plan/after", "r1/check/after", "r1/candidates/0", "r1/candidates/during",
                "r1/candidates/after", "r1/archive/during")


def _mosaic(args: list[str], *, crash_at: str | None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOSAIC")}
    env["PYTHONUNBUFFERED"] = "1"
    if crash_at:
        env["MOSAIC_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "mosaic", *args], env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_a_sigkill_inside_the_candidate_stage_resumes_to_the_uninterrupted_result(
        candidates_run, tiny_run_config, tmp_path):
    from mosaic.audit import read_log
    from mosaic.config import dump_config
    from mosaic.tools.verify_run import verify_run

    config = _candidates_config(tiny_run_config, tmp_path)
    run_dir = Path(config.run_dir)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(config))
    first_adapter = run_dir / "round_1" / "candidates" / "0" / "adapter" / "adapter_model.safetensors"
    trained_once = None
    for i, point in enumerate(CRASH_POINTS):
        args = ["run", str(cfg_file)] if i == 0 else ["run", "--resume", str(run_dir)]
        proc = _mosaic(args, crash_at=point)
        assert proc.returncode == -signal.SIGKILL, (
            f"run did not reach {point} (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        if point == "r1/candidates/0":
            trained_once = first_adapter.stat().st_ino  # candidate 0 finished, 1 not started
            assert not (run_dir / "round_1" / "candidates" / "1" / "adapter").exists()
    final = _mosaic(["run", "--resume", str(run_dir)], crash_at=None)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]

    # The candidate that had finished was never trained again (nor restored from a cache).
    assert first_adapter.stat().st_ino == trained_once
    assert _outcome(run_dir) == _outcome(Path(candidates_run.run_dir))
    verified = verify_run(run_dir)
    assert verified.ok, verified.problem
    log = read_log(run_dir)
    ids = [e["id"] for e in log if e["id"]]
    assert len(ids) == len(set(ids)), "an event was logged twice"
    assert sum(e["event"] == "run_resumed" for e in log) == len(CRASH_POINTS)


# ---- as Ray tasks ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_candidates_of_a_run_on_ray_give_the_local_outcome(candidates_run, tiny_run_config,
                                                                ray_cluster, tmp_path):
    from mosaic.agents.runner import run_loop
    from mosaic.audit import read_log
    from mosaic.tools.verify_run import verify_run

    said: list[str] = []
    config = _candidates_config(tiny_run_config, tmp_path, engine="ray")
    out = run_loop(config, say=said.append)
    assert out.state["finished"]
    assert "round 1: 2 candidates as Ray tasks" in said
    run_dir = Path(config.run_dir)
    assert _outcome(run_dir) == _outcome(Path(candidates_run.run_dir))
    assert verify_run(run_dir).ok
    assert sum(e["event"] == "candidate" for e in read_log(run_dir)) == 2
