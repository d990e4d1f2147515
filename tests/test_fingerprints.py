"""File digests are computed once per process while a file is unchanged: a run hashes each pool
and eval file at most once, and any rewrite (in place, by rename, mtime set back) is seen."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from scripted import GOOD, ScriptedPlanner

from mosaic import markers


@pytest.fixture
def reads(monkeypatch):
    """Counts the files read for hashing, by resolved path; settled files only."""
    counted: Counter[str] = Counter()
    real = markers._read_sha256

    def counting(path):
        counted[os.path.realpath(path)] += 1
        return real(path)

    monkeypatch.setattr(markers, "_read_sha256", counting)
    monkeypatch.setattr(markers, "_DIGESTS", {})
    return counted


def _age(path: Path, monkeypatch) -> None:
    # A file is remembered once its last change is SETTLE_NS old; rather than sleeping, the
    # test lets the clock run ahead.
    real = time.time_ns
    monkeypatch.setattr(markers.time, "time_ns", lambda: real() + 2 * markers.SETTLE_NS)


def test_a_settled_file_is_read_once_and_every_kind_of_rewrite_is_seen(tmp_path, reads,
                                                                        monkeypatch):
    f = tmp_path / "pool.bin"
    f.write_bytes(b"a" * 1000)
    first = markers.file_sha256(f)
    # Just written: not remembered yet (a second write in the same timestamp tick could keep
    # size and times the same), so it is read again.
    assert markers.file_sha256(f) == first and reads[str(f.resolve())] == 2
    _age(f, monkeypatch)
    markers.file_sha256(f)
    for _ in range(5):
        assert markers.file_sha256(f) == first
    assert reads[str(f.resolve())] == 3

    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size, in place (same inode)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime (cp -p, rsync -t)
    assert markers.file_sha256(f) != first  # the change time moved

    other = tmp_path / "other.bin"
    other.write_bytes(b"a" * 1000)
    os.replace(other, f)  # the same bytes again, by rename: a new inode
    assert markers.file_sha256(f) == first
    assert markers.file_fingerprint(f) == first and markers.dir_fingerprint(f) == first


def test_a_two_round_run_hashes_each_pool_and_eval_file_at_most_once(tiny_run_config, tmp_path,
                                                                     reads, monkeypatch):
    from mosaic.agents.runner import run_loop

    cfg = tiny_run_config.model_copy(update={
        "run_dir": str(tmp_path / "run"),
        "loop": tiny_run_config.loop.model_copy(update={"rounds": 2})})
    data_files = {os.path.realpath(getattr(o, split)) for o in cfg.objectives.values()
                  for split in ("pool", "eval", "heldout")}
    _age(tmp_path, monkeypatch)  # the world's files were written before the run
    second = {**GOOD, "mixture": {"safety": 0.2, "boundary": 0.4, "instruction": 0.4}}
    out = run_loop(cfg, planner=ScriptedPlanner([json.dumps(GOOD), json.dumps(second)]))
    assert [h["round"] for h in out.state["history"]] == [0, 1, 2]

    hashed = {p: n for p, n in reads.items() if p in data_files}
    # Without the digest memo this run read each pool 6 times and each eval set 9 times.
    assert hashed and max(hashed.values()) == 1, hashed
    assert set(hashed) == data_files  # every one was fingerprinted (the markers need them)
