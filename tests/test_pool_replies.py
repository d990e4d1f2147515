"""Candidate replies for a prompt pool from the run's own model (tools/pool_replies.py, `mosaic
generate-replies`): greedy first, sampled after, multi-turn replayed, reproducible, loadable as
an unscored pool, bad input named by file, row and field."""

from __future__ import annotations

import json

import pytest

from mosaic.config import MosaicConfig
from mosaic.data import DataFormatError, load_pool, needs_annotation, read_rows, write_table
from mosaic.tools.pool_replies import ReplyPoolError, generate_pool_replies


@pytest.fixture
def prompts_file(tmp_path):
    rows = [
        {"id": "p1", "messages": [{"role": "user", "content": "hello there"}],
         "metadata": json.dumps({"source": "unit"})},
        # The dataset's assistant turn is dropped: the model answers each user turn itself.
        {"id": "p2", "messages": [{"role": "user", "content": "how are you"},
                                  {"role": "assistant", "content": "DATASET REPLY"},
                                  {"role": "user", "content": "tell me more"}]},
        {"id": "p3", "messages": [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "a question"}]},
        # Answered in the file: that reply is kept as one more candidate.
        {"id": "p4", "messages": [{"role": "user", "content": "say hi"},
                                  {"role": "assistant", "content": "Hi! (written reply)"}]},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def config(tiny_trained_model_dir, tmp_path):
    return MosaicConfig.model_validate({
        "objectives": {"safety": {"type": "jailbreak"}},
        "model": {"base": str(tiny_trained_model_dir), "max_length": 256},
        "inference": {"batch_size": 8, "max_new_tokens": 8}, "seed": 3})


def test_replies_are_greedy_then_sampled_replayed_and_reproducible(config, prompts_file,
                                                                   tmp_path):
    from mosaic.tools.evaluate import build_backend, replay_rows
    from mosaic.tools.pool_replies import read_prompt_rows

    out = tmp_path / "pool.parquet"
    result = generate_pool_replies(config, prompts_file, out, objective="safety",
                                   candidates=3, temperature=1.5)
    rows = read_rows(out)
    assert result.rows == len(rows)
    assert result.prompts == 4 and result.source_replies == 1
    src = next(r for r in rows if r["id"] == "p4-src0")
    assert src["messages"][-1] == {"role": "assistant", "content": "Hi! (written reply)"}
    assert json.loads(src["metadata"])["reply_by"] == "source"
    assert result.rows + result.duplicates_dropped + result.empty_dropped == 4 * 3 + 1
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    assert set(by_prompt) == {"p1", "p2", "p3", "p4"}
    for pid, group in by_prompt.items():
        replies = [json.dumps([m["content"] for m in r["messages"] if m["role"] == "assistant"])
                   for r in group]
        assert len(set(replies)) == len(replies), f"{pid}: duplicate candidates kept"
    p2 = next(r for r in by_prompt["p2"] if r["id"] == "p2-c0")["messages"]
    assert [m["role"] for m in p2] == ["user", "assistant", "user", "assistant"]
    assert "DATASET REPLY" not in json.dumps(p2)
    assert by_prompt["p3"][0]["messages"][0] == {"role": "system", "content": "be brief"}
    meta = json.loads(next(r for r in by_prompt["p1"] if r["id"] == "p1-c0")["metadata"])
    assert meta["source"] == "unit" and meta["candidate"] == 0 and meta["temperature"] == 0.0

    # Candidate 0 is the model's greedy replay.
    backend = build_backend(config, config.model.base, None)
    greedy = replay_rows(backend, read_prompt_rows(prompts_file), max_new_tokens=8,
                         temperature=0.0)
    assert {r["prompt_id"]: r["messages"] for r in rows if r["id"].endswith("-c0")} == \
        {pid: conv for pid, conv in zip(["p1", "p2", "p3", "p4"], greedy)}

    # The same settings write the same pool; it loads as an unscored pool to annotate.
    again = tmp_path / "again.parquet"
    generate_pool_replies(config, prompts_file, again, objective="safety", candidates=3,
                          temperature=1.5)
    assert read_rows(again) == rows
    pool = load_pool(out, "jailbreak", "safety")
    assert needs_annotation(pool, "jailbreak")


def test_prompts_of_several_files_merge_by_conversation_keeping_written_replies(
        config, prompts_file, tmp_path):
    answered = tmp_path / "answered.jsonl"
    answered.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "x1", "prompt_id": "q1", "messages": [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "Hello! (written)"}]},
        {"id": "x2", "prompt_id": "q5", "messages": [
            {"role": "user", "content": "new prompt"},
            {"role": "assistant", "content": "A written answer."}]}]))
    out = tmp_path / "pool.jsonl"
    result = generate_pool_replies(config, [prompts_file, answered], out, objective="safety",
                                   candidates=1)
    rows = read_rows(out)
    assert result.prompts == 5 and result.source_replies == 3
    # "hello there" is one prompt (p1, first seen): the model's reply and the written one.
    p1 = {r["id"]: r["messages"][-1]["content"] for r in rows if r["prompt_id"] == "p1"}
    assert set(p1) == {"p1-c0", "p1-src0"} and p1["p1-src0"] == "Hello! (written)"
    assert {r["id"] for r in rows if r["prompt_id"] == "q5"} == {"q5-c0", "q5-src0"}


def test_bad_prompts_and_settings_are_clear_errors(config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    write_table(bad, __import__("pandas").DataFrame(
        {"id": ["a", "b"], "messages": [[{"role": "user", "content": "fine"}],
                                        [{"role": "assistant", "content": "no user turn"}]]}))
    with pytest.raises(DataFormatError, match=r"bad.jsonl, row 1, field 'messages'"):
        generate_pool_replies(config, bad, tmp_path / "o.parquet", objective="safety")
    with pytest.raises(ReplyPoolError, match="unknown objective 'nope'"):
        generate_pool_replies(config, bad, tmp_path / "o.parquet", objective="nope")
    with pytest.raises(ReplyPoolError, match="temperature > 0"):
        generate_pool_replies(config, bad, tmp_path / "o.parquet", objective="safety",
                              candidates=2, temperature=0.0)
    assert not (tmp_path / "o.parquet").exists()


def test_the_command_writes_the_pool_and_bad_input_exits_2(config, prompts_file, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from mosaic.cli import app

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = tmp_path / "pool.parquet"
    ok = CliRunner().invoke(app, ["generate-replies", str(prompts_file), "--objective", "safety",
                                  "--out", str(out), "--config", str(cfg), "--candidates", "1"],
                            env={"COLUMNS": "300"})
    assert ok.exit_code == 0, ok.output
    assert "wrote 5 replies to 4 prompts" in ok.output and out.is_file()
    bad = CliRunner().invoke(app, ["generate-replies", str(tmp_path / "missing.jsonl"),
                                   "--objective", "safety", "--out", str(tmp_path / "x.parquet"),
                                   "--config", str(cfg)], env={"COLUMNS": "300"})
    assert bad.exit_code == 2 and "missing.jsonl" in bad.output
    assert not (tmp_path / "x.parquet").exists()
