"""`mosaic doctor`: the paper's layout on a machine with no data, model, GPU or servers lists
every missing piece with its fix and exits 2; with tiny local files, a tiny local model and the
scripted server it passes and prints the per-round estimate."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from judge_script import JudgeScript
from openai_server import Text
from synthetic_pools import synthetic_eval, synthetic_pool
from typer.testing import CliRunner

from mosaic.cli import app
from mosaic.data import write_table
from mosaic.schemas import DoctorReport


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250", **(env or {})})


def test_the_paper_layout_here_lists_every_missing_piece_with_its_fix():
    import torch

    result = invoke("doctor", "configs/paper.yaml", "--json")
    assert result.exit_code == 2, result.output
    report = DoctorReport.model_validate_json(result.output)
    problems = {c.name: c for c in report.problems}
    for obj, splits in (("xguard", ("pool", "eval", "heldout")),
                        ("orbench", ("pool", "eval", "heldout")), ("ifeval", ("pool", "eval"))):
        for split in splits:
            chk = problems[f"objectives.{obj}.{split}"]
            assert "no such file" in chk.detail and f"mosaic import FILE --kind " in chk.fix
    assert "models/Llama-3.1-8B-Instruct" in problems["model.base"].detail
    assert "hf download" in problems["model.base"].fix
    assert "did not answer a real judge request (connection)" in problems["judge.endpoint"].detail
    assert "vllm serve" in problems["judge.endpoint"].fix
    assert "planner.endpoint" in problems
    if not torch.cuda.is_available():
        backend = [c for c in report.problems if c.name == "inference.backend"]
        assert any("needs a CUDA GPU" in c.detail for c in backend)
    assert all(c.fix for c in report.problems)  # every problem says how to fix it
    # The terminal form lists them too, numbered, each with its fix.
    text = invoke("doctor", "configs/paper.yaml")
    assert text.exit_code == 2
    assert f"{len(report.problems)} problem(s) to fix before `mosaic run configs/paper.yaml`" in text.output
    assert len(re.findall(r"^\s+fix: ", text.output, flags=re.MULTILINE)) == len(report.problems)


@pytest.fixture
def paper_like(tmp_path, tiny_model_dir, openai_server):
    """The paper's three objectives on tiny synthetic files, the tiny local model, and the
    scripted server as the judge and the planner."""
    openai_server.responder = JudgeScript()
    paths = {}
    for name, type_name in (("xguard", "jailbreak"), ("orbench", "overrefusal"), ("ifeval", "ifeval")):
        pool, _ = synthetic_pool(type_name, 30, objective=name, seed=1)
        write_table(tmp_path / f"{name}-pool.parquet", pool)
        ev = synthetic_eval(pool, type_name, 5)
        if name == "orbench":  # no prompt atoms: the judge must give them
            ev = ev.drop(["l3_prompt"])
        write_table(tmp_path / f"{name}-eval.parquet", ev)
        paths[name] = {"type": type_name, "pool": str(tmp_path / f"{name}-pool.parquet"),
                       "eval": str(tmp_path / f"{name}-eval.parquet")}
    paths["xguard"]["heldout"] = paths["xguard"]["eval"]
    endpoint = {"base_url": openai_server.base_url, "api_key_env": "MOSAIC_TEST_KEY",
                "timeout_s": 5, "max_retries": 0, "concurrency": 4}
    cfg = tmp_path / "paper-tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "objectives": paths, "world": {"kind": "files"}, "budget": {"max_tokens": 1_000_000},
        "model": {"base": str(tiny_model_dir)},
        "inference": {"backend": "transformers", "max_new_tokens": 64},
        "judge": {"kind": "llm", "cache_dir": str(tmp_path / "judge"),
                  "endpoint": {**endpoint, "model": "judge", "price_per_1k_input": 0.5,
                               "price_per_1k_output": 1.5}},
        "planner": {"kind": "llm", "endpoint": {**endpoint, "model": "planner"}}}))
    return cfg


def test_with_the_files_a_local_endpoint_and_a_tiny_model_it_passes_and_estimates(paper_like,
                                                                                  openai_server):
    result = invoke("doctor", paper_like)
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "all checks pass: `mosaic run" in out
    report = DoctorReport.model_validate_json(invoke("doctor", paper_like, "--json").output)
    assert report.problems == []
    checks = {c.name: c for c in report.checks}
    assert "all 30 rows annotated" in checks["objectives.xguard.pool"].detail
    assert "llama" in checks["model.base (config)"].detail
    assert "chat template present" in checks["model.base (tokenizer)"].detail
    assert "answered a real judge request with JSON" in checks["judge.endpoint"].detail
    assert checks["planner.endpoint"].status == "ok"
    # The judge probe was a real judge request: the system prompt names the atoms.
    judge_requests = [r for r in openai_server.requests if r.body.get("model") == "judge"]
    assert judge_requests and '"explicit_refusal"' in judge_requests[0].messages[0]["content"]
    est = {e.what: e for e in report.estimate}
    # 10 xguard eval + 10 held-out + 10 orbench replies judged, 10 orbench prompts without atoms;
    # ifeval is checked by code.
    assert est["judge requests"].value == "40"
    assert est["eval conversations"].value.startswith("40 (")
    assert est["training tokens"].value.startswith("1,000,000")
    assert est["judge tokens in / out"].value.startswith("~")
    assert est["judge cost"].value.startswith("~") and "price_per_1k" in est["judge cost"].how
    assert "concurrency 4" in est["judge time"].how
    assert "not estimated" in est["generation and training time"].value


def test_the_judge_probe_sends_the_judges_schema_constraint(paper_like, openai_server):
    # A small local model (SmolLM2-135M behind llama-cpp-python) unconstrained writes until its
    # context ends, and the probe timed out where the judge itself, constrained, answers.
    cfg = yaml.safe_load(paper_like.read_text())
    cfg["judge"]["endpoint"]["response_format"] = "json_object_schema"
    paper_like.write_text(yaml.safe_dump(cfg))
    result = invoke("doctor", paper_like)
    assert result.exit_code == 0, result.output
    probe = next(r for r in openai_server.requests if r.body.get("model") == "judge")
    fmt = probe.body["response_format"]
    assert fmt["type"] == "json_object"
    assert "explicit_refusal" in fmt["schema"]["properties"]


def test_missing_annotations_and_a_non_json_judge_are_reported(paper_like, openai_server, tmp_path):
    cfg = yaml.safe_load(paper_like.read_text())
    pool = tmp_path / "xguard-pool.parquet"
    table = pq.read_table(pool)
    write_table(pool, table.drop(["score"]).append_column("score", pa.array(
        [None] * 3 + [4.0] * (table.num_rows - 3), pa.float64())))
    openai_server.responder = lambda body: Text("Sure, here are the labels: none.")
    paper_like.write_text(yaml.safe_dump(cfg))
    report = DoctorReport.model_validate_json(invoke("doctor", paper_like, "--json").output)
    problems = {c.name: c for c in report.problems}
    chk = problems["objectives.xguard.pool"]
    assert chk.area == "annotation" and "3 of 30 rows lack" in chk.detail
    assert f"mosaic annotate {pool} --objective xguard --config {paper_like}" in chk.fix
    judge = next(c for c in report.checks if c.name == "judge.endpoint")
    assert judge.status == "warn" and "not with JSON" in judge.detail


def test_a_backend_that_does_not_import_is_named_with_its_error():
    from mosaic.tools.doctor import _import_problem

    assert _import_problem("no_such_backend_module") == \
        "ModuleNotFoundError: No module named 'no_such_backend_module'"
