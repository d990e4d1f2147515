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

from mosaic.io import atomic_write_with
from mosaic.markers import hash_obj

COMPLETE = ".complete"


def entry_dir(root: str | Path, kind: str, inputs: Mapping[str, Any]) -> Path:
    return Path(root) / kind / hash_obj(inputs)[:40]


def restore(root: str | Path | None, kind: str, inputs: Mapping[str, Any], dest: str | Path,
            files: Sequence[str]) -> bool:
    """Copy a cached entry into the folder `dest`: every file it holds, which must include
    `files` (each written atomically; the caller's completion marker, written after, is what
    says the stage is done); False on a miss."""
    if root is None:
        return False
    entry = entry_dir(root, kind, inputs)
    if not (entry / COMPLETE).is_file() or not all((entry / f).is_file() for f in files):
        return False
    held = sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*")
                  if p.is_file() and p.name != COMPLETE)
    for f in held:
        atomic_write_with(Path(dest) / f, lambda tmp, f=f: shutil.copyfile(entry / f, tmp))
    return True


def store(root: str | Path | None, kind: str, inputs: Mapping[str, Any], src: str | Path,
          files: Sequence[str] | None = None) -> None:
    """Add `src`'s `files` (default: every file under `src`, so a restored folder is the same
    folder, byte for byte) as the entry for `inputs`; a no-op when it exists or root is None."""
    if root is None:
        return
    entry = entry_dir(root, kind, inputs)
    if (entry / COMPLETE).is_file():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    if files is None:
        files = [p.relative_to(src).as_posix() for p in Path(src).rglob("*") if p.is_file()]
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
