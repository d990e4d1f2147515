"""The command line against bad input, as a new user and a hostile one would give it: every user
error is a message and exit code 2 (never a traceback), no secret reaches a terminal or a file,
and text from files, configs and servers is printed literally (never read as rich markup)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
