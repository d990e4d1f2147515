"""Independent candidate rounds (`mosaic.tools.candidates`): several actions for one round, each
built, trained and evaluated in its own folder, in turn on the local engine and as Ray tasks on
a local cluster (127.0.0.1), with the same outcomes; the archive's best is kept and every
candidate recorded."""

from __future__ import annotations

import json

import pytest

from mosaic.io import read_record
from mosaic.schemas import EvalReport
from mosaic.tools.archive import add_point, load_archive, new_archive, point_from_reports
from mosaic.tools.candidates import (CANDIDATES_FILE, Candidate, CandidateRound, candidate_dir,
                                     run_candidates)

pytestmark = pytest.mark.slow

SAFETY_HEAVY = {"mixture": {"safety": 0.8, "boundary": 0.1, "instruction": 0.1},
                "quality_threshold": 4.0, "method": "sft", "rationale": "safety first"}
BALANCED = {"mixture": {"safety": 0.4, "boundary": 0.3, "instruction": 0.3},
            "quality_threshold": 3.0, "method": "sft", "rationale": "balanced"}
BAD = {**BALANCED, "mixture": {"safety": 0.9, "nonsense": 0.1}}


def _config(cfg, tmp_path, engine: str):
    # One intra-op thread on both engines (float sums then agree bit for bit), and a stage
    # cache per run: the Ray run must train its own adapters, not restore the local run's.
    runtime = cfg.runtime.model_copy(update={
        "engine": engine, "threads": 1,
        "ray": cfg.runtime.ray.model_copy(update={"workers": 2, "cpus_per_worker": 1})})
    return cfg.model_copy(update={
        "runtime": runtime,
        "cache": cfg.cache.model_copy(update={"stages_dir": str(tmp_path / f"stages-{engine}")})})


def test_candidates_run_as_ray_tasks_give_the_local_outcome_and_keep_the_archive_best(
        tiny_run_config, ray_cluster, tmp_path):
    cands = [Candidate(action=json.dumps(a)) for a in (SAFETY_HEAVY, BAD, BALANCED)]
    said: list[str] = []
    local = run_candidates(_config(tiny_run_config, tmp_path, "local"), cands,
                           tmp_path / "local" / "round_1", round_index=1, heldout=False)
    on_ray = run_candidates(_config(tiny_run_config, tmp_path, "ray"), cands,
                            tmp_path / "ray" / "round_1", round_index=1, heldout=False,
                            progress=said.append)
    assert (local.engine, on_ray.engine) == ("local", "ray")
    assert "round 1: 3 candidates as Ray tasks" in said

    # Every candidate recorded, the rejected one with its verdict and nothing built.
    for got in (local, on_ray):
        assert [c.result.status for c in got.candidates] == ["done", "rejected", "done"]
        assert got.candidates[1].decision is None and not got.candidates[1].kept
        assert "unknown_objective" in {p.code for p in got.candidates[1].result.verdict.problems}
        root = tmp_path / got.engine / "round_1"
        assert not (candidate_dir(root, 1) / "adapter").exists()
        for j in (0, 2):
            assert (candidate_dir(root, j) / "adapter" / "adapter_model.safetensors").is_file()
        assert read_record(root / CANDIDATES_FILE, CandidateRound) == got

    # The same builds, training and scores on both engines (wall times aside).
    for a, b in zip(local.candidates, on_ray.candidates):
        assert a.result.manifest == b.result.manifest
        assert a.result.scores == b.result.scores
        assert a.decision == b.decision
        if a.result.train is not None:
            assert (a.result.train.steps, a.result.train.final_loss) == (
                b.result.train.steps, b.result.train.final_loss)
    assert local.kept == on_ray.kept

    # The kept one is the archive's best: the larger hypervolume when added to the archive.
    kept = local.kept_outcome
    assert kept is not None and kept.kept and sum(c.kept for c in local.candidates) == 1
    hv = {c.index: c.decision.hypervolume_after for c in local.candidates if c.decision}
    assert kept.index in hv and hv[kept.index] == max(hv.values())
    # Its decision is what adding it to the archive does (the caller's archive is not changed).
    report = candidate_dir(tmp_path / "local" / "round_1", kept.index) / "eval" / "eval_report.json"
    point = point_from_reports(1, read_record(report, EvalReport))
    assert add_point(new_archive(list(tiny_run_config.objectives)), point)[1].hypervolume_after \
        == kept.decision.hypervolume_after
    assert load_archive(tmp_path / "local") is None


def test_no_candidates_is_an_error(tiny_run_config, tmp_path):
    with pytest.raises(ValueError, match="no candidates"):
        run_candidates(tiny_run_config, [], tmp_path, round_index=1)


def test_mosaic_round_with_several_actions_runs_them_as_candidates(tiny_run_config, tmp_path):
    from typer.testing import CliRunner

    from mosaic.cli import app
    from mosaic.config import dump_config

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(tiny_run_config.model_copy(update={
        "run_dir": str(tmp_path / "run")})))
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(BALANCED))
    bad.write_text(json.dumps(BAD))
    result = CliRunner().invoke(app, ["round", str(bad), str(good), "--config", str(cfg_file),
                                      "--no-heldout"], terminal_width=200)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())  # messages wrap at the console's width
    assert f"candidate 1 ({bad}): the check rejected it" in flat and "nonsense" in flat
    assert f"candidate 2 ({good}): hypervolume" in flat and "<- kept" in flat
    assert "round 1 vs baseline" in flat
    record = read_record(tmp_path / "run" / "manual" / "bad+good" / CANDIDATES_FILE,
                         CandidateRound)
    assert record.kept == 1 and record.candidates[0].result.status == "rejected"
    # Only rejected candidates: exit 2, nothing trained.
    only_bad = CliRunner().invoke(app, ["round", str(bad), str(bad), "--config", str(cfg_file),
                                        "--no-heldout", "--round-dir", str(tmp_path / "r")],
                                  terminal_width=200)
    assert only_bad.exit_code == 2, only_bad.output
    assert "rejected every candidate" in " ".join(only_bad.output.split())
    assert not list((tmp_path / "r").rglob("adapter"))
