"""A content-addressed store of stage outputs shared across runs (`cache.stages_dir`).

A stage's inputs (the same dict its completion marker hashes) name an entry; an entry is
written once, complete (copied into a temporary folder and renamed into place), and never
changed. A round whose inputs match an entry copies its outputs instead of recomputing them:
an adapter trained on the same dataset, base model and settings, or replies the same model
generated for the same eval set. Results are identical either way; only the time differs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mosaic.io import publish_dir
from mosaic.markers import hash_obj

COMPLETE = ".complete"


def entry_dir(root: str | Path, kind: str, inputs: Mapping[str, Any]) -> Path:
    return Path(root) / kind / hash_obj(inputs)[:40]


def restore(root: str | Path | None, kind: str, inputs: Mapping[str, Any], dest: str | Path,
            files: Sequence[str]) -> bool:
    """Copy a cached entry's `files` into `dest` (a folder, published whole); False on a miss."""
    if root is None:
        return False
    entry = entry_dir(root, kind, inputs)
    if not (entry / COMPLETE).is_file() or not all((entry / f).is_file() for f in files):
        return False
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.cached-", dir=dest.parent))
    try:
        staged = work / dest.name
        staged.mkdir()
        for f in files:
            (staged / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry / f, staged / f)
        publish_dir(staged, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return True


def store(root: str | Path | None, kind: str, inputs: Mapping[str, Any], src: str | Path,
          files: Sequence[str]) -> None:
    """Add `src`'s `files` as the entry for `inputs` (no-op when it exists or root is None)."""
    if root is None:
        return
    entry = entry_dir(root, kind, inputs)
    if (entry / COMPLETE).is_file():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for f in files:
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(src) / f, work / f)
        (work / COMPLETE).write_text("")
        os.chmod(work, 0o755)
        try:
            os.rename(work, entry)  # atomic; another process may have won the race: fine
        except OSError:
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
