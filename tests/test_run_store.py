"""Run folders keep their settings, and run records carry a schema version that is enforced."""

from __future__ import annotations

import json

import pytest

from mosaic.config import load_config
from mosaic.io import RecordError, atomic_write_json, read_record
from mosaic.run_store import CONFIG_FILE, RunConfigError, open_run, saved_config
from mosaic.schemas import (SCHEMA_VERSION, ActionVerdict, DatasetManifest, EvalReport,
                            RoundResult, TrainResult)


def _config(tmp_path, **over):
    overrides = {"run_dir": str(tmp_path / "run"), **over}
    return load_config("configs/sandbox.yaml", environ={}, overrides=overrides)


def test_the_resolved_settings_are_saved_when_a_run_starts(tmp_path):
    cfg = _config(tmp_path)
    assert open_run(cfg) == []
    assert saved_config(tmp_path / "run") == cfg
    assert open_run(cfg) == []  # the same settings resume silently


def test_a_resume_with_other_settings_is_refused_naming_the_fields(tmp_path):
    open_run(_config(tmp_path))
    other = _config(tmp_path, budget={"max_tokens": 1000}, training={"learning_rate": 1e-3})
    with pytest.raises(RunConfigError) as err:
        open_run(other)
    message = str(err.value)
    assert "budget.max_tokens: 300000 -> 1000" in message
    assert "training.learning_rate: 0.0005 -> 0.001" in message
    assert saved_config(tmp_path / "run").budget.max_tokens == 300000  # nothing was overwritten


def test_fields_documented_as_safe_may_change_on_resume(tmp_path):
    open_run(_config(tmp_path))
    more = _config(tmp_path, loop={"rounds": 8}, inference={"batch_size": 8})
    changes = open_run(more)
    assert changes == ["inference.batch_size: 64 -> 8", "loop.rounds: 5 -> 8"]
    assert saved_config(tmp_path / "run").loop.rounds == 8


def test_the_saved_settings_hold_no_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET123")
    cfg = _config(tmp_path, judge={"kind": "llm", "endpoint": {"base_url": "http://127.0.0.1:9",
                                                                "model": "judge"}})
    open_run(cfg)
    text = (tmp_path / "run" / CONFIG_FILE).read_text()
    assert "api_key_env: OPENAI_API_KEY" in text and "SECRET123" not in text


@pytest.mark.parametrize("model", [RoundResult, DatasetManifest, TrainResult, EvalReport,
                                   ActionVerdict])
def test_a_record_of_another_schema_version_fails_naming_file_and_versions(tmp_path, model):
    path = tmp_path / "record.json"
    atomic_write_json(path, {"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(RecordError) as err:
        read_record(path, model)
    message = str(err.value)
    assert str(path) in message and model.__name__ in message
    assert f"schema_version {SCHEMA_VERSION + 1}" in message
    assert f"reads schema_version {SCHEMA_VERSION}" in message
    path.write_text(json.dumps({"round": 0, "status": "baseline"}))  # written before versions
    with pytest.raises(RecordError, match=r"schema_version \(none\)"):
        read_record(path, model)


def test_a_current_record_reads_back(tmp_path):
    path = tmp_path / "round.json"
    atomic_write_json(path, RoundResult(round=0, status="baseline", scores={"safety": 2.5}))
    assert read_record(path, RoundResult).scores == {"safety": 2.5}
    with pytest.raises(RecordError, match="file not found"):
        read_record(tmp_path / "missing.json", RoundResult)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(RecordError, match="not a readable RoundResult"):
        read_record(tmp_path / "bad.json", RoundResult)


# ---- one process per run folder ------------------------------------------------------------------

_HOLD = """
import sys, time
from mosaic.run_store import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_loop_on_a_busy_run_folder_is_refused_and_a_killed_holder_frees_it(tmp_path):
    """Two loops writing the same rounds, checkpoint and audit log would mix their results; a
    crashed one (SIGKILL) must not block `--resume`."""
    import subprocess
    import sys

    from mosaic.agents.runner import run_loop
    from mosaic.run_store import RunBusyError, run_lock

    cfg = _config(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, cfg.run_dir], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusyError, match=rf"in use by another MOSAIC process \(pid {holder.pid}\)"):
            run_loop(cfg)
        assert not (tmp_path / "run" / CONFIG_FILE).exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    with run_lock(cfg.run_dir):  # the killed holder's lock went with it
        with pytest.raises(RunBusyError):  # and this process's own hold is exclusive too
            with run_lock(cfg.run_dir):
                pass
    with run_lock(cfg.run_dir):  # released on exit
        pass


def test_mosaic_run_on_a_busy_folder_exits_2_naming_the_holder(tmp_path):
    import os

    from typer.testing import CliRunner

    from mosaic.cli import app
    from mosaic.run_store import run_lock

    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"objectives: {{safety: {{type: jailbreak}}}}\nrun_dir: {run_dir}\n"
                      f"world: {{kind: files, data_dir: {tmp_path / 'none'}}}\n"
                      f"inference: {{backend: openai, endpoint: {{base_url: 'http://127.0.0.1:9/v1', "
                      f"model: m}}}}\nmodel: {{base: {tmp_path / 'model'}}}\n")
    with run_lock(run_dir):
        result = CliRunner().invoke(app, ["run", str(config)], env={"COLUMNS": "400"})
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"in use by another MOSAIC process (pid {os.getpid()})" in " ".join(
        result.output.split())
