"""Hostile and unlucky input (issue 16): names that would become paths, NUL bytes, OS errors
from the file system, and input found wrong only after a run folder was made. Every case is a
message with exit code 2, never a traceback, and a failed start leaves nothing behind."""

from __future__ import annotations

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
