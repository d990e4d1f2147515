"""The run's audit log: append-only JSONL whose entries chain SHA-256 hashes.

Every event of a run (proposal, verdict, revision, refusal, fallback, executed action, manifest,
scores, archive decision, human edits) is one line:

    {"seq": 7, "time": "...", "event": "verdict", "round": 2, "author": "planner",
     "id": "r2/verdict/1", "data": {...}, "prev": "<sha256 of line 6>"}

`prev` is the SHA-256 of the previous line's bytes (64 zeros for the first), so an edited,
deleted or reordered line breaks the chain at the first line after it. A truncated tail leaves
the chain intact, so `audit.head.json` (written atomically after every append) records how many
lines there are and the hash of the last; `verify_log` checks both.

Crash safety: a line is appended with one write + fsync, then the head is updated. A crash
between the two leaves a log one line ahead of its head, which `AuditLog` accepts on open when
the extra line chains correctly. A crash inside the write can leave a torn last line (no
newline): on open it is moved to `audit.torn-<seq>.jsonl` and a `torn_tail_recovered` entry
records its hash, so the chain stays verifiable and nothing is silently lost.

Entries carry an `id`; appending an id already in the log is a no-op returning the earlier entry,
so a graph node that re-runs after a crash does not log its events twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mosaic.io import atomic_write_json
from mosaic.redact import redact

LOG_FILE = "audit.jsonl"
HEAD_FILE = "audit.head.json"
GENESIS = "0" * 64

EVENTS = ("run_started", "run_resumed", "baseline", "proposal", "verdict", "revision", "refusal",
          "fallback", "executed", "manifest", "trained", "scores", "archive", "human_edit",
          "human_limits", "human_decision", "round_skipped", "run_finished",
          "torn_tail_recovered")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class AuditError(RuntimeError):
    """The audit log cannot be appended to safely (its chain is already broken)."""


@dataclass(frozen=True)
class Verification:
    ok: bool
    entries: int
    problem: str | None = None  # names the first bad entry (line number) and why
    line: int | None = None


def _read_lines(path: Path) -> tuple[list[bytes], bytes]:
    """Complete lines (without newline) and a torn tail (bytes after the last newline)."""
    if not path.is_file():
        return [], b""
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")
    return lines, tail


def _entry_name(i: int, raw: bytes) -> str:
    """'line 7 (seq 7, verdict, round 2)': an entry named by its line and, when it parses, by
    what it says it is."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return f"line {i}"
    if not isinstance(entry, dict):
        return f"line {i}"
    what = [f"seq {entry.get('seq')}", str(entry.get("event"))]
    if entry.get("round") is not None:
        what.append(f"round {entry.get('round')}")
    return f"line {i} ({', '.join(what)})"


