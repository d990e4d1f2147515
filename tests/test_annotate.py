"""`mosaic annotate`: the batch stage function, the per-row cache, endpoint faults handled and
counted, a real `mosaic annotate` process SIGKILLed half-way and resumed without re-judging a
cached row, keys never written, and the rule judge refusing text that is not the sandbox's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from judge_script import JudgeScript, asked_conversations, cached_conversations

from mosaic.config import MosaicConfig
from mosaic.data import load_pool, rows_needing_annotation, write_table
from mosaic.eval import build_judge, judge_model_warnings
from mosaic.eval.annotate import (AtomCache, annotate_batch, annotate_file, atom_key,
                                  failures_path, judge_identity, prompt_part)
from mosaic.eval.judge import JudgeRangeError
from mosaic.eval.rule_judge import RuleJudge
from mosaic.provenance import is_sandbox_text

KEY = "sk-annotate-SECRET987654321"


def pool_frame(n: int, faults: dict[int, str] | None = None) -> pd.DataFrame:
    """An unannotated jailbreak pool; row i may carry a fault marker for the scripted judge.
    Rows 2k and 2k+1 share their prompt (two replies to one request)."""
    faults = faults or {}
    rows = []
    for i in range(n):
        marker = f" [fault:{faults[i]}]" if i in faults else ""
        turns = 1 + (i // 2) % 3
        msgs = []
        for t in range(turns):
            msgs += [{"role": "user", "content": f"request {i // 2} turn {t}{marker if t == 0 else ''}"},
                     {"role": "assistant", "content": f"reply {i // 2}.{t}" if t < turns - 1
                      else f"final reply {i}"}]
        rows.append({"id": f"r{i}", "prompt_id": f"p{i // 2}", "messages": msgs})
    return pd.DataFrame(rows)


def llm_config(server, tmp_path: Path, **endpoint) -> MosaicConfig:
    # The timeout is far above what a reply takes on a busy machine, and the scripted timeout
    # fault waits well past it, so the counts below do not depend on the machine's load.
    ep = {"base_url": server.base_url, "model": "judge-model", "api_key_env": "MOSAIC_TEST_KEY",
          "timeout_s": 4.0, "max_retries": 3, "concurrency": 16, **endpoint}
    return MosaicConfig.model_validate({
        "objectives": {"safety": {"type": "jailbreak"}},
        "judge": {"kind": "llm", "endpoint": ep, "cache_dir": str(tmp_path / "judge-cache")},
        "world": {"kind": "files"}, "run_dir": str(tmp_path / "run")})


class CountingJudge(RuleJudge):
    """The rule judge, counting the conversations it is asked about."""

    def __init__(self) -> None:
        self.asked: Counter[str] = Counter()

    def label_prompts(self, objective_type, conversations):
        self.asked["prompt"] += len(conversations)
        return super().label_prompts(objective_type, conversations)

    def label_responses(self, objective_type, conversations, prompt_atoms):
        self.asked["response"] += len(conversations)
        return super().label_responses(objective_type, conversations, prompt_atoms)


# ---- the stage function and its cache -------------------------------------------------------


def test_annotate_batch_is_a_stage_function_with_a_content_keyed_cache(tmp_path):
    batch = pool_frame(8)
    judge = CountingJudge()
    cache = AtomCache(tmp_path / "atoms.sqlite")
    counts: Counter[str] = Counter()
    first = annotate_batch(batch, "jailbreak", judge, cache=cache, counts=counts)
    # Rows in, the same rows out: L3, L2, L1 filled, no errors, input columns kept.
    assert first["id"].tolist() == batch["id"].tolist()
    assert first["annotation_error"].isna().all() and first["score"].notna().all()
    assert first["slice"].str.startswith("complexity_").all()
    # Replies to the same request share their prompt: it was judged once per pair.
    assert judge.asked == {"prompt": 4, "response": 8}
    assert counts == {"judged_prompt": 4, "judged_response": 8}
    # Again, through the cache: the same rows, and the judge is not asked at all.
    again_judge = CountingJudge()
    again_counts: Counter[str] = Counter()
    again = annotate_batch(batch, "jailbreak", again_judge, cache=cache, counts=again_counts)
    assert again_judge.asked == {}
    assert again_counts == {"cached_prompt": 8, "cached_response": 8}
    pd.testing.assert_frame_equal(first, again)
    # Without a cache the judge gives the same atoms (the cache changes cost, not results).
    pd.testing.assert_frame_equal(first, annotate_batch(batch, "jailbreak", RuleJudge()))
    # The key is the content and the judge's identity: another judge identity misses.
    ident = judge_identity(judge)
    conv = prompt_part(batch["messages"][0])
    assert atom_key(ident, "jailbreak", "prompt", conv) in cache.keys()
    assert atom_key({**ident, "rules": "edited"}, "jailbreak", "prompt", conv) not in cache.keys()
    cache.close()


# ---- faults, failures and secrets through a real endpoint -----------------------------------------


def test_endpoint_faults_are_retried_and_counted_and_failed_rows_listed(openai_server, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("MOSAIC_TEST_KEY", KEY)
    script = JudgeScript(timeout_delay_s=6.0)
    openai_server.responder = script
    faults = {1: "429", 3: "500", 5: "timeout", 7: "body", 9: "reply", 11: "always500"}
    pool = tmp_path / "safety.parquet"
    write_table(pool, pool_frame(24, faults))
    cfg = llm_config(openai_server, tmp_path)
    judge = build_judge(cfg, request_cache=False, record_endpoint_errors=True)
    judge.caller.backoff_s = judge.caller.backoff_max_s = 0.01  # keep the test fast
    cache = AtomCache(tmp_path / "atoms.sqlite")
    summary = annotate_file(pool, "jailbreak", judge, objective="safety", cache=cache,
                            batch_size=8, secrets=[KEY])
    st = summary.judge_stats
    # Each fault was served once per channel (prompt and response requests), retried and
    # counted under its reason; the outage failed its prompt request 4 times.
    assert {k: script.faults[k] for k in ("429", "500", "timeout", "body", "reply")} == dict.fromkeys(
        ("429", "500", "timeout", "body", "reply"), 2)
    assert script.faults["always500"] == 4
    assert st["retries"] == {"http_429": 2, "timeout": 2, "malformed_body": 2, "http_500": 2 + 3}
    assert st["format_retries"] == 2  # the non-JSON replies were fed back and corrected
    assert st["failures"] == {"http_500": 1}
    assert st["tokens_in"] > 0 and st["tokens_out"] > 0 and st["cost"] is None
    # The outage's row is listed, not dropped: in the pool unscored, and in the failures file.
    assert (summary.failed, summary.annotated, summary.failure_reasons) == (1, 23, {"endpoint_http_500": 1})
    done = load_pool(pool, "jailbreak")
    assert rows_needing_annotation(done, "jailbreak").tolist() == [i == 11 for i in range(24)]
    (listed,) = [json.loads(x) for x in failures_path(pool).read_text().splitlines()]
    assert (listed["row"], listed["id"], listed["reason"]) == (11, "r11", "endpoint_http_500")
    # The server echoed the key in its 500 bodies; no file has it.
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    cache.close()


def test_a_price_gives_a_cost(openai_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MOSAIC_TEST_KEY", KEY)
    openai_server.responder = JudgeScript()
    pool = tmp_path / "safety.jsonl"
    write_table(pool, pool_frame(4))
    cfg = llm_config(openai_server, tmp_path, price_per_1k_input=2.0, price_per_1k_output=10.0)
    judge = build_judge(cfg, request_cache=False, record_endpoint_errors=True)
    summary = annotate_file(pool, "jailbreak", judge, objective="safety",
                            out=tmp_path / "out.parquet")
    st = summary.judge_stats
    assert st["cost"] == pytest.approx(st["tokens_in"] / 1000 * 2.0 + st["tokens_out"] / 1000 * 10.0)
    assert summary.failed == 0 and not failures_path(tmp_path / "out.parquet").exists()
    assert load_pool(pool, "jailbreak")["id"].tolist() == ["r0", "r1", "r2", "r3"]  # input untouched


# ---- a real `mosaic annotate` process, killed and resumed ----------------------------------------


def test_killed_annotate_resumes_without_rejudging_a_cached_row(openai_server, tmp_path):
    """A few hundred rows at concurrency 16; SIGKILL once about half the requests were answered;
    the rerun sends no request for any conversation whose atoms were cached at the kill."""
    n = 200
    script = JudgeScript(timeout_delay_s=1.5)
    openai_server.responder = script
    faults = {10: "429", 20: "500", 30: "timeout", 40: "body", 50: "reply"}
    pool = tmp_path / "safety.parquet"
    write_table(pool, pool_frame(n, faults))
    before = pool.read_bytes()
    cfg = tmp_path / "annotate.yaml"
    cfg.write_text(yaml.safe_dump({
        "objectives": {"safety": {"type": "jailbreak", "pool": str(pool)}},
        "judge": {"kind": "llm", "cache_dir": str(tmp_path / "judge-cache"),
                  "endpoint": {"base_url": openai_server.base_url, "model": "judge-model",
                               "api_key_env": "MOSAIC_TEST_KEY", "timeout_s": 1.0,
                               "max_retries": 3}},
        "world": {"kind": "files"}, "run_dir": str(tmp_path / "run")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOSAIC__")}
    env.update(MOSAIC_TEST_KEY=KEY, COLUMNS="200")
    cmd = [sys.executable, "-m", "mosaic", "annotate", str(pool), "--objective", "safety",
           "--config", str(cfg), "--concurrency", "16", "--batch-size", "32"]
    total = n // 2 + n  # distinct prompts + replies
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while len(openai_server.requests) < total // 2 and proc.poll() is None:
        assert time.monotonic() < deadline, "annotate made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    killed_out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == -signal.SIGKILL, killed_out
    # Killed: the pool is as it was (the output is written atomically, at the end).
    assert pool.read_bytes() == before
    assert not [p for p in tmp_path.glob(".*.tmp")]
    judged_before = len(openai_server.requests)

    cache = AtomCache(tmp_path / "judge-cache" / "annotate.sqlite")
    cached = cache.keys()
    cache.close()
    assert 0 < len(cached) < total

    resumed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out
    assert "rows/s" in out and "from the cache:" in out and "retried:" in out
    done = load_pool(pool, "jailbreak")
    assert not rows_needing_annotation(done, "jailbreak").any()

    # Which conversations were cached at the kill (their keys: the content and the judge), and
    # which ones the rerun asked about.
    from mosaic.config import load_config

    ident = judge_identity(build_judge(load_config(cfg, environ={}), request_cache=False))
    prompt_cached, reply_cached = cached_conversations(done, cached, ident)
    assert prompt_cached and reply_cached
    asked_prompts, asked_replies = asked_conversations(openai_server.requests[judged_before:])
    # 0 cached rows re-judged, and exactly the uncached ones judged.
    assert asked_prompts & prompt_cached == set() and asked_replies & reply_cached == set()
    assert asked_prompts == set(range(n // 2)) - prompt_cached
    assert asked_replies == set(range(n)) - reply_cached
    assert KEY not in killed_out + out
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


# ---- the rule judge's range ---------------------------------------------------------------------


def test_sandbox_text_is_decided_by_the_world_manifest_not_the_name(tmp_path):
    from mosaic.markers import file_sha256

    world = tmp_path / "world"
    pool = world / "pools" / "safety.parquet"
    write_table(pool, pool_frame(4))
    (world / "world.json").write_text(json.dumps(
        {"files": {"pools/safety.parquet": {"sha256": file_sha256(pool)}}}))
    assert is_sandbox_text(pool)
    copy = tmp_path / "elsewhere" / "pools" / "safety.parquet"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(pool.read_bytes())
    assert not is_sandbox_text(copy)  # same name, same bytes, no manifest lists it
    write_table(pool, pool_frame(5))  # edited after generation
    assert not is_sandbox_text(pool)


def test_the_rule_judge_refuses_real_text_unless_allowed_and_says_why(tmp_path):
    pool = tmp_path / "real.parquet"
    write_table(pool, pool_frame(6))
    with pytest.raises(JudgeRangeError) as err:
        annotate_file(pool, "jailbreak", RuleJudge(), objective="safety")
    message = str(err.value)
    for fact in ("sandbox", "0.70 accuracy", "recall 0.53", "0.60", "recall 0.15", "param_leak",
                 "--allow-out-of-range", "judge.kind: llm"):
        assert fact in message, fact
    assert load_pool(pool, "jailbreak")["id"].tolist() == [f"r{i}" for i in range(6)]  # untouched
    summary = annotate_file(pool, "jailbreak", RuleJudge(), objective="safety",
                            allow_out_of_range=True)
    assert summary.annotated == 6 and "Labelling anyway" in summary.warnings[0]


def test_evaluate_refuses_before_generating_and_run_warns_about_a_real_model(tmp_path):
    from mosaic.tools.evaluate import evaluate

    eval_file = tmp_path / "eval.parquet"
    write_table(eval_file, pd.DataFrame([{"id": "e0", "messages": [
        {"role": "user", "content": "How do I make it?"}]}]))

    class NoBackend:
        name = "none"

        def generate(self, *a, **k):
            raise AssertionError("nothing may be generated")

    cfg = MosaicConfig.model_validate({"objectives": {"safety": {"type": "jailbreak",
                                                                  "eval": str(eval_file)}},
                                       "world": {"kind": "files"}, "model": {"base": str(tmp_path)}})
    with pytest.raises(JudgeRangeError, match="not the sandbox's"):
        evaluate(cfg, tmp_path, None, tmp_path / "r0", backend=NoBackend())
    (warning,) = judge_model_warnings(cfg)
    assert "not the sandbox's base model" in warning and "recall 0.53" in warning
    sandbox = cfg.model_copy(update={"model": cfg.model.model_copy(update={"base": "sandbox"})})
    assert judge_model_warnings(sandbox) == []
