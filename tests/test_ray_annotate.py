"""Annotation on the Ray engine, on a local cluster (127.0.0.1): the same rows, atoms and counts
as the local path on the sandbox's pools, and a worker SIGKILLed mid-batch is replaced and its
batch rerun without losing or doubling a row or re-asking the judge about what it had cached."""

from __future__ import annotations

import os
import time

import pandas as pd
import pytest
from judge_script import JudgeScript
from test_annotate import pool_frame

from mosaic.config import MosaicConfig
from mosaic.data import L1_COLUMNS, DataFormatError, load_pool, write_table
from mosaic.eval import build_judge
from mosaic.eval.annotate import AtomCache, WorkersLost, annotate_file, annotate_pool
from mosaic.eval.base import get_objective_type
from mosaic.eval.rule_judge import RuleJudge

pytestmark = pytest.mark.slow


def _on_ray(cfg: MosaicConfig, workers: int = 2) -> MosaicConfig:
    runtime = cfg.runtime.model_copy(update={
        "engine": "ray", "ray": cfg.runtime.ray.model_copy(update={"workers": workers})})
    return cfg.model_copy(update={"runtime": runtime})


def _llm_judge_on_ray(server, tmp_path, judge_extra=None, **endpoint) -> MosaicConfig:
    """A jailbreak objective judged by the test server's LLM judge, on Ray. No key variable:
    the workers of the session's cluster do not see this test's env. A long timeout: no retry
    may add a request on a loaded machine (they are counted)."""
    return _on_ray(MosaicConfig.model_validate({
        "objectives": {"safety": {"type": "jailbreak"}},
        "judge": {"kind": "llm", "endpoint": {
            "base_url": server.base_url, "model": "judge-model",
            "api_key_env": "MOSAIC_TEST_UNSET_KEY", "timeout_s": 60, **endpoint},
            **(judge_extra or {})},
        "world": {"kind": "files"}, "run_dir": str(tmp_path / "run")}))


def _unannotated(df: pd.DataFrame, type_name: str) -> pd.DataFrame:
    """The pool as a team would import it: no L1, L2 or response atoms, and no prompt atoms
    where a judge labels them (instruction-following prompt atoms come with the data)."""
    otype = get_objective_type(type_name)
    drop = ["l3_response", *L1_COLUMNS, *(f"l2_{f}" for f in otype.l2_columns)]
    if not otype.prompt_atoms_from_data:
        drop.append("l3_prompt")
    return df.drop(columns=[c for c in drop if c in df.columns])


def test_annotation_on_ray_matches_the_local_path_on_the_sandbox_pools(tiny_run_config,
                                                                      ray_cluster, tmp_path):
    on_ray = _on_ray(tiny_run_config)
    for name, obj in tiny_run_config.objectives.items():
        df = _unannotated(load_pool(obj.pool, obj.type, name), obj.type)
        local_cache = AtomCache(tmp_path / f"{name}-local.sqlite")
        ray_cache = AtomCache(tmp_path / f"{name}-ray.sqlite")
        # Batches of 64: each pool's 300 rows go to both workers in several batches.
        local = annotate_pool(df, obj.type, RuleJudge(), batch_size=64, cache=local_cache)
        seen: list[tuple[int, int]] = []
        ray = annotate_pool(df, obj.type, RuleJudge(), batch_size=64, cache=ray_cache,
                            ray_config=on_ray, progress=lambda d, t: seen.append((d, t)))
        assert local.rows_todo == ray.rows_todo == len(df) == 300
        # The same rows in the same order with the same atoms, L2 and L1; the same failures.
        pd.testing.assert_frame_equal(local.frame, ray.frame)
        assert local.frame["score"].notna().sum() > 250, name
        assert [f.as_dict() for f in local.failures] == [f.as_dict() for f in ray.failures]
        # The same cache entries (below). How the lookups split into judged and cached is timing
        # when two workers run batches that share prompts side by side (measured: local 97
        # judged + 5 cached, Ray 98 + 3), so only this holds: Ray never judges fewer than the
        # one-batch-at-a-time local path.
        for channel in ("prompt", "response"):
            assert ray.counts.get(f"judged_{channel}", 0) >= local.counts.get(f"judged_{channel}", 0)
        assert sum(ray.counts.values()) > 0
        assert local_cache.keys() == ray_cache.keys()
        assert seen[-1] == (300, 300) and len(seen) == 5  # progress per batch as it came back
        # Each worker's own time in the stage came back with its batches.
        assert local.worker_seconds == {} and 1 <= len(ray.worker_seconds) <= 2
        assert all(t > 0 for t in ray.worker_seconds.values())
        local_cache.close()
        ray_cache.close()


