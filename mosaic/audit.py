"""The run's audit log: append-only JSONL whose entries chain SHA-256 hashes.

Every event of a run (proposal, verdict, revision, refusal, fallback, executed action, manifest,
scores, archive decision, human edits) is one line, a typed record (`mosaic.audit_events`: one
model per event kind, validated before it is written, parsed with the same model by readers):

    {"seq": 7, "time": "...", "event": "verdict", "round": 2, "author": "planner",
     "id": "r2/verdict/1", "data": {...}, "v": 2,
     "files": {"round_2/proposals/1.json": "<sha256>"}, "prev": "<sha256 of line 6>"}

`prev` is the SHA-256 of the previous line's bytes (64 zeros for the first), so an edited,
deleted or reordered line breaks the chain at the first line after it. `files` holds the sha256
of every file the event wrote (archive, eval reports with their slice means, responses, samples,
proposals, training set, adapter), so `mosaic audit --verify` can recompute everything the
report and the planner read.

The head. A truncated tail leaves the chain intact, so `audit.head.json` (written atomically
after every append) records how many lines there are and the hash of the last; `verify_log`
checks both. The head is never rewritten from a log shorter than it (or from a log whose last
line no longer hashes to it): opening such a log refuses (`AuditRefused`, naming the last good
entry) unless the person repairs it explicitly (`repair_log`, behind `--repair-audit`), which is
itself logged. With `MOSAIC_AUDIT_HMAC_KEY` set, the head carries an HMAC-SHA256 of its count
and last hash: a head rewritten without the key fails `--verify` and refuses to reopen.

Anchors. Whoever can rewrite the whole run folder can forge a consistent chain (edit a line,
re-hash every line after it, rewrite the head). `anchor` gives `N:<sha256 of line N>` to keep
outside the run folder; `verify_log(expect=...)` checks that line N still hashes to it (the run
may have grown since), which a re-hashed forgery cannot satisfy.

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
import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mosaic.audit_events import ENTRY_VERSION, EVENTS, AuditEntry, check_data
from mosaic.io import atomic_write_json
from mosaic.redact import redact

LOG_FILE = "audit.jsonl"
HEAD_FILE = "audit.head.json"
GENESIS = "0" * 64
HMAC_ENV = "MOSAIC_AUDIT_HMAC_KEY"
REPAIR_FLAG = "--repair-audit"

__all__ = ["EVENTS", "GENESIS", "HEAD_FILE", "HMAC_ENV", "LOG_FILE", "AuditError", "AuditLog",
           "AuditRefused", "Verification", "anchor", "file_digests", "line_hash", "read_entries",
           "read_log", "reopen_problem", "repair_log", "verify_log"]


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class AuditError(RuntimeError):
    """The audit log cannot be appended to safely (its chain is already broken)."""


class AuditRefused(AuditError, ValueError):
    """Reopening the log would launder it (a log shorter than its head, a head that is gone or
    not signed by the key): the person restores the log or repairs it explicitly."""


@dataclass(frozen=True)
class Verification:
    ok: bool
    entries: int
    problem: str | None = None  # names the first bad entry (line number) and why
    line: int | None = None
    signed: bool = False  # the head's HMAC was checked with MOSAIC_AUDIT_HMAC_KEY
    anchored: str | None = None  # the anchor (`N:sha256`) the log was checked against


# ---- digests of the files an event wrote -------------------------------------------------------


def _sha256_file(path: Path) -> str:
    # Read afresh every time (no per-process cache): verification must see the bytes on disk.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _skipped(path: Path) -> bool:
    # Dot files are atomic writes in flight (mosaic.io) and locks; neither is content.
    return path.name.startswith(".") or path.name.endswith(".tmp")


def file_digests(run_dir: str | Path, paths: Iterable[str | Path]) -> dict[str, str]:
    """sha256 of each file (a folder: every file under it), keyed by its path relative to the
    run folder with '/' separators. Paths that do not exist are left out: a stage that wrote
    nothing there (no held-out sets) has nothing to vouch for."""
    run_dir = Path(run_dir)
    out: dict[str, str] = {}
    for p in paths:
        path = Path(p) if Path(p).is_absolute() else run_dir / p
        files = ([f for f in sorted(path.rglob("*")) if f.is_file()] if path.is_dir()
                 else [path] if path.is_file() else [])
        for f in files:
            rel = f.relative_to(run_dir)
            if any(part.startswith(".") for part in rel.parts) or _skipped(f):
                continue
            out[rel.as_posix()] = _sha256_file(f)
    return out


# ---- the head -----------------------------------------------------------------------------------


def _key(environ: dict[str, str] | None = None) -> bytes | None:
    value = (os.environ if environ is None else environ).get(HMAC_ENV, "")
    return value.encode("utf-8") if value else None


def _mac(key: bytes, count: int, last: str) -> str:
    return hmac.new(key, f"mosaic-audit-head\0{count}\0{last}".encode(), "sha256").hexdigest()


def _read_lines(path: Path) -> tuple[list[bytes], bytes]:
    """Complete lines (without newline) and a torn tail (bytes after the last newline)."""
    if not path.is_file():
        return [], b""
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")
    return lines, tail


def _read_head(head_path: Path) -> dict[str, Any] | None:
    try:
        head = json.loads(head_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None


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


def _last_good(lines: list[bytes]) -> str:
    return _entry_name(len(lines), lines[-1]) if lines else "none (the log is empty)"


def _head_problem(lines: list[bytes], hashes: list[str], head: dict[str, Any] | None,
                  head_name: str, key: bytes | None) -> tuple[str, int | None, bool] | None:
    """Why the head does not vouch for `lines` (problem, line, repairable), or None.
    `hashes[i]` is the hash of line i+1. A log one line ahead of its head is a crash between
    appending and updating the head, not a problem."""
    n = len(lines)
    if head is None:
        if n == 0:
            return None
        return (f"{head_name} is missing or unreadable, so nothing vouches for the log's length "
                f"(its last entry is {_last_good(lines)})", None, True)
    count, last = head.get("count"), head.get("last")
    if not isinstance(count, int) or not isinstance(last, str):
        return f"{head_name} does not record a line count and a hash", None, True
    # The signature first: it speaks for the head alone, whatever the log says.
    signature = head.get("hmac")
    if signature is not None:
        if key is None:
            return (f"{head_name} is signed (HMAC) but {HMAC_ENV} is not set: set it to the "
                    f"run's key", None, False)
        if not hmac.compare_digest(str(signature), _mac(key, count, last)):
            return (f"{head_name}'s HMAC signature does not match {HMAC_ENV}: the head was "
                    f"rewritten without the key (or the key is another one)", None, False)
    elif key is not None and count:
        return (f"{head_name} is not signed, but {HMAC_ENV} is set: the head was rewritten "
                f"without the key, or the run was started without it (then continue and "
                f"verify it without {HMAC_ENV})", None, False)
    if count > n:
        return (f"the log has {n} lines but its head records {count}: line {n + 1} and after "
                f"were removed (truncated); the last good entry is {_last_good(lines)}",
                n + 1, True)
    at = hashes[count - 1] if count else GENESIS
    if count < n - 1 or at != last:
        if count == n and n:
            return (f"{_entry_name(n, lines[-1])} was changed after it was written: it no longer "
                    f"hashes to the last line recorded in {head_name}", n, False)
        return (f"the head ({head_name}) records {count} lines ending in {last[:12]}…, the log "
                f"has {n} ending in {(hashes[-1] if hashes else GENESIS)[:12]}…", None, False)
    return None


def _chain(lines: list[bytes]) -> tuple[list[str], Verification | None]:
    """The line hashes, or the first break in the chain (seq, prev, JSON)."""
    hashes: list[str] = []
    prev = GENESIS
    for i, raw in enumerate(lines, start=1):
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as e:
            return hashes, Verification(False, i - 1, f"line {i}: not JSON ({e.msg}): the line "
                                                      f"was edited or cut", i)
        if not isinstance(entry, dict):
            return hashes, Verification(False, i - 1, f"line {i}: not a JSON object", i)
        if entry.get("seq") != i:
            return hashes, Verification(False, i - 1, f"{_entry_name(i, raw)}: sequence number "
                                                      f"{entry.get('seq')!r}, expected {i} (a "
                                                      f"line was deleted, inserted or moved)", i)
        if entry.get("prev") != prev:
            # The chain breaks at the line after an edited one: name the edited line first.
            return hashes, Verification(False, i - 1, f"{_entry_name(i - 1, lines[i - 2])} was "
                                                      f"changed after it was written: it no "
                                                      f"longer hashes to the 'prev' that line "
                                                      f"{i} records (or line {i}'s 'prev' was "
                                                      f"edited)", i - 1)
        prev = line_hash(raw)
        hashes.append(prev)
    return hashes, None


def _results_without_log(run_dir: Path, lines: list[bytes]) -> str | None:
    """An empty or missing log in a folder that already holds results: the log was deleted
    (the loop logs `run_started` before anything is evaluated, so a crash cannot leave this)."""
    if lines:
        return None
    found = [p.name for p in sorted(run_dir.glob("round_*"))
             if p.is_dir() and p.name.removeprefix("round_").isdigit()][:2]
    if (run_dir / "archive.json").is_file():
        found.insert(0, "archive.json")
    if not found:
        return None
    state = "empty" if (run_dir / LOG_FILE).is_file() else "gone"
    return (f"the run folder holds results ({', '.join(found)}, ...) but its audit log is "
            f"{state}: the log was deleted or emptied")


def _parse_anchor(expect: str) -> tuple[int | None, str]:
    text = expect.strip().lower()
    n, _, digest = text.rpartition(":")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or (
            n and not n.isdigit()):
        raise ValueError(f"--expect {expect!r}: expected `N:<64 hex digits>` as printed by "
                         f"`mosaic audit --anchor`, or the head's 64-hex-digit hash")
    return (int(n) if n else None), digest


def verify_log(run_dir: str | Path, *, expect: str | None = None,
               environ: dict[str, str] | None = None) -> Verification:
    """Re-check the chain, the sequence numbers, the head record (and its HMAC when
    `MOSAIC_AUDIT_HMAC_KEY` is set or the head is signed) and, given `expect` (an anchor from
    `anchor`), that the anchored line still hashes to it. A problem names the first bad entry
    by its line (and its seq, event and round when it parses). ValueError for a malformed
    `expect`."""
    run_dir = Path(run_dir)
    path, head_path = run_dir / LOG_FILE, run_dir / HEAD_FILE
    anchor_at = _parse_anchor(expect) if expect is not None else None
    if not path.is_file():
        return Verification(False, 0, f"{path} does not exist")
    lines, tail = _read_lines(path)
    if tail:
        return Verification(False, len(lines), f"line {len(lines) + 1}: torn (no newline at the "
                                               f"end of the file): the log was truncated or a "
                                               f"write was cut off", len(lines) + 1)
    hashes, broken = _chain(lines)
    if broken is not None:
        return broken
    emptied = _results_without_log(run_dir, lines)
    if emptied is not None:
        return Verification(False, 0, emptied)
    key = _key(environ)
    head = _read_head(head_path)
    problem = _head_problem(lines, hashes, head, head_path.name, key)
    if problem is not None:
        return Verification(False, len(lines), problem[0], problem[1])
    signed = head is not None and head.get("hmac") is not None
    if anchor_at is not None:
        n, digest = anchor_at
        n = n if n is not None else (head or {}).get("count", len(lines))
        assert expect is not None
        if n < 1 or n > len(lines):
            return Verification(False, len(lines), f"the anchor {expect.strip()} names line {n}, "
                                                   f"the log has {len(lines)} lines: it was "
                                                   f"truncated or rewritten", signed=signed)
        if hashes[n - 1] != digest:
            return Verification(False, len(lines), f"{_entry_name(n, lines[n - 1])} does not "
                                                   f"hash to the anchor {expect.strip()}: the "
                                                   f"log up to it was rewritten (every line "
                                                   f"re-hashed, so the chain alone looks "
                                                   f"intact)", n, signed=signed)
    return Verification(True, len(lines), signed=signed,
                        anchored=expect.strip() if expect is not None else None)


def anchor(run_dir: str | Path, *, environ: dict[str, str] | None = None) -> str:
    """`N:<sha256 of line N>` for the log's head, after verifying the log (AuditError if it
    does not verify: an anchor of a broken log vouches for nothing)."""
    check = verify_log(run_dir, environ=environ)
    if not check.ok:
        raise AuditError(f"{Path(run_dir) / LOG_FILE}: {check.problem}; no anchor printed")
    lines, _ = _read_lines(Path(run_dir) / LOG_FILE)
    if not lines:
        raise AuditError(f"{Path(run_dir) / LOG_FILE} is empty; nothing to anchor")
    return f"{len(lines)}:{line_hash(lines[-1])}"


def reopen_problem(run_dir: str | Path, *, environ: dict[str, str] | None = None
                   ) -> tuple[str, bool] | None:
    """Why a writer may not reopen this run's log as it is, and whether `repair_log` can
    accept it (a log shorter than its head, a missing head); None when it may."""
    run_dir = Path(run_dir)
    lines, _tail = _read_lines(run_dir / LOG_FILE)
    # A torn tail is a crash inside a write, recovered on open; the complete lines decide.
    hashes, broken = _chain(lines)
    if broken is not None:
        return (f"{run_dir / LOG_FILE}: {broken.problem}; run `mosaic audit {run_dir} --verify` "
                f"and restore the log before continuing", False)
    emptied = _results_without_log(run_dir, lines)
    problem = ((emptied, None, True) if emptied is not None else
               _head_problem(lines, hashes, _read_head(run_dir / HEAD_FILE), HEAD_FILE,
                             _key(environ)))
    if problem is None:
        return None
    text, _line, repairable = problem
    how = (f"restore {LOG_FILE} and {HEAD_FILE} from a copy, or accept the log as it is with "
           f"{REPAIR_FLAG} (the repair is logged and the lost entries stay lost)"
           if repairable else f"restore {LOG_FILE} and {HEAD_FILE} from a copy")
    return f"{run_dir / LOG_FILE}: {text}. Refusing to reopen the run: {how}.", repairable


class AuditLog:
    """Appends chained entries to `<run_dir>/audit.jsonl` (one writer per run).

    Opening refuses (`AuditRefused`) a log its head does not vouch for: see `reopen_problem`.
    """

    def __init__(self, run_dir: str | Path, *, _accept_head: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / LOG_FILE
        self.head_path = self.run_dir / HEAD_FILE
        self._ids: dict[str, dict[str, Any]] = {}
        self._prev, self._seq = GENESIS, 0
        self._key = _key()
        if not _accept_head:  # only repair_log accepts a head that does not vouch for the log
            refused = reopen_problem(self.run_dir)
            if refused is not None:
                raise AuditRefused(refused[0])
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
        head: dict[str, Any] = {"count": self._seq, "last": self._prev}
        if self._key is not None:
            head["hmac"] = _mac(self._key, self._seq, self._prev)
        atomic_write_json(self.head_path, head)

    def has(self, event_id: str) -> bool:
        return event_id in self._ids

    def get(self, event_id: str) -> dict[str, Any] | None:
        return self._ids.get(event_id)

    def append(self, event: str, data: dict[str, Any] | None = None, *, round: int | None = None,
               author: str = "system", event_id: str | None = None,
               files: Iterable[str | Path] = ()) -> dict[str, Any]:
        """Append one entry (a no-op returning the earlier entry if `event_id` is logged).
        `data` must fit the event kind's model (`mosaic.audit_events`; ValueError naming the
        field otherwise); `files` are the files (or folders) the event wrote, recorded by
        sha256 so `--verify` can recompute them."""
        if event_id is not None and event_id in self._ids:
            return self._ids[event_id]
        check_data(event, data or {})
        entry = {"seq": self._seq + 1, "time": _now(), "event": event, "round": round,
                 "author": author, "id": event_id, "data": data or {}, "v": ENTRY_VERSION,
                 "files": file_digests(self.run_dir, files), "prev": self._prev}
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


def repair_log(run_dir: str | Path, *, reason: str = "", author: str = "human") -> dict[str, Any]:
    """Accept a log shorter than its head (or one whose head is gone): the head is rewritten
    from the log as it is and an `audit_repaired` entry records what the head said, how many
    entries are lost, and the sha256 of every file an earlier entry recorded, as it is now.
    AuditError when the log cannot be repaired (a broken chain, an edited last line, a bad
    signature: restore it) or needs no repair."""
    run_dir = Path(run_dir)
    refused = reopen_problem(run_dir)
    if refused is None:
        raise AuditError(f"{run_dir / LOG_FILE} needs no repair: its head vouches for it")
    if not refused[1]:
        raise AuditError(refused[0].replace(f", or accept the log as it is with {REPAIR_FLAG}",
                                            ""))
    lines, _ = _read_lines(run_dir / LOG_FILE)
    head = _read_head(run_dir / HEAD_FILE) or {}
    recorded: set[str] = set()
    for raw in lines:
        recorded.update((json.loads(raw).get("files") or {}).keys())
    log = AuditLog(run_dir, _accept_head=True)
    count = head.get("count") if isinstance(head.get("count"), int) else len(lines)
    return log.append("audit_repaired", {
        "head_count": count, "head_last": str(head.get("last") or ""), "lines": len(lines),
        "lost": max(count - len(lines), 0), "last_good": _last_good(lines), "reason": reason,
        "flag": REPAIR_FLAG}, author=author, files=sorted(recorded))


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete entry of a run's audit log (no verification: see `verify_log`)."""
    lines, _ = _read_lines(Path(run_dir) / LOG_FILE)
    return [json.loads(raw) for raw in lines]


def read_entries(run_dir: str | Path) -> list[AuditEntry]:
    """Every complete entry parsed as `AuditEntry` (ValueError/ValidationError on a line that
    is not one; no verification: see `verify_log`)."""
    lines, _ = _read_lines(Path(run_dir) / LOG_FILE)
    return [AuditEntry.model_validate_json(raw) for raw in lines]
