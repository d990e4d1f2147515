"""A real tiny round end to end: check -> build -> LoRA train -> evaluate, and its resume rules."""

from __future__ import annotations

import json

import pytest

from mosaic.tools.run_round import ROUND_FILE, run_baseline, run_round

pytestmark = pytest.mark.slow


ACTION = {"mixture": {"safety": 0.5, "boundary": 0.3, "instruction": 0.2},
          "quality_threshold": 4.0, "method": "sft", "rationale": "test"}


def test_a_round_builds_trains_and_evaluates_then_resumes_without_redoing(tiny_run_config, tmp_path):
    cfg = tiny_run_config
    round_dir = tmp_path / "round_1"
    result = run_round(cfg, json.dumps(ACTION), round_dir, round_index=1, heldout=False)

    assert result.status == "done"
    assert result.manifest.total_tokens <= cfg.budget.max_tokens
    assert result.train.train_rows == result.manifest.total_rows
    assert set(result.scores) == {"safety", "boundary", "instruction"}
    assert all(1 <= f <= 5 for f in result.scores.values())
    for rel in ("action.json", "verdict.json", "dataset/train.parquet", "dataset/manifest.json",
                "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                "eval/eval_report.json", ROUND_FILE):
        assert (round_dir / rel).is_file(), rel

    # A crash after training: drop the round marker and the eval outputs; the rerun must
    # evaluate again but neither rebuild the dataset nor retrain the adapter.
    adapter_file = round_dir / "adapter" / "adapter_model.safetensors"
    dataset_file = round_dir / "dataset" / "train.parquet"
    stamps = (adapter_file.stat().st_mtime_ns, dataset_file.stat().st_mtime_ns)
    (round_dir / ROUND_FILE).unlink()
    again = run_round(cfg, json.dumps(ACTION), round_dir, round_index=1, heldout=False)
    assert (adapter_file.stat().st_mtime_ns, dataset_file.stat().st_mtime_ns) == stamps
    assert again.scores == result.scores

    with pytest.raises(ValueError, match="different action"):
        run_round(cfg, json.dumps({**ACTION, "rationale": "other"}), round_dir, round_index=1)


def test_a_rejected_action_builds_and_trains_nothing(tiny_run_config, tmp_path):
    round_dir = tmp_path / "round_bad"
    bad = {**ACTION, "mixture": {"safety": 0.9, "boundary": 0.3, "nonsense": 0.1}}
    result = run_round(tiny_run_config, json.dumps(bad), round_dir, round_index=1)
    assert result.status == "rejected"
    codes = {p.code for p in result.verdict.problems}
    assert "unknown_objective" in codes
    assert not (round_dir / "dataset").exists() and not (round_dir / "adapter").exists()
    assert json.loads((round_dir / "verdict.json").read_text())["status"] == "invalid"


def test_baseline_is_round_zero_of_the_base_model(tiny_run_config, tmp_path):
    result = run_baseline(tiny_run_config, tmp_path / "round_0", heldout=True)
    assert result.status == "baseline"
    assert set(result.heldout_scores) == {"safety", "boundary", "instruction"}
    assert (tmp_path / "round_0" / "heldout" / "eval_report.json").is_file()


def test_mosaic_run_prints_world_statistics_rounds_and_the_pareto_front(tiny_run_config, tmp_path):
    from typer.testing import CliRunner

    from mosaic.cli import app
    from mosaic.config import dump_config

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(tiny_run_config.model_copy(update={
        "run_dir": str(tmp_path / "run"),
        "loop": tiny_run_config.loop.model_copy(update={"rounds": 1})})))
    result = CliRunner().invoke(app, ["run", str(cfg_file)], terminal_width=160)
    assert result.exit_code == 0, result.output
    assert "sandbox world reused" in result.output
    assert "starting a new run" in result.output
    assert "scores per round" in result.output and "Pareto front" in result.output
    assert "wall time per stage" in result.output
    for name in ("safety", "boundary", "instruction"):
        assert name in result.output
    assert (tmp_path / "run" / "round_0" / "round.json").is_file()
    assert (tmp_path / "run" / "round_1" / "round.json").is_file()

    again = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "run")], terminal_width=160)
    assert again.exit_code == 0, again.output
    flat = " ".join(again.output.split())  # messages wrap at the terminal width
    assert "is finished; its results" in flat and "Pareto front" in flat


# ---- markers keyed by inputs ------------------------------------------------------------------


def _stamps(round_dir):
    return {rel: (round_dir / rel).stat().st_mtime_ns
            for rel in ("dataset/train.parquet", "adapter/adapter_model.safetensors",
                        "eval/safety/responses.parquet")}


