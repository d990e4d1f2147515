"""Hostile and unlucky input (issue 16): names that would become paths, NUL bytes, OS errors
from the file system, and input found wrong only after a run folder was made. Every case is a
message with exit code 2, never a traceback, and a failed start leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mosaic.cli import app
from mosaic.config import ConfigError, load_config


def invoke(*args, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", **(env or {})})


def user_error(result, *needles: str) -> str:
    out = " ".join(result.output.split())
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    for needle in needles:
        assert needle in out, (needle, result.output)
    return out


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **data}))
    return path


# ---- names that become path components -----------------------------------------------------


@pytest.mark.parametrize("name", ["../../../../X", "a/b", "..", ".hidden", "", "a b", "x" * 65,
                                  "a\\b", "safety\x00"])
def test_an_objective_name_that_is_not_a_safe_folder_name_is_refused(tmp_path, name):
    path = write_config(tmp_path, {"objectives": {name: {"type": "jailbreak"}}})
    with pytest.raises(ConfigError, match="objective name .* is not a safe name"):
        load_config(path, environ={})
    user_error(invoke("run", path), "objectives", "is not a safe name", "starting with a letter")
    assert not (tmp_path / "run").exists()
    assert not any(p.name == "X" for p in tmp_path.parents[0].rglob("X"))


def test_a_run_name_with_a_separator_is_refused_and_safe_names_pass(tmp_path):
    path = write_config(tmp_path, {"name": "../up", "objectives": {"s": {"type": "jailbreak"}}})
    user_error(invoke("config", path), "name", "run name '../up' is not a safe name")
    ok = write_config(tmp_path, {"name": "exp-1.b_2",
                                 "objectives": {"safety_2": {"type": "jailbreak"},
                                                "Boundary.v2": {"type": "overrefusal"}}})
    cfg = load_config(ok, environ={})
    assert cfg.name == "exp-1.b_2" and set(cfg.objectives) == {"safety_2", "Boundary.v2"}


def test_objective_names_differing_only_in_case_are_refused(tmp_path):
    path = write_config(tmp_path, {"objectives": {"safety": {"type": "jailbreak"},
                                                  "Safety": {"type": "jailbreak"}}})
    user_error(invoke("config", path), "differ only in case")


def test_a_nul_byte_in_run_dir_is_a_config_error_naming_the_field(tmp_path):
    # A YAML double-quoted "\0" is a NUL byte (an environment variable cannot hold one).
    path = tmp_path / "nul.yaml"
    path.write_text('objectives: {s: {type: jailbreak}}\nrun_dir: "runs/a\\0b"\n')
    user_error(invoke("run", path), "run_dir", "NUL byte")


# ---- OS errors a user can fix --------------------------------------------------------------


def _tiny(tiny_run_config, tmp_path: Path, **update) -> Path:
    """The tiny run config (tests/conftest.py) as a YAML file, baseline only, no held-out."""
    settings = tiny_run_config.model_dump(mode="json")
    settings.update(run_dir=str(tmp_path / "run"), loop={"rounds": 0}, **update)
    for objective in settings["objectives"].values():
        objective["heldout"] = None
    return write_config(tmp_path, settings)


def test_os_problems_are_classified_user_or_defect():
    import errno
    import sqlite3

    from mosaic.cli import _os_problem

    full = _os_problem(OSError(errno.ENOSPC, "No space left on device", "/r/x.json"))
    assert "No space left on device" in full and "/r/x.json" in full and "--resume" in full
    assert "read-only" in _os_problem(OSError(errno.EROFS, "Read-only file system"))
    assert "permissions" in _os_problem(PermissionError(errno.EACCES, "Permission denied"))
    assert "check the path" in _os_problem(NotADirectoryError(errno.ENOTDIR, "Not a directory"))
    assert "free some space" in _os_problem(sqlite3.OperationalError("database or disk is full"))
    # Not the user's to fix: the traceback is the report.
    assert _os_problem(OSError(errno.EBADF, "Bad file descriptor")) is None
    assert _os_problem(ValueError("x")) is None


def test_a_run_dir_under_a_file_is_a_message_not_a_traceback(tiny_run_config, tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    config = _tiny(tiny_run_config, tmp_path)
    result = invoke("run", config, env={"MOSAIC__run_dir": str(tmp_path / "file.txt" / "run")})
    user_error(result, "Not a directory", "a part of that path is a file")


@pytest.mark.parametrize("field, what", [("eval", "eval"), ("pool", "pool")])
def test_a_0_row_input_fails_before_a_run_folder_is_made(tiny_run_config, tmp_path, field, what):
    import pyarrow.parquet as pq

    source = getattr(tiny_run_config.objectives["boundary"], field)
    empty = tmp_path / f"empty-{what}.parquet"
    pq.write_table(pq.read_table(source).slice(0, 0), empty)
    # A copy of a world file is out of the rule judge's measured range; allowed here, so the
    # data check is what answers.
    config = _tiny(tiny_run_config, tmp_path,
                   judge={**tiny_run_config.judge.model_dump(mode="json"),
                          "allow_out_of_range": True})
    result = invoke("run", config, env={f"MOSAIC__objectives__boundary__{field}": str(empty)})
    user_error(result, "empty-", "no rows")
    assert not (tmp_path / "run").exists()
    # The corrected config then starts normally (nothing left behind to refuse it): checked
    # up to the folder being made, which is all a failed start could have spoiled.
    missing = invoke("run", config, env={f"MOSAIC__objectives__boundary__{field}":
                                         str(tmp_path / "nope.parquet")})
    user_error(missing, f"objectives.boundary.{field}: file not found")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_full_disk_mid_run_is_a_message_and_the_resume_gives_identical_results(
        tiny_run_config, tmp_path, monkeypatch):
    """ENOSPC is raised from the atomic writer (mosaic.io._temp_beside, where every atomic
    write starts) on its 4th call, in the middle of the baseline; after "freeing space" the
    resumed run's files equal an uninterrupted run's."""
    import errno
    import hashlib

    import mosaic.io as io_module

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    reference = invoke("run", _tiny(tiny_run_config, ref_dir))
    assert reference.exit_code == 0, reference.output

    config = _tiny(tiny_run_config, tmp_path)
    real, calls = io_module._temp_beside, []

    def full_disk(path):
        calls.append(path)
        if len(calls) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path.parent))
        return real(path)

    monkeypatch.setattr(io_module, "_temp_beside", full_disk)
    out = user_error(invoke("run", config), "No space left on device", "free some space",
                     "--resume")
    assert "Traceback" not in out
    monkeypatch.setattr(io_module, "_temp_beside", real)  # space freed
    resumed = invoke("run", "--resume", tmp_path / "run")
    assert resumed.exit_code == 0, resumed.output

    def digests(run: Path) -> dict[str, str]:
        files = sorted(p for p in (run / "round_0").rglob("*.parquet"))
        return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in files}

    ref, got = digests(ref_dir / "run"), digests(tmp_path / "run")
    assert ref and got == ref
    scores = [json.loads((run / "round_0" / "eval" / "eval_report.json").read_text())
              for run in (ref_dir / "run", tmp_path / "run")]
    assert scores[0]["reports"] == scores[1]["reports"]
    assert not list((tmp_path / "run").rglob("*.tmp"))  # no half-written leftovers


# ---- chat input ------------------------------------------------------------------------------


def test_note_and_reject_take_free_text_and_every_line_has_a_size_limit():
    from mosaic.agents.chat import ChatInputError, parse_command
    from mosaic.chat_input import MAX_INPUT_CHARS

    assert parse_command("/note don't add 'more' \"safety\" data").text == \
        "don't add 'more' \"safety\" data"
    assert parse_command("/Reject   it's too much; try boundary  ").text == \
        "it's too much; try boundary"
    assert parse_command("/mix safety=0.5 boundary=0.5").weights == {"safety": 0.5,
                                                                     "boundary": 0.5}
    with pytest.raises(ChatInputError, match="needs a text"):
        parse_command("/note   ")
    with pytest.raises(ChatInputError, match="unknown command /notes"):
        parse_command("/notes x")
    with pytest.raises(ChatInputError, match=f"at most {MAX_INPUT_CHARS:,}"):
        parse_command("/note " + "x" * 1_000_000)


# ---- output without a terminal ---------------------------------------------------------------


def test_without_a_terminal_each_stage_is_one_line_with_its_figures():
    import io

    from rich.console import Console

    from mosaic.agents.context import StageEvent
    from mosaic.display import LoopProgress, stage_figures
    from mosaic.schemas import RoundResult, TrainResult

    baseline = RoundResult(round=0, status="baseline", scores={"safety": 2.4421, "boundary": 4.9},
                           heldout_scores={"safety": 2.1, "boundary": None})
    train = TrainResult(method="sft", base_model="b", adapter_dir="a", train_tokens=12345,
                        train_rows=67, steps=9, final_loss=1.23456, seconds=3.0)
    assert stage_figures(baseline) == ("eval safety 2.442 boundary 4.900; "
                                       "held-out safety 2.100 boundary -")
    assert stage_figures(train) == "67 rows, 12,345 tokens, 9 steps, final loss 1.235"
    assert stage_figures(({"safety": 3.0}, None)) == "eval safety 3.000"

    log = io.StringIO()
    console = Console(file=log, force_terminal=False, width=200)
    with LoopProgress(console, rounds=2) as live:
        live.event(StageEvent("train", 1, "start"))
        live.event(StageEvent("train", 1, "done", seconds=3.04,
                              detail=stage_figures(train)))
        live.event(StageEvent("baseline", 0, "done", seconds=12.0, detail="eval safety 2.442"))
    assert log.getvalue().splitlines() == [
        "round 1/2 · train done in 3.0s: 67 rows, 12,345 tokens, 9 steps, final loss 1.235",
        "baseline · baseline done in 12.0s: eval safety 2.442"]


def test_without_a_terminal_library_progress_bars_and_future_warnings_are_off(monkeypatch):
    import warnings

    from mosaic.cli import _quiet_libraries

    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "PYTHONWARNINGS"):
        monkeypatch.delenv(var, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        _quiet_libraries()
        import os

        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert os.environ["PYTHONWARNINGS"] == "ignore::FutureWarning"  # child processes
        warnings.warn_explicit("old API", FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils")
        warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="mosaic.x")
    assert [str(w.message) for w in caught] == ["ours"]  # MOSAIC's own still show
    from transformers.utils import logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()
    monkeypatch.undo()
    hf_logging.enable_progress_bar()  # as it was for the tests that follow