def verify_log(run_dir: str | Path) -> Verification:
    """Re-check the chain, the sequence numbers and the head record. A problem names the first
    bad entry by its line (and its seq, event and round when it parses)."""
    run_dir = Path(run_dir)
    path, head_path = run_dir / LOG_FILE, run_dir / HEAD_FILE
    if not path.is_file():
        return Verification(False, 0, f"{path} does not exist")
    lines, tail = _read_lines(path)
    if tail:
        return Verification(False, len(lines), f"line {len(lines) + 1}: torn (no newline at the "
                                               f"end of the file): the log was truncated or a "
                                               f"write was cut off", len(lines) + 1)
    prev, before_last = GENESIS, GENESIS
    for i, raw in enumerate(lines, start=1):
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as e:
            return Verification(False, i - 1, f"line {i}: not JSON ({e.msg}): the line was edited "
                                              f"or cut", i)
        if not isinstance(entry, dict):
            return Verification(False, i - 1, f"line {i}: not a JSON object", i)
        if entry.get("seq") != i:
            return Verification(False, i - 1, f"{_entry_name(i, raw)}: sequence number "
                                              f"{entry.get('seq')!r}, expected {i} (a line was "
                                              f"deleted, inserted or moved)", i)
        if entry.get("prev") != prev:
            # The chain breaks at the line after an edited one: name the edited line first.
            return Verification(False, i - 1, f"{_entry_name(i - 1, lines[i - 2])} was changed "
                                              f"after it was written: it no longer hashes to the "
                                              f"'prev' that line {i} records (or line {i}'s "
                                              f"'prev' was edited)", i - 1)
        before_last, prev = prev, line_hash(raw)
    try:
        head = json.loads(head_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Verification(False, len(lines), f"{head_path} is missing or unreadable")
    if not isinstance(head, dict):
        return Verification(False, len(lines), f"{head_path} is not a JSON object")
    count, last = head.get("count"), head.get("last")
    if count == len(lines) - 1 and last == before_last:
        # A crash between appending a line and updating the head: the line chains correctly
        # and the next open of the log catches the head up.
        return Verification(True, len(lines))
    if count != len(lines) or last != prev:
        if isinstance(count, int) and count > len(lines):
            return Verification(False, len(lines), f"the log has {len(lines)} lines but its head "
                                                   f"records {count}: line {len(lines) + 1} and "
                                                   f"after were removed (truncated)",
                                len(lines) + 1)
        if count == len(lines) and lines:
            n = len(lines)
            return Verification(False, n, f"{_entry_name(n, lines[-1])} was changed after it "
                                          f"was written: it no longer hashes to the last line "
                                          f"recorded in {head_path.name}", n)
        return Verification(False, len(lines), f"the head ({head_path.name}) records {count} "
                                               f"lines ending in {str(last)[:12]}…, the log has "
                                               f"{len(lines)} ending in {prev[:12]}…")
    return Verification(True, len(lines))


class AuditLog:
    """Appends chained entries to `<run_dir>/audit.jsonl` (one writer per run)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / LOG_FILE
        self.head_path = self.run_dir / HEAD_FILE
        self._ids: dict[str, dict[str, Any]] = {}
        self._prev, self._seq = GENESIS, 0
        self._open()

    def _open(self) -> None:
        lines, tail = _read_lines(self.path)
        prev = GENESIS
        for i, raw in enumerate(lines, start=1):
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                raise AuditError(f"{self.path} line {i} is not JSON; run `mosaic audit --verify` "
                                 f"and restore the log before continuing") from None
            if entry.get("seq") != i or entry.get("prev") != prev:
                raise AuditError(f"{self.path} line {i}: the hash chain is broken; run "
                                 f"`mosaic audit --verify` and restore the log before continuing")
            prev = line_hash(raw)
            if entry.get("id"):
                self._ids[entry["id"]] = entry
        self._prev, self._seq = prev, len(lines)
        if tail:
            torn = self.run_dir / f"audit.torn-{self._seq + 1}.jsonl"
            torn.write_bytes(tail)
            with open(self.path, "rb+") as f:
                f.truncate(f.seek(0, os.SEEK_END) - len(tail))
                os.fsync(f.fileno())
            self._write_head()
            self.append("torn_tail_recovered", {"moved_to": torn.name, "bytes": len(tail),
                                                "sha256": line_hash(tail)}, author="system")
        else:
            self._write_head()

    def _write_head(self) -> None:
        atomic_write_json(self.head_path, {"count": self._seq, "last": self._prev})

    def has(self, event_id: str) -> bool:
        return event_id in self._ids

    def get(self, event_id: str) -> dict[str, Any] | None:
        return self._ids.get(event_id)

    def append(self, event: str, data: dict[str, Any] | None = None, *, round: int | None = None,
               author: str = "system", event_id: str | None = None) -> dict[str, Any]:
        """Append one entry (a no-op returning the earlier entry if `event_id` is logged)."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}; expected one of {EVENTS}")
        if event_id is not None and event_id in self._ids:
            return self._ids[event_id]
        entry = {"seq": self._seq + 1, "time": _now(), "event": event, "round": round,
                 "author": author, "id": event_id, "data": data or {}, "prev": self._prev}
        # Redacted before it is hashed and written: a secret never enters the chain.
        line = redact(json.dumps(entry, sort_keys=True, ensure_ascii=False,
                                 default=str)).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        self._prev, self._seq = line_hash(line), self._seq + 1
        self._write_head()
        if event_id is not None:
            self._ids[event_id] = entry
        return entry


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete entry of a run's audit log (no verification: see `verify_log`)."""
    lines, _ = _read_lines(Path(run_dir) / LOG_FILE)
    return [json.loads(raw) for raw in lines]
