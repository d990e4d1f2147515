"""SIGKILL a real `mosaic run` / `mosaic chat` at every node boundary of rounds 1 and 2 and resume
each time: the run ends with all its rounds, the same scores as a run never interrupted, an audit
chain that verifies and no event logged twice.

The kills are deterministic: `MOSAIC_CRASH_AT` names the point where the process SIGKILLs itself
(agents/crashpoints.py). One run folder goes through the whole chain: the first process dies at
the first point, the resume started at that window dies at the next point, and so on, so every
window is resumed from once while the whole matrix costs one run's work (plus a process start
per point). The uninterrupted reference run is shared by the module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mosaic.audit import read_log, verify_log
from mosaic.config import dump_config
from mosaic.tools.archive import load_archive

pytestmark = pytest.mark.slow

ROUND_POINTS = ("plan/after", "check/after", "build/during", "train/during", "evaluate/during",
                "archive/during")
POINTS = ["r0/baseline/after"] + [f"r{k}/{p}" for k in (1, 2) for p in ROUND_POINTS]
APPROVALS = "/approve\n" * 8  # chat: more than the pauses any one process reaches


@pytest.fixture(scope="module")
def crash_config(tiny_run_config):
    # Held-out sets only at the baseline: the windows are the same, each round costs less.
    return tiny_run_config.model_copy(update={"loop": tiny_run_config.loop.model_copy(
        update={"rounds": 2, "heldout_every_round": False})})


def _scores(run_dir: Path) -> dict[int, dict]:
    archive = load_archive(run_dir)
    assert archive is not None
    return {p.round: {"eval": p.eval, "heldout": p.heldout} for p in archive.points}


@pytest.fixture(scope="module")
def reference(crash_config, tmp_path_factory):
    """The same run never interrupted (in process: the same driver `mosaic run` uses)."""
    from mosaic.agents.runner import run_loop

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    out = run_loop(crash_config.model_copy(update={"run_dir": str(run_dir)}))
    assert out.state["finished"] and [h["round"] for h in out.state["history"]] == [0, 1, 2]
    return _scores(run_dir)


def _mosaic(args: list[str], *, crash_at: str | None, stdin: str | None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOSAIC")}
    env["PYTHONUNBUFFERED"] = "1"
    if crash_at:
        env["MOSAIC_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "mosaic", *args], env=env, input=stdin or "",
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("command", ["run", "chat"])
def test_a_sigkill_at_every_node_boundary_resumes_to_the_uninterrupted_result(
        command, crash_config, reference, tmp_path):
    run_dir = tmp_path / "run"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_config(crash_config.model_copy(update={"run_dir": str(run_dir)})))
    stdin = APPROVALS if command == "chat" else None
    resume = ["run", "--resume", str(run_dir)] if command == "run" else ["chat", str(run_dir)]

    for i, point in enumerate(POINTS):
        args = [command, str(cfg_file)] if i == 0 else resume
        proc = _mosaic(args, crash_at=point, stdin=stdin)
        assert proc.returncode == -signal.SIGKILL, (
            f"{command} did not reach {point} (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    final = _mosaic(resume, crash_at=None, stdin=stdin)
    out = " ".join(final.stdout.split())
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "resuming the run" in out or "resumed" in out, out[-2000:]

    assert _scores(run_dir) == reference  # every round, the same figures
    assert verify_log(run_dir).ok
    from mosaic.tools.verify_run import verify_run

    verified = verify_run(run_dir)  # what `mosaic audit --verify` checks
    assert verified.ok, verified.problem
    log = read_log(run_dir)
    ids = [e["id"] for e in log if e["id"]]
    assert len(ids) == len(set(ids)), "an event was logged twice"
    assert sum(e["event"] == "run_resumed" for e in log) == len(POINTS)
    for kind in ("executed", "manifest", "trained", "scores", "archive"):
        assert [e["round"] for e in log if e["event"] == kind] == [1, 2], kind
    assert [e["event"] for e in log].count("run_finished") == 1