def test_a_killed_annotation_worker_loses_and_doubles_no_row(openai_server, ray_cluster, tmp_path,
                                                             monkeypatch):
    import ray_stages

    n, batch = 64, 16  # 32 prompts (two replies each), 4 batches over 2 workers
    openai_server.responder = JudgeScript()
    pool = tmp_path / "safety.parquet"
    write_table(pool, pool_frame(n))
    cfg = _llm_judge_on_ray(openai_server, tmp_path, concurrency=4,
                            judge_extra={"cache_dir": str(tmp_path / "judge-cache")})
    # The test-only hook: the stage whose first response call stalls until killed.
    monkeypatch.setattr("mosaic.eval.annotate.AnnotateStage", ray_stages.stall_first_responses)
    cache = AtomCache(tmp_path / "atoms" / "annotate.sqlite")
    victim = cache.path.parent / "victim.pid"
    judge = build_judge(cfg, request_cache=False, record_endpoint_errors=True)
    with ray_stages.killing_the_stalled_worker(victim) as killed:
        summary = annotate_file(pool, "jailbreak", judge, objective="safety", cache=cache,
                                batch_size=batch, ray_config=cfg)
    assert len(killed) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # that worker is gone; another ran its batch

    # Every row once, in order, annotated.
    out = load_pool(pool, "jailbreak")
    assert out["id"].tolist() == [f"r{i}" for i in range(n)]
    assert (summary.annotated, summary.failed) == (n, 0) and out["score"].notna().all()
    # One request per distinct conversation: the killed batch's prompt atoms were committed
    # before it stalled, so its rerun asked only for its replies, and nothing was asked twice.
    requests = openai_server.requests
    assert len(requests) == n // 2 + n
    # Its rerun found the 8 prompts in the cache (for its 16 rows); the killed worker's own
    # tally (8 prompt requests) never came back, so the workers' stats count the rest.
    assert summary.counts == {"judged_prompt": n // 2 - batch // 2, "cached_prompt": batch,
                              "judged_response": n}
    assert summary.judge_stats["requests"] == n // 2 + n - batch // 2
    assert summary.judge_stats["failures"] == {} and summary.judge_stats["tokens_in"] > 0
    cache.close()

    # The local path labels the same atoms (the server's answers follow the content).
    local_pool = tmp_path / "local.parquet"
    write_table(local_pool, pool_frame(n))
    annotate_file(local_pool, "jailbreak", build_judge(
        cfg, request_cache=False, record_endpoint_errors=True), objective="safety")
    local = load_pool(local_pool, "jailbreak")
    cols = ["l3_prompt", "l3_response", *L1_COLUMNS]
    pd.testing.assert_frame_equal(local[cols], out[cols])


def test_bad_atoms_on_a_worker_are_the_data_error_naming_the_row(ray_cluster, tmp_path):
    df = pool_frame(40)
    df["l3_prompt"] = [None] * 40
    df.loc[33, "l3_prompt"] = "{not json"
    cfg = _on_ray(MosaicConfig.model_validate({
        "objectives": {"safety": {"type": "jailbreak"}}, "world": {"kind": "files"},
        "run_dir": str(tmp_path / "run")}))
    df.attrs["source"] = "pool.parquet"
    with pytest.raises(DataFormatError) as err:
        annotate_pool(df, "jailbreak", RuleJudge(), batch_size=16, ray_config=cfg)
    assert (err.value.path, err.value.row, err.value.field) == ("pool.parquet", 33, "l3_prompt")
    assert "not valid JSON" in str(err.value)


