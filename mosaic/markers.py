"""Completion markers keyed by a stage's inputs, and the fingerprints they are made of.

A finished stage leaves `<name>.done.json` holding the inputs that determined its output
(fingerprints of files and models, the settings it used) and the fingerprint of each output
file. A rerun reuses the output only when the inputs are the same and the outputs are intact;
otherwise the check says what changed ("budget: 300000 -> 200000", "train.parquet was
modified"), so a caller recomputes and can tell the user why, instead of silently reusing a
stale result. Markers are written last and atomically: a crash mid-stage leaves no marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mosaic.io import atomic_write_json

MARKER_VERSION = 2
# Files up to this size are fingerprinted by content; bigger ones (multi-GB weights) by size and
# modification time, which is what a rebuild changes.
HASH_CONTENT_MAX = 64 << 20


# A file's digest is remembered by its identity: path, device, inode, size, modification and
# change times. Rewriting a file (in place or by rename) changes at least one of them, and the
# change time cannot be set back by `touch`/`cp -p`/rsync. As git does for its index ("racy
# clean" files), a file changed less than SETTLE_NS before it is hashed is not remembered: a
# second write within the filesystem's timestamp granularity could keep every field the same.
SETTLE_NS = 2_000_000_000
_DIGESTS: dict[tuple[Any, ...], str] = {}


def _identity(path: str | Path) -> tuple[tuple[Any, ...], int]:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
           st.st_ctime_ns)
    return key, max(st.st_mtime_ns, st.st_ctime_ns)


def _read_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in full (the one place a file is read for hashing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's content, read once per process while the file is unchanged: a run
    fingerprints the same multi-GB pools at every check, plan and stage marker."""
    key, changed_ns = _identity(path)
    digest = _DIGESTS.get(key)
    if digest is not None:
        return digest
    digest = _read_sha256(path)
    after, _ = _identity(path)
    if after == key and changed_ns < time.time_ns() - SETTLE_NS:
        _DIGESTS[key] = digest
    return digest


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the content, or of (size, mtime) for files over HASH_CONTENT_MAX."""
    p = Path(path)
    st = p.stat()
    if st.st_size <= HASH_CONTENT_MAX:
        return file_sha256(p)
    return hashlib.sha256(f"{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()


def dir_fingerprint(path: str | Path | None) -> str | None:
    """A hash identifying a model or adapter directory's contents (None for None)."""
    if path is None:
        return None
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"model/adapter path not found: {root}")
    if root.is_file():
        return file_sha256(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root).as_posix()}\0{file_fingerprint(p)}\n".encode())
    return h.hexdigest()


def hash_obj(obj: Any) -> str:
    """sha256 of an object's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class MarkerCheck:
    """Whether a stage's output can be reused, and if not, why."""

    ok: bool
    reasons: list[str] = field(default_factory=list)

    def describe(self, limit: int = 4) -> str:
        shown = self.reasons[:limit]
        more = len(self.reasons) - len(shown)
        return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {"a.b.c": leaf}; an empty mapping is a leaf."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    # Fingerprints are 64 hex digits: 12 are enough to tell two apart in a message.
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        text = json.dumps(v[:12] + "…")
    return text if len(text) <= 80 else text[:77] + "..."


def changed_inputs(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted paths whose values differ, as 'path: old -> new'."""
    a, b = flatten(json.loads(json.dumps(old, default=str))), flatten(json.loads(json.dumps(new, default=str)))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}: {_short(a.get(key, '<unset>'))} -> {_short(b.get(key, '<unset>'))}")
    return out


def check_marker(marker: str | Path, inputs: Mapping[str, Any],
                 outputs: Sequence[str | Path]) -> MarkerCheck:
    """Is the stage that wrote `marker` done for exactly these inputs, outputs untouched?"""
    marker = Path(marker)
    if not marker.is_file():
        return MarkerCheck(False, ["not done yet"])
    try:
        saved = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return MarkerCheck(False, [f"marker {marker.name} is unreadable"])
    if not isinstance(saved, dict) or saved.get("version") != MARKER_VERSION:
        return MarkerCheck(False, [f"marker {marker.name} is from another MOSAIC version"])
    if saved.get("key") != hash_obj(inputs):
        return MarkerCheck(False, changed_inputs(saved.get("inputs") or {}, inputs)
                           or ["inputs changed"])
    recorded = saved.get("outputs") or {}
    # Every output the stage recorded must still be there as written, and so must every output
    # the caller relies on now.
    paths = {rel: marker.parent / rel for rel in recorded}
    paths.update({_rel(marker, Path(p)): Path(p) for p in outputs})
    reasons = []
    for rel, p in sorted(paths.items()):
        if not p.is_file():
            reasons.append(f"{rel} is missing")
        elif recorded.get(rel) != file_fingerprint(p):
            reasons.append(f"{rel} was modified" if rel in recorded else f"{rel} was not recorded")
    return MarkerCheck(not reasons, reasons)


def write_marker(marker: str | Path, inputs: Mapping[str, Any], outputs: Sequence[str | Path],
                 **extra: Any) -> None:
    marker = Path(marker)
    atomic_write_json(marker, {
        "version": MARKER_VERSION, "key": hash_obj(inputs), "inputs": dict(inputs),
        "outputs": {_rel(marker, Path(p)): file_fingerprint(p) for p in outputs}, **extra})


def _rel(marker: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(marker.parent.resolve()).as_posix()
    except ValueError:
        return str(path)
