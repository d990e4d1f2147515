"""Atomic file writes (a crash leaves either the old file or the new one, never half of one) and
schema-versioned reads of run records."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mosaic.schemas import SCHEMA_VERSION

Record = TypeVar("Record", bound=BaseModel)


class RecordError(ValueError):
    """A run file cannot be read as the record it should hold; names the file and why."""


def read_record(path: str | Path, model: type[Record]) -> Record:
    """A schema-versioned record (round.json, manifest.json, ...) from a run folder. A file
    written by another schema version fails naming the file, the version found and the one this
    MOSAIC reads, instead of half-loading or silently reinterpreting it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{path}: file not found (expected a {model.__name__})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: not a readable {model.__name__} JSON file ({e})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected a {model.__name__} JSON object, got "
                          f"{type(data).__name__}")
    found = data.get("schema_version")
    if found != SCHEMA_VERSION:
        shown = "(none)" if found is None else repr(found)
        raise RecordError(f"{path}: {model.__name__} has schema_version {shown}, but this MOSAIC reads "
                          f"schema_version {SCHEMA_VERSION}; rerun the stage that wrote it or use "
                          f"the MOSAIC release that did")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RecordError(f"{path}: not a valid {model.__name__}: {e}") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` written atomically, secrets redacted (mosaic.redact: every text MOSAIC writes)."""
    from mosaic.redact import redact

    atomic_write_bytes(path, redact(text).encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    if isinstance(obj, BaseModel):
        text = obj.model_dump_json(indent=2)
    else:
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def atomic_write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Let `writer` produce a file at a temporary path (e.g. pyarrow.parquet.write_table), then
    fsync and rename it over `path`."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        writer(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in `path`'s folder (made if missing), where every atomic write
    starts: a full disk or a read-only folder fails here, before anything is replaced (tests
    patch this to simulate them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def _atomic(path: str | Path, write: Callable[[Any], Any]) -> None:
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    # mkstemp creates 0600 files; give the final file the mode a plain open() would have.
    return 0o666 & ~_umask()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_dir(staged: str | Path, final: str | Path) -> None:
    """Move a fully written directory into place so readers see all of it or none of it.

    Files are fsynced first; an existing `final` is swapped out and removed afterwards (Linux
    has no atomic directory exchange through the standard library).
    """
    import uuid

    staged, final = Path(staged), Path(final)
    # mkdtemp makes 0700 directories; give the published one the usual permissions.
    staged.chmod(0o777 & ~_umask())
    for p in staged.rglob("*"):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


T = TypeVar("T")


def build_dir_once(final: str | Path, done_file: str, build: Callable[[Path], T],
                   read: Callable[[Path], T], *, verb: str = "build") -> T:
    """The directory `final`, built by `build(staging_dir)` unless `final/done_file` exists
    (then `read(final)`). One process builds per directory (a file lock beside it): a second
    one waits and then reads what the first published. The directory appears complete or not
    at all; `build`'s result is returned as is (its staging path is the caller's to fix)."""
    import fcntl

    final = Path(final)
    if (final / done_file).is_file():
        return read(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / done_file).is_file():
            return read(final)
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.{verb}-", dir=final.parent))
        try:
            result = build(work)
            publish_dir(work, final)
            return result
        finally:
            shutil.rmtree(work, ignore_errors=True)