def test_an_endpoint_down_on_ray_stops_the_run(openai_server, ray_cluster, tmp_path):
    from mosaic.eval.annotate import EndpointDown

    openai_server.responder = JudgeScript()
    df = pool_frame(24, dict.fromkeys(range(24), "always500"))
    cfg = _llm_judge_on_ray(openai_server, tmp_path, max_retries=0)
    judge = build_judge(cfg, request_cache=False, record_endpoint_errors=True)
    with pytest.raises(EndpointDown, match="endpoint looks down"):
        annotate_pool(df, "jailbreak", judge, batch_size=8, ray_config=cfg)


def test_a_run_that_dies_on_ray_resumes_without_rejudging_a_cached_row(openai_server, ray_cluster,
                                                                      tmp_path, monkeypatch):
    """No restarts: the SIGKILLed worker ends the run, as a killed `mosaic annotate` would; the
    rerun asks the judge only about conversations whose atoms no worker had committed."""
    import ray_stages
    from judge_script import asked_conversations, cached_conversations

    from mosaic.eval.annotate import judge_identity

    n, batch = 64, 16
    openai_server.responder = JudgeScript()
    pool = tmp_path / "safety.parquet"
    write_table(pool, pool_frame(n))
    before = pool.read_bytes()
    cfg = _llm_judge_on_ray(openai_server, tmp_path, concurrency=4)
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={
        "ray": cfg.runtime.ray.model_copy(update={"max_retries": 0})})})
    cache = AtomCache(tmp_path / "atoms" / "annotate.sqlite")
    victim = cache.path.parent / "victim.pid"
    with monkeypatch.context() as patch:
        patch.setattr("mosaic.eval.annotate.AnnotateStage", ray_stages.stall_first_responses)
        judge = build_judge(cfg, request_cache=False, record_endpoint_errors=True)
        with ray_stages.killing_the_stalled_worker(victim), \
                pytest.raises(WorkersLost, match="rerun to resume") as died:
            annotate_file(pool, "jailbreak", judge, objective="safety", cache=cache,
                          batch_size=batch, ray_config=cfg)
    # Ray's own error for a worker that died with no restart left, said plainly.
    assert isinstance(died.value.__cause__, ray_cluster.exceptions.RayError)
    assert pool.read_bytes() == before  # nothing half-written
    # The failed pipeline's other worker may still be finishing (and committing) its batch, as a
    # killed run's would not. Ray shuts it down gracefully, usually within seconds; on a busy
    # machine it has outlived 2 minutes. Wait a while for it, then judge what the rerun asked
    # against the cache as read below: a late commit by that worker is in neither the snapshot
    # nor the rerun's requests, so completeness counts the first run's requests too.
    deadline = time.monotonic() + 60
    while (ray_cluster.available_resources().get("CPU", 0) < ray_cluster.cluster_resources()["CPU"]
           and time.monotonic() < deadline):
        time.sleep(0.1)
    cached = cache.keys()
    first_requests = len(openai_server.requests)
    assert 0 < len(cached) < n // 2 + n

    summary = annotate_file(pool, "jailbreak", judge, objective="safety", cache=cache,
                            batch_size=batch, ray_config=cfg)
    assert (summary.annotated, summary.failed) == (n, 0)
    done_pool = load_pool(pool, "jailbreak")
    prompt_cached, reply_cached = cached_conversations(done_pool, cached, judge_identity(judge))
    asked_prompts, asked_replies = asked_conversations(openai_server.requests[first_requests:])
    first_prompts, first_replies = asked_conversations(openai_server.requests[:first_requests])
    # The killed batch's prompts were committed before it stalled: they are not asked again.
    assert len(prompt_cached) >= batch // 2
    # 0 cached conversations re-judged ...
    assert asked_prompts & prompt_cached == set() and asked_replies & reply_cached == set()
    # ... and every other one judged after the snapshot (or, by the straggler, before it).
    assert set(range(n // 2)) - prompt_cached <= asked_prompts | first_prompts
    assert set(range(n)) - reply_cached <= asked_replies | first_replies
    cache.close()
