"""The run folder's settings: saved when a run starts, compared when it resumes.

`open_run` writes the resolved config (`config.yaml`; it holds no secrets: endpoints name the
environment variable of their key, never the key) into the run folder the first time, and
refuses to continue a run with settings that would change what its finished stages computed,
naming each differing field. Fields in `SAFE_TO_CHANGE` only decide how far a run goes or how
it talks to a service; a resume may change them and the saved file is updated.

`run_lock` keeps one process at a time in a run folder: two loops writing the same rounds,
checkpoint and audit log would interleave their results. The lock is an OS file lock, so a killed
process releases it and `--resume` after a crash is never blocked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from mosaic.config import ConfigError, MosaicConfig, dump_config, public_settings
from mosaic.io import atomic_write_text
from mosaic.markers import changed_inputs

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".run.lock"

# Dotted field paths (or prefixes ending in ".") that a resumed run may change.
SAFE_TO_CHANGE = (
    "name",
    "run_dir",  # the folder itself may have moved
    "loop.rounds",  # more (or fewer) rounds: finished ones are kept
    "planner.max_revisions",
    "inference.batch_size",  # evaluate's markers do not key on it: greedy replies are the same
    "inference.decode",  # fast or generate: the same greedy replies (tests/test_decoding.py)
    "judge.cache_dir",
    # Permission, not a setting of the judge: allowing the rule judge outside its range changes
    # no label it gives.
    "judge.allow_out_of_range",
    "runtime.",  # threads and other machine settings
    "cache.",  # where reusable stage outputs are kept: results are the same either way
)
# How a service is talked to and what it charges; not what it answers.
_ENDPOINT_SAFE = ("timeout_s", "max_retries", "concurrency", "price_per_1k_input",
                  "price_per_1k_output")


class RunConfigError(ValueError):
    """A run folder was started with settings that differ from the ones given now."""


class RunBusyError(RunConfigError):
    """Another process is running the loop in this run folder."""


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder for this process; RunBusyError (naming the holder's pid) if another
    process holds it."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise RunBusyError(
                f"{run_dir} is in use by another MOSAIC process (pid {holder}); wait for it to "
                f"finish or stop it, then resume") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _safe(path: str) -> bool:
    if any(path == s or (s.endswith(".") and path.startswith(s)) for s in SAFE_TO_CHANGE):
        return True
    parts = path.split(".")
    return len(parts) >= 3 and parts[-2].endswith("endpoint") and parts[-1] in _ENDPOINT_SAFE


def saved_config(run_dir: str | Path) -> MosaicConfig:
    """The settings a run folder was started with."""
    from mosaic.config import load_config

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a MOSAIC run folder: it has no {CONFIG_FILE}")
    # URL credentials are saved as *** (mosaic.config.public_settings): a client built on such
    # a URL refuses (mosaic.llm.make_client) until the URL is given again (`masked_urls`).
    return load_config(path)


def open_run(config: MosaicConfig) -> list[str]:
    """Save `config` into its run folder, or check it against the one saved there.

    Returns the safe changes applied (as 'field: old -> new'); raises RunConfigError naming the
    fields that may not change.
    """
    run_dir = Path(config.run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, dump_config(config))
        return []
    try:
        old: Any = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunConfigError(f"{path} cannot be read ({type(e).__name__}); restore it or start "
                             f"a new run folder") from None
    new = public_settings(config)  # as saved: URL credentials are *** on both sides
    try:
        # A setting added since the run started reads as its default there, which is what the
        # run used: it is no change (so folders from before it existed still resume).
        old = public_settings(type(config).model_validate(old))
    except ValueError:
        pass  # compared as saved: the changes then name what no longer fits
    changes = changed_inputs(old, new)
    unsafe = [c for c in changes if not _safe(c.split(":", 1)[0])]
    if unsafe:
        raise RunConfigError(
            f"{run_dir} was started with other settings; resuming it with these would mix "
            f"results of different setups:\n" + "\n".join(f"  - {c}" for c in unsafe)
            + f"\nResume with the saved settings ({path}), or set run_dir to a new folder.")
    if changes:
        atomic_write_text(path, dump_config(config))
    return changes
