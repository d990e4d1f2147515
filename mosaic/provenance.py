"""Where a data file's text comes from: the sandbox world, or somewhere else.

The sandbox world writes `world.json` into its data folder, listing every file it generated
with its sha256. A file is sandbox text when a `world.json` in one of its parent folders lists
it under its path with exactly its content: a property of the file itself, not of its name (a
renamed real file is not sandbox text, and an edited sandbox file is not either).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from mosaic.markers import file_sha256

WORLD_MANIFEST = "world.json"
# pools/<objective>.parquet sits one folder below the world's root; look a little further up.
_MAX_DEPTH = 3


def sandbox_manifest_of(path: str | Path) -> Path | None:
    """The sandbox world manifest that lists `path` with its current content, or None."""
    p = Path(path)
    if not p.is_file():
        return None
    st = p.stat()
    found = _manifest_of(str(p.resolve()), st.st_size, st.st_mtime_ns)
    return Path(found) if found else None


def is_sandbox_text(path: str | Path) -> bool:
    """True when `path` is a file the sandbox world generated, unchanged."""
    return sandbox_manifest_of(path) is not None


@lru_cache(maxsize=256)
def _manifest_of(resolved: str, size: int, mtime_ns: int) -> str | None:
    # Keyed by size and mtime too, so an edited file is looked at afresh.
    p = Path(resolved)
    digest: str | None = None
    for root in list(p.parents)[:_MAX_DEPTH]:
        manifest = root / WORLD_MANIFEST
        if not manifest.is_file():
            continue
        try:
            files = json.loads(manifest.read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError, AttributeError):
            continue
        entry = files.get(p.relative_to(root).as_posix()) if isinstance(files, dict) else None
        if not isinstance(entry, dict) or "sha256" not in entry:
            continue
        digest = digest or file_sha256(p)
        if entry["sha256"] == digest:
            return str(manifest)
    return None
