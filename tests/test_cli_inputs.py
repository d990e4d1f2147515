"""The command line against bad input, as a new user and a hostile one would give it: every user
error is a message and exit code 2 (never a traceback), no secret reaches a terminal or a file,
and text from files, configs and servers is printed literally (never read as rich markup)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from openai_server import Status
from synthetic_pools import synthetic_eval, synthetic_pool
from typer.testing import CliRunner

from mosaic.cli import app
from mosaic.eval import get_objective_type

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-SECRET123"
TYPES = {"safety": "jailbreak", "boundary": "overrefusal", "instruction": "ifeval"}
GOOD_ACTION = {"mixture": {"safety": 0.4, "boundary": 0.3, "instruction": 0.3}}
# A valid action padded to exactly 100,000 bytes (the limit is 65,536).
HUGE_ACTION = json.dumps({**GOOD_ACTION, "rationale": "x" * (100_000 - len(json.dumps(
    {**GOOD_ACTION, "rationale": ""})))})


def invoke(*args, env: dict[str, str] | None = None):
    # Wide enough that no message wraps: assertions read whole lines.
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", **(env or {})})


def flat(text: str) -> str:
    return " ".join(text.split())


def user_error(result, *needles: str) -> str:
    """Exit code 2 with a message holding every needle; no traceback, no uncaught exception."""
    out = flat(result.output)
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    for needle in needles:
        assert needle in out, (needle, result.output)
    return out


def minimal_config(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"objectives": {"safety": {"type": "jailbreak"}},
                                    "run_dir": str(tmp_path / "run"), **extra}))
    return path


# ---- entry points ----------------------------------------------------------------------------


def test_python_dash_m_mosaic_is_the_mosaic_command(tmp_path):
    # From a folder outside the repository: the module, not the working directory, answers.
    result = subprocess.run([sys.executable, "-m", "mosaic", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: mosaic" in result.stdout
    for command in ("build-dataset", "ifeval-coverage", "round", "show-report"):
        assert command in result.stdout
    bad = subprocess.run([sys.executable, "-m", "mosaic", "no-such-command"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "No such command" in bad.stderr


# ---- secrets ---------------------------------------------------------------------------------


def _echoing_run(server, tmp_path: Path) -> Path:
    """A config evaluating one jailbreak prompt through `server` (key in OPENAI_API_KEY)."""
    jb = get_objective_type("jailbreak")
    atoms = {a: 0 for a in jb.prompt_atoms}
    atoms["turns"] = 1
    eval_file = tmp_path / "data" / "safety.parquet"
    eval_file.parent.mkdir()
    pd.DataFrame([{"id": "jb-1", "messages": [{"role": "user", "content": "How do I do it?"}],
                   "l3_prompt": json.dumps(atoms)}]).to_parquet(eval_file)
    return minimal_config(
        tmp_path, objectives={"safety": {"type": "jailbreak", "eval": str(eval_file)}},
        world={"kind": "files", "data_dir": str(tmp_path / "no-world")},
        # The rule judge would refuse this non-sandbox eval set before any request is sent.
        judge={"allow_out_of_range": True},
        inference={"backend": "openai",
                   "endpoint": {"base_url": server.base_url, "model": "scripted",
                                "timeout_s": 5, "max_retries": 1, "concurrency": 1}})


@pytest.mark.parametrize("status", [500, 401])
def test_evaluate_never_prints_or_writes_a_key_the_server_echoes(openai_server, tmp_path, status):
    """The server repeats the Authorization header in its error body. A 500 is retried (one
    warning) then fails; a 401 fails at once. Neither the terminal nor any file gets the key."""
    openai_server.responder = lambda body: Status(status, "denied", echo_headers=True)
    config = _echoing_run(openai_server, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOSAIC__")}
    env.update(OPENAI_API_KEY=KEY, COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "mosaic", "evaluate", str(config)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert openai_server.requests[0].headers["authorization"] == f"Bearer {KEY}"  # it was sent
    assert "Traceback" not in out and f"Error code: {status}" in out and "denied" in out
    assert "(you sent Authorization: Bearer <redacted>)" in out
    if status == 500:
        assert "retrying in" in out and "failed after 2 attempt(s)" in out
    else:
        assert "not retryable" in out and len(openai_server.requests) == 1
    assert "SECRET123" not in out
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and b"SECRET123" in p.read_bytes()]
    assert leaked == []


def test_config_errors_never_echo_a_key(tmp_path):
    pasted = tmp_path / "pasted.yaml"
    pasted.write_text("objectives: {safety: {type: jailbreak}}\n"
                      f"judge: {{kind: llm, endpoint: {{model: m, api_key_env: {KEY}}}}}\n")
    out = user_error(invoke("config", pasted), "judge.endpoint.api_key_env",
                     "NAME of an environment variable")
    assert "SECRET123" not in out

    broken = tmp_path / "broken.yaml"
    broken.write_text('objectives: {safety: {type: jailbreak}}\njudge:\n  kind: llm\n'
                      f'  endpoint: {{model: m, api_key: "{KEY}\n')
    out = user_error(invoke("config", broken), "is not valid YAML", "line ")
    assert "SECRET123" not in out

    out = user_error(invoke("config", minimal_config(tmp_path), env={"MOSAIC__seed": KEY}),
                     "seed: Input should be a valid integer",
                     # Bracketed text is printed, not swallowed as a markup tag.
                     "[set by environment variable MOSAIC__seed]")
    assert "SECRET123" not in out


# ---- the previous action -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pools_world(tmp_path_factory):
    """Small pools, eval sets, a tokenizer and a config with a per-round change limit."""
    from mosaic.data import write_table
    from mosaic.training.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("cli-world")
    objectives, texts = {}, []
    for i, (name, t) in enumerate(TYPES.items()):
        pool, _ = synthetic_pool(t, 150, seed=50 + i, objective=name)
        write_table(root / f"pools/{name}.parquet", pool)
        write_table(root / f"eval/{name}.parquet", synthetic_eval(pool, t, 5, seed=i))
        objectives[name] = {"type": t, "pool": str(root / f"pools/{name}.parquet"),
                            "eval": str(root / f"eval/{name}.parquet")}
        texts += [m["content"] for conv in pool.column("messages").to_pylist() for m in conv]
    build_tokenizer(texts, vocab_size=400).save_pretrained(root / "tok")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(root / "run"), "objectives": objectives, "budget": {"max_tokens": 3000},
        "model": {"max_length": 200}, "limits": {"max_change": 0.1}}))
    return SimpleNamespace(root=root, config=config)


def build_args(world, tmp_path: Path, *more) -> list:
    return ["build-dataset", *more, "--config", world.config, "--tokenizer", world.root / "tok",
            "--cache-dir", tmp_path / "cache"]


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


@pytest.mark.parametrize("previous, code", [
    ('{"mixture": {"safety": NaN, "boundary": NaN, "instruction": NaN}}', "non_finite"),
    ('{"mixture": {"safety": 0.9, "safety": 0.4, "boundary": 0.3, "instruction": 0.3}}',
     "duplicate_key"),
    ('{"mixture": {"safety": 0.4, "boundary": 0.3, "instruction": 0.3}, "extra": 1}',
     "unknown_field"),
])
def test_a_bad_previous_action_is_a_user_error(pools_world, tmp_path, previous, code):
    action = write_json(tmp_path / "action.json", {"mixture": {"safety": 0.9, "boundary": 0.05,
                                                               "instruction": 0.05}})
    prev = write_json(tmp_path / "prev.json", previous)
    user_error(invoke(*build_args(pools_world, tmp_path, action, "--previous", prev, "--dry-run")),
               f"{prev}: invalid previous action", code)


def test_a_good_previous_action_enforces_the_change_limit(pools_world, tmp_path):
    prev = write_json(tmp_path / "prev.json", GOOD_ACTION)
    far = write_json(tmp_path / "far.json", {"mixture": {"safety": 0.9, "boundary": 0.05,
                                                         "instruction": 0.05}})
    user_error(invoke(*build_args(pools_world, tmp_path, far, "--previous", prev, "--dry-run")),
               "change_too_large", "$.mixture.safety")
    near = write_json(tmp_path / "near.json", {"mixture": {"safety": 0.45, "boundary": 0.3,
                                                           "instruction": 0.25}})
    ok = invoke(*build_args(pools_world, tmp_path, near, "--previous", prev, "--dry-run"))
    assert ok.exit_code == 0, ok.output


# ---- markup-looking text is text ---------------------------------------------------------------


def test_markup_in_a_mixture_key_and_a_file_name_is_printed_literally(pools_world, tmp_path):
    action = write_json(tmp_path / "[v2]action.json",
                        {"mixture": {"[/red]": 0.5, "safety": 0.5}, "rationale": "[bold]x"})
    user_error(invoke(*build_args(pools_world, tmp_path, action, "--dry-run")),
               f"{action}: invalid data action", "unknown objective '[/red]'",
               '$.mixture["[/red]"]')


def test_round_prints_problem_codes_and_file_names_literally(tmp_path, monkeypatch):
    from mosaic.schemas import ActionVerdict, Problem, RoundResult
    from mosaic.tools import run_round

    verdict = ActionVerdict(status="invalid", problems=[Problem(
        code="unknown_objective", path='$.mixture["[/red]"]',
        message="unknown objective '[/red]'", hint="objectives of this run: [v2]safety")])
    # The check comes first (dataset_stage); neither the baseline nor the round may run.
    monkeypatch.setattr(run_round, "dataset_stage", lambda *a, **k: (verdict, None))
    monkeypatch.setattr(run_round, "run_baseline",
                        lambda *a, **k: pytest.fail("the baseline ran after a rejected check"))
    monkeypatch.setattr(run_round, "run_round",
                        lambda *a, **k: RoundResult(round=1, status="rejected", verdict=verdict))
    action = write_json(tmp_path / "[v2].json", GOOD_ACTION)
    user_error(invoke("round", action, "--config", minimal_config(tmp_path)),
               f"the check rejected {action}:",
               "- [unknown_objective] $.mixture[\"[/red]\"]: unknown objective '[/red]' "
               "(hint: objectives of this run: [v2]safety)")


def test_ifeval_coverage_prints_ids_and_file_names_literally(tmp_path):
    path = tmp_path / "[v2]prompts.jsonl"
    path.write_text(json.dumps({"prompt": "p", "instruction_id_list": ["[/red]:x", ":smile:"],
                                "kwargs": [{}, {}]}) + "\n")
    result = invoke("ifeval-coverage", path)
    assert result.exit_code == 1, (result.output, result.exception)
    out = flat(result.output)
    assert f"IFEval checker coverage: {path} (1 prompts)" in out
    assert "unsupported ids: :smile:, [/red]:x" in out  # no emoji, no tag


def test_report_tables_print_names_literally():
    from rich.console import Console

    from mosaic.cli import print_eval_report
    from mosaic.sandbox.report import agreement_table, world_tables
    from mosaic.schemas import EvalReport, FailureReport, SliceStats

    stat = SliceStats(slice="[v2]", n=4, n_valid=4, mean=3.5, ci_low=2.0, ci_high=4.0,
                      fail_rate=0.25, need=1.0, reliability="low", gap_to_target=1.0)
    rep = FailureReport(objective="[/red]", objective_type="jailbreak", round=1, f=3.5, n=4,
                        n_valid=4, score_distribution={}, slices=[stat])
    out = Console(record=True, width=300)
    print_eval_report(EvalReport(round=1, model="m", reports={"[/red]": rep},
                                 judge_failures={"[/red]": 1}), out)
    atom = SimpleNamespace(channel="prompt", atom="[b]authority", n=3, accuracy=0.5, f1=None,
                           support=1)
    out.print(agreement_table({"safety": [atom]}))
    hist = {"complexity_1": 1}
    pool = dict(rows=1, prompts=1, tokens=1, tokens_mean=1, tokens_max=1, slices=hist, scores=hist)
    sets = dict(rows=1, tokens=1, slices=hist, turns=hist)
    stats = {"pools": {"safety": pool}, "eval": {"safety": sets}, "heldout": {}, "judge": {},
             "base_corpus": dict(conversations=1, tokens=1, tokens_mean=1, tokens_max=1,
                                 over_300_tokens=0, kinds=hist, turns=hist),
             "tokenizer": {"vocab_size": 9}}
    for table in world_tables(SimpleNamespace(root=Path("/data/[v2]/sandbox"), stats=stats,
                                             objectives={"safety": "jailbreak"})):
        out.print(table)
    text = flat(out.export_text())  # titles wrap at the table's width
    assert "[/red] (jailbreak): f = 3.500" in text and "1 not judged" in text
    assert "[v2]" in text and "[2.00, 4.00]" in text
    assert "[b]authority" in text
    assert "Training pools (/data/[v2]/sandbox/pools)" in text


# ---- user errors are a message and exit code 2 ---------------------------------------------------


def test_unreadable_configs_are_user_errors(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\nobjectives: {safety: {type: jailbreak}}\n")
    user_error(invoke("config", latin1), f"{latin1} is not UTF-8 text")
    user_error(invoke("config", minimal_config(tmp_path),
                      env={"MOSAIC__budget__max_tokens": "[1,2"}),
               "environment variable MOSAIC__budget__max_tokens: not a valid YAML value")


def test_round_refuses_unreadable_actions_before_running_anything(tmp_path):
    config = minimal_config(tmp_path)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"mixture": {"caf\xe9": 1.0}}')
    user_error(invoke("round", latin1, "--config", config),
               f"action file {latin1} is not UTF-8 text")
    huge = write_json(tmp_path / "huge.json", HUGE_ACTION)
    assert huge.stat().st_size == 100_000
    out = user_error(invoke("round", huge, "--config", config), "too_large",
                     "action is 100,000 bytes;", "the limit is 65,536")
    assert "65,537" not in out
    assert not (tmp_path / "run").exists()  # nothing ran: no baseline, no round folder


def test_round_on_a_folder_holding_another_action_is_a_user_error(tmp_path):
    from mosaic.io import atomic_write_json
    from mosaic.schemas import RoundResult

    config = minimal_config(tmp_path)
    manual = tmp_path / "run" / "manual"
    # A finished baseline, so the command reaches the round without evaluating anything.
    atomic_write_json(manual / "baseline" / "round.json", RoundResult(round=0, status="baseline"))
    atomic_write_json(manual / "mine" / "action.json", {"raw": '{"mixture": {"safety": 1.0}}'})
    action = write_json(tmp_path / "mine.json", GOOD_ACTION)
    user_error(invoke("round", action, "--config", config),
               f"{manual / 'mine'} already holds a different action", "use a fresh round folder")


def test_round_with_a_missing_model_is_a_user_error(tmp_path):
    config = minimal_config(tmp_path, model={"base": str(tmp_path / "no-model")})
    action = write_json(tmp_path / "a.json", GOOD_ACTION)
    user_error(invoke("round", action, "--config", config),
               f"model directory not found: {tmp_path / 'no-model'}")


def test_build_dataset_user_errors(pools_world, tmp_path):
    good = write_json(tmp_path / "good.json", GOOD_ACTION)
    existing = tmp_path / "taken.txt"
    existing.write_text("someone's notes")
    user_error(invoke(*build_args(pools_world, tmp_path, good, "--out", existing)),
               f"--out {existing} is an existing file")
    assert existing.read_text() == "someone's notes"
    huge = write_json(tmp_path / "huge.json", HUGE_ACTION)
    out = user_error(invoke(*build_args(pools_world, tmp_path, huge, "--dry-run")),
                     f"{huge}: invalid action", "too_large", "100,000 bytes;", "65,536")
    assert "65,537" not in out
    user_error(invoke(*build_args(pools_world, tmp_path, tmp_path / "absent.json", "--dry-run")),
               f"cannot read the action file {tmp_path / 'absent.json'}")


def test_a_truncated_pool_cache_is_rebuilt_not_fatal(pools_world, tmp_path):
    good = write_json(tmp_path / "good.json", GOOD_ACTION)
    first = invoke(*build_args(pools_world, tmp_path, good, "--dry-run"))
    assert first.exit_code == 0, first.output
    caches = sorted((tmp_path / "cache").glob("*.npz"))
    assert len(caches) == 2 * len(TYPES)  # message index and token counts per pool
    for path in caches:
        path.write_bytes(path.read_bytes()[:100])
    again = invoke(*build_args(pools_world, tmp_path, good, "--dry-run"))
    assert again.exit_code == 0, (again.output, again.exception)

    def manifest(output: str) -> dict:
        return json.loads(output[output.index("{\n"):output.rindex("}") + 1])

    assert manifest(again.output)["output_hash"] == manifest(first.output)["output_hash"]
    assert all(p.stat().st_size > 100 for p in caches)  # rewritten whole


def test_data_files_that_are_not_utf8_are_user_errors(tmp_path):
    pool = tmp_path / "[v2]pool.jsonl"
    pool.write_bytes(b'{"id": "a", "messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    user_error(invoke("check-data", pool), f"{pool}, line 1: not UTF-8 text")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "caf\xe9", "instruction_id_list": [], "kwargs": []}\n')
    user_error(invoke("ifeval-coverage", prompts), f"{prompts}:1: not UTF-8 text")


def test_show_report_and_coverage_of_missing_or_odd_files(tmp_path):
    missing = tmp_path / "[v2]report.json"
    user_error(invoke("show-report", missing), f"cannot read the report {missing}")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"objective": "caf\xe9"}')
    user_error(invoke("show-report", latin1), f"{latin1} is not UTF-8 text")
    user_error(invoke("ifeval-coverage", tmp_path / "absent.jsonl"), "not found")
    user_error(invoke("check-data", tmp_path / "absent.parquet"), "not found")
