"""The Ray engine on a local cluster (127.0.0.1): eval generation through Ray Data gives the same
greedy replies, atoms and reports as the local path, and a killed worker's batch is rerun
without losing or doubling a row."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from mosaic.tools.evaluate import evaluate, load_eval_rows, replay_rows

pytestmark = pytest.mark.slow


def _on_ray(cfg, **ray):
    runtime = cfg.runtime.model_copy(update={
        "engine": "ray", "ray": cfg.runtime.ray.model_copy(update={"workers": 2, **ray})})
    return cfg.model_copy(update={"runtime": runtime})


def test_eval_generation_on_ray_matches_the_local_path(tiny_run_config, ray_cluster, tmp_path):
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    local = evaluate(tiny_run_config, None, None, local_dir, "eval")
    # Batches of 8 rows: each objective's 20 conversations go to both workers.
    on_ray = evaluate(_on_ray(tiny_run_config, batch_rows=8), None, None, ray_dir, "eval")

    for name in tiny_run_config.objectives:
        a = pq.read_table(local_dir / "eval" / name / "responses.parquet").to_pylist()
        b = pq.read_table(ray_dir / "eval" / name / "responses.parquet").to_pylist()
        assert len(a) == 20 and a == b  # same rows, order and greedy replies
        sa = pq.read_table(local_dir / "eval" / name / "samples.parquet").to_pylist()
        sb = pq.read_table(ray_dir / "eval" / name / "samples.parquet").to_pylist()
        assert sa == sb  # same L3 atoms, L2 and L1
    assert on_ray.scores() == local.scores()
    # Multi-turn rows were replayed turn by turn on the workers too.
    assert any(len(r["messages"]) > 2 for r in pq.read_table(
        ray_dir / "eval" / "safety" / "responses.parquet").to_pylist())


def test_a_killed_worker_is_restarted_and_its_batch_rerun(tiny_run_config, ray_cluster, tmp_path):
    from mosaic.engine import map_rows
    from mosaic.tools.evaluate import ReplayStage

    cfg = _on_ray(tiny_run_config, batch_rows=5)
    rows = load_eval_rows(cfg.objectives["safety"].eval, "safety", "jailbreak")
    model = cfg.model.base
    expected = replay_rows(ReplayStage(cfg.model_dump(mode="json"), model, None).backend, rows,
                           max_new_tokens=cfg.inference.max_new_tokens, temperature=0.0)

    victim = tmp_path / "victim.pid"
    from ray_stages import StallFirstBatch, killing_the_stalled_worker

    with killing_the_stalled_worker(victim) as killed:
        got = map_rows(StallFirstBatch, [{"id": r["id"], "system": r["system"],
                                          "turns": list(r["turns"])} for r in rows],
                       kwargs={"claim_dir": str(tmp_path), "config": cfg.model_dump(mode="json"),
                               "model_dir": model, "adapter_dir": None, "threads": 1},
                       runtime=cfg.runtime, batch_rows=5, what="kill test")
    assert len(killed) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # that worker is gone; another ran its batch
    assert got == expected  # every row once, in order, with the same replies