def test_a_changed_budget_seed_or_training_setting_recomputes_what_it_determines(tiny_run_config,
                                                                                 tmp_path):
    cfg = tiny_run_config
    round_dir = tmp_path / "round_1"
    said: list[str] = []
    first = run_round(cfg, json.dumps(ACTION), round_dir, round_index=1, heldout=False,
                      progress=said.append)
    before = _stamps(round_dir)

    said.clear()
    again = run_round(cfg, json.dumps(ACTION), round_dir, round_index=1, heldout=False,
                      progress=said.append)
    assert _stamps(round_dir) == before and again.scores == first.scores
    assert not any("rebuilding" in m or "retraining" in m or "generating" in m for m in said)

    # A smaller budget: a new dataset, so a new adapter and new responses; the message says why.
    said.clear()
    smaller = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"max_tokens": 3000})})
    result = run_round(smaller, json.dumps(ACTION), round_dir, round_index=1, heldout=False,
                       progress=said.append)
    now = _stamps(round_dir)
    assert all(now[k] != before[k] for k in before)
    assert result.manifest.budget == 3000 and result.manifest.total_tokens <= 3000
    assert any("rebuilding the dataset (budget: 4000 -> 3000)" in m for m in said), said

    # Another seed draws other rows.
    said.clear()
    run_round(smaller, json.dumps(ACTION), round_dir, round_index=1, seed=99, heldout=False,
              progress=said.append)
    assert any("rebuilding the dataset (seed: 1 -> 99)" in m for m in said), said

    # A training setting: the dataset is kept, the adapter is retrained.
    said.clear()
    stamps = _stamps(round_dir)
    faster = smaller.model_copy(update={"training": smaller.training.model_copy(
        update={"learning_rate": 1e-2})})
    run_round(faster, json.dumps(ACTION), round_dir, round_index=1, seed=99, heldout=False,
              progress=said.append)
    now = _stamps(round_dir)
    assert now["dataset/train.parquet"] == stamps["dataset/train.parquet"]
    assert now["adapter/adapter_model.safetensors"] != stamps["adapter/adapter_model.safetensors"]
    assert any("retraining: training.learning_rate: 0.005 -> 0.01" in m for m in said), said


def test_an_altered_output_is_recomputed_not_trusted(tiny_run_config, tmp_path):
    round_dir = tmp_path / "round_1"
    run_round(tiny_run_config, json.dumps(ACTION), round_dir, round_index=1, heldout=False)
    manifest = round_dir / "dataset" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"seed": 1', '"seed": 7'))
    said: list[str] = []
    result = run_round(tiny_run_config, json.dumps(ACTION), round_dir, round_index=1,
                       heldout=False, progress=said.append)
    assert result.manifest.seed == 1
    assert any("dataset/manifest.json was modified" in m for m in said), said


def test_check_first_a_bad_action_is_rejected_before_any_model_is_built(tiny_run_config, tmp_path):
    """`mosaic round` checks before the baseline: with the sandbox base model not built yet, a
    rejected action is reported without building it (the check needs only the tokenizer)."""
    from typer.testing import CliRunner

    from mosaic.cli import app
    from mosaic.config import dump_config

    cfg = tiny_run_config.model_copy(update={
        "run_dir": str(tmp_path / "run"),
        "model": tiny_run_config.model.model_copy(update={
            "base": "sandbox", "cache_dir": str(tmp_path / "models")})})
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(cfg))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**ACTION, "mixture": {"safety": 0.9, "nonsense": 0.1}}))
    result = CliRunner().invoke(app, ["round", str(bad), "--config", str(cfg_file)],
                                terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "[unknown_objective] $.mixture.nonsense" in result.output
    assert not (tmp_path / "run" / "manual" / "baseline").exists()
    assert not (tmp_path / "models").exists()


def test_the_stage_cache_reuses_an_adapter_trained_on_the_same_content(tiny_run_config, tmp_path):
    cfg = tiny_run_config.model_copy(update={"cache": tiny_run_config.cache.model_copy(
        update={"stages_dir": str(tmp_path / "cache")})})
    first = run_round(cfg, json.dumps(ACTION), tmp_path / "a" / "round_1", round_index=1,
                      heldout=False)
    said: list[str] = []
    again = run_round(cfg, json.dumps(ACTION), tmp_path / "b" / "round_1", round_index=1,
                      heldout=False, progress=said.append)
    assert any("reusing an adapter trained before" in m for m in said), said
    assert not any("training a LoRA adapter" in m for m in said)
    assert any("responses reused from the stage cache" in m for m in said)
    assert not any("generating" in m for m in said)
    weights = "adapter/adapter_model.safetensors"
    assert ((tmp_path / "a" / "round_1" / weights).read_bytes()
            == (tmp_path / "b" / "round_1" / weights).read_bytes())
    assert again.train == first.train and again.scores == first.scores
    # another seed is other content: trained, not reused
    said.clear()
    run_round(cfg, json.dumps(ACTION), tmp_path / "c" / "round_1", round_index=1, seed=5,
              heldout=False, progress=said.append)
    assert any("training a LoRA adapter" in m for m in said)
