"""`mosaic audit RUN_DIR --verify`: re-check a run folder end to end; stop at the first bad entry.

In order:

1. the audit log's hash chain, sequence numbers and head (`mosaic.audit.verify_log`): an edited,
   deleted, reordered or truncated line is named by its line, seq, event and round; the head's
   HMAC when `MOSAIC_AUDIT_HMAC_KEY` is set (or the head is signed); with `expect`, the anchor
   kept outside the run folder (`mosaic audit --anchor`), which a consistently re-hashed
   forgery cannot match; every entry parses with its event kind's model;
2. every executed action (log order): its logged hash, the copy in the round folder, and a fresh
   check against the run's saved settings (`config.yaml`) and its pools, with the previous
   executed action and the round's seed, as the loop checked it (human limits logged before it
   apply, tighter wins);
3. every manifest: the budget it names is the run's, `total_tokens <= budget`, the buckets sum
   to the totals and stay within their allocations, the seed is the round's, the action hash is
   the executed action's, the pools are the ones the run reads now, it agrees with the audit
   log's `manifest` entry and its completion marker, and `dataset/train.parquet` hashes to
   `output_hash` (and holds the rows and tokens the manifest counts);
4. every trained round: the adapter files and `train_result.json` are there, agree with the
   audit log's `trained` entry, and match the fingerprints its completion marker recorded for
   exactly this training set;
5. every scored round: the eval and held-out reports give the scores the audit log recorded;
   with loop.candidates > 1, every `candidate` entry against `round_<k>/candidates.json` (its
   status, hash, scores, archive figures, kept or not), a candidate that ran re-checked like an
   executed action and its eval reports giving the logged scores, and the round's executed
   action being the kept candidate's;
6. every file an entry recorded by sha256 (`files`: the archive, eval reports with their slice
   means, responses, samples, proposals, round summaries, training sets, adapters, markers):
   each file as it is now against the latest entry that recorded it. A log repaired with
   `--repair-audit` verifies from its `audit_repaired` entry on, and the result lists the
   repair (what the head recorded, how many entries were lost).

The log is the anchor: it is hash-chained, so a manifest edited to match an edited training
file still disagrees with the log. Anyone who can rewrite the whole log and its head can forge
a consistent history: the chain detects edits, it does not authenticate the writer. An anchor
kept elsewhere (`--expect`) or the head's HMAC (a key the forger does not hold) does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mosaic.audit import HEAD_FILE, LOG_FILE, file_digests, read_entries, verify_log
from mosaic.audit_events import AuditEntry, AuditRepaired, CandidateRan, EventData, Executed
from mosaic.schemas import DataAction, DatasetManifest, RunVerification, TrainResult

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_result.json")


class _Bad(Exception):
    """The first bad entry: its description is the verification's problem."""


def _logged_action_hash(action: dict[str, Any]) -> str:
    # As the loop's build node hashes it (agents/nodes.py::_action_hash).
    return hashlib.sha256(json.dumps(action, sort_keys=True).encode()).hexdigest()


def _entry(e: AuditEntry) -> str:
    where = f", round {e.round}" if e.round is not None else ""
    return f"{LOG_FILE} line {e.seq} (seq {e.seq}, {e.event}{where})"


def _payload(e: AuditEntry) -> EventData:
    """The entry's data as its kind's model (the writers' own), or the first bad entry."""
    try:
        return e.payload()
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(data)"
        raise _Bad(f"{_entry(e)}: its data does not fit the {e.event!r} record ({where}: "
                   f"{err['msg']})") from None


def _read_json(path: Path, run_dir: Path) -> Any:
    rel = path.relative_to(run_dir).as_posix()
    if not path.is_file():
        raise _Bad(f"{rel}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _Bad(f"{rel}: unreadable ({type(e).__name__})") from None


def _limits(config: Any, human: dict[str, Any] | None) -> Any:
    """The run's limits with a person's standing limits applied, as the loop applies them."""
    try:
        return config.limits.tightened(human)
    except (TypeError, ValueError, AttributeError, ValidationError):
        return config.limits  # a limits entry of another shape: the run's own limits still bind


def verify_run(run_dir: str | Path, *, expect: str | None = None) -> RunVerification:
    """Re-check the run in `run_dir` (see the module docstring); never raises on a bad folder
    (ValueError only for a malformed `expect`, an anchor from `mosaic audit --anchor`)."""
    run_dir = Path(run_dir)
    out = RunVerification(run_dir=str(run_dir), ok=True)
    try:
        _verify(run_dir, out, expect)
    except _Bad as e:
        return out.model_copy(update={"ok": False, "problem": str(e)})
    return out


def _verify(run_dir: Path, out: RunVerification, expect: str | None) -> None:
    from mosaic.config import ConfigError
    from mosaic.run_store import saved_config

    checked = out.checked
    chain = verify_log(run_dir, expect=expect)
    out.entries, out.signed, out.anchored = chain.entries, chain.signed, chain.anchored
    if not chain.ok:
        raise _Bad(f"{LOG_FILE} {chain.problem}" if chain.problem and chain.problem.startswith(
            "line") else str(chain.problem))
    checked.append(f"{LOG_FILE}: {chain.entries} entries; hash chain, sequence and "
                   f"{HEAD_FILE} intact"
                   + ("; head signature (HMAC) matches" if chain.signed else "")
                   + (f"; line {chain.anchored.split(':')[0]} matches the anchor"
                      if chain.anchored and ":" in chain.anchored else
                      "; the head matches the anchor" if chain.anchored else ""))
    try:
        entries = read_entries(run_dir)
    except (ValueError, ValidationError) as e:
        raise _Bad(f"{LOG_FILE}: an entry is not an audit record ({type(e).__name__})") from None
    payloads = [_payload(e) for e in entries]
    for e, p in zip(entries, payloads):
        if isinstance(p, AuditRepaired):
            out.repairs.append(f"{_entry(e)}: the log was repaired with {p.flag} by {e.author}"
                               f"{f' ({p.reason})' if p.reason else ''}: its head recorded "
                               f"{p.head_count} lines, {p.lines} were left, {p.lost} lost; the "
                               f"last good entry was {p.last_good}")
    try:
        config = saved_config(run_dir)
    except ConfigError as e:
        raise _Bad(f"config.yaml: {e}") from None

    first: dict[tuple[int, str], AuditEntry] = {}
    for e in entries:
        if e.round is not None:
            first.setdefault((e.round, e.event), e)
    previous: DataAction | None = None
    human_limits: dict[str, Any] | None = None
    executed = 0
    kept: dict[int, str | None] = {}  # round -> the kept candidate's action hash
    for e, p in zip(entries, payloads):  # in log order: the first problem is the earliest's
        if e.event == "human_limits":
            # The limits a person set in chat (agents/nodes.py::decide logs the whole set).
            if getattr(p, "accepted", True) and isinstance(getattr(p, "limits", None), dict):
                human_limits = p.limits  # type: ignore[attr-defined]
        elif e.event in ("scores", "baseline"):
            _check_scores(run_dir, e, p, checked)
        elif e.event == "candidate" and e.round is not None:
            assert isinstance(p, CandidateRan)
            _check_candidate(run_dir, config, e, p, previous, human_limits, checked)
            kept.setdefault(e.round, None)
            if p.kept:
                kept[e.round] = p.action_hash
        elif e.event == "executed" and e.round is not None:
            assert isinstance(p, Executed)
            k = e.round
            if k in kept and kept[k] != p.action_hash:
                raise _Bad(f"{_entry(e)}: the executed action is not the kept candidate of "
                           f"round_{k}/candidates.json")
            action = _check_action(run_dir, config, e, p, previous, human_limits, checked)
            previous, executed = action, executed + 1
            logged = first.get((k, "manifest"))
            if logged is None and not (run_dir / f"round_{k}" / "dataset" /
                                       "manifest.json").is_file():
                # The run stopped between deciding and building (resume it): nothing to check.
                checked.append(f"round {k}: executed but not built yet (the run stopped here)")
                continue
            manifest = _check_manifest(run_dir, config, k, action, logged, checked)
            if (k, "trained") in first:
                _check_training(run_dir, k, manifest, first[(k, "trained")], checked)
    if not executed:
        checked.append("no executed actions to re-check")
    _check_files(run_dir, entries, out)


def _check_files(run_dir: Path, entries: list[AuditEntry], out: RunVerification) -> None:
    """Every file an entry recorded, as it is now, against the latest entry recording it."""
    latest: dict[str, tuple[AuditEntry, str]] = {}
    unrecorded = 0
    for e in entries:
        if e.v < 2:
            unrecorded += 1  # written before entries recorded their files' digests
        for rel, digest in e.files.items():
            latest[rel] = (e, digest)
    for rel in sorted(latest, key=lambda r: (latest[r][0].seq, r)):
        e, digest = latest[rel]
        path = run_dir / rel
        if not path.is_file():
            raise _Bad(f"{rel}: missing (recorded by sha256 in {_entry(e)})")
        now = file_digests(run_dir, [path]).get(rel)
        if now != digest:
            raise _Bad(f"{rel}: sha256 differs from the digest {_entry(e)} recorded: the file "
                       f"was changed after it was logged (if the run was stopped while writing "
                       f"it, resume the run, which logs it again)")
    out.files = len(latest)
    out.checked.append(f"{len(latest)} files recorded in the log (archive, eval reports and "
                       f"slice means, responses, samples, proposals, training sets, adapters) "
                       f"match their sha256")
    if unrecorded:
        out.checked.append(f"{unrecorded} entries predate file digests (log entry version 1): "
                           f"their files are covered only by the checks above")


def _check_action(run_dir: Path, config: Any, e: AuditEntry, data: Executed,
                  previous: DataAction | None, human_limits: dict[str, Any] | None,
                  checked: list[str]) -> DataAction:
    k = e.round
    raw = data.action
    if data.action_hash != _logged_action_hash(raw):
        raise _Bad(f"{_entry(e)}: action_hash does not match the action it records")
    held = run_dir / f"round_{k}" / "action.json"
    if held.is_file():
        copy = _read_json(held, run_dir)
        try:
            same = isinstance(copy, dict) and json.loads(copy.get("raw", "")) == raw
        except (ValueError, TypeError):
            same = False
        if not same:
            raise _Bad(f"round_{k}/action.json: differs from the executed action in "
                       f"{_entry(e)}")
    verdict = _recheck(config, e, raw, previous, human_limits, "executed action")
    checked.append(f"round {k}: executed action ({data.decided_by or e.author}) "
                   f"re-checked against config.yaml and the pools: {verdict.status}")
    assert verdict.action is not None
    return verdict.action


def _recheck(config: Any, e: AuditEntry, raw: dict[str, Any], previous: DataAction | None,
             human_limits: dict[str, Any] | None, what: str) -> Any:
    """A fresh check of an action against the saved settings and pools, as the loop checked it
    in round `e.round` (the previous executed action, the round's seed, a person's limits)."""
    from mosaic.tools.run_round import round_seed, run_data
    from mosaic.tools.validate_action import ActionContext, format_problems, validate_action

    k = e.round
    assert k is not None
    try:
        prepared = run_data(config)
    except Exception as exc:  # the pools or tokenizer are gone or unreadable
        raise _Bad(f"round {k}: cannot load the run's pools to re-check the action "
                   f"({type(exc).__name__}: {exc})") from None
    ctx = ActionContext.from_config(config, prepared.prepared, previous_action=previous,
                                    eval_ids=prepared.eval_ids)
    ctx = dataclasses.replace(ctx, limits=_limits(config, human_limits),
                              seed=round_seed(config, k))
    verdict = validate_action(raw, ctx)
    if not verdict.ok or verdict.action is None:
        raise _Bad(f"{_entry(e)}: the {what} fails the check against the saved "
                   f"settings and pools:\n{format_problems(verdict)}")
    return verdict


def _check_candidate(run_dir: Path, config: Any, e: AuditEntry, data: CandidateRan,
                     previous: DataAction | None, human_limits: dict[str, Any] | None,
                     checked: list[str]) -> None:
    """A `candidate` entry against round_<k>/candidates.json; one that ran is re-checked like an
    executed action and its eval reports give the logged scores."""
    from mosaic.tools.candidates import CANDIDATES_FILE, CandidateRound

    k = e.round
    rel = f"round_{k}/{CANDIDATES_FILE}"
    try:
        record = CandidateRound.model_validate(_read_json(run_dir / rel, run_dir))
    except ValidationError:
        raise _Bad(f"{rel}: not a candidates record") from None
    if not 0 <= data.index < len(record.candidates):
        raise _Bad(f"{_entry(e)}: candidate {data.index} is not in {rel}")
    o = record.candidates[data.index]
    logged = {"status": data.status, "kept": data.kept, "duplicate_of": data.duplicate_of,
              "eval": data.eval, "heldout": data.heldout,
              "hypervolume_after": data.hypervolume_after}
    recorded = {"status": o.status, "kept": o.kept, "duplicate_of": o.duplicate_of,
                "eval": o.result.scores, "heldout": o.result.heldout_scores,
                "hypervolume_after": o.decision.hypervolume_after if o.decision else None}
    diff = sorted(n for n in logged if logged[n] != recorded[n])
    if diff:
        raise _Bad(f"{rel}: candidate {data.index} differs from {_entry(e)} in "
                   f"{', '.join(diff)}")
    if o.status == "done":
        assert o.result.action is not None
        raw = o.result.action.model_dump(mode="json")
        if data.action_hash != _logged_action_hash(raw):
            raise _Bad(f"{rel}: candidate {data.index}'s action differs from {_entry(e)}")
        _recheck(config, e, raw, previous, human_limits, f"candidate {data.index}'s action")
        for split, logged_scores in (("eval", data.eval), ("heldout", data.heldout)):
            if not isinstance(logged_scores, dict):
                continue
            rrel = f"round_{k}/candidates/{data.index}/{split}/eval_report.json"
            report = _read_json(run_dir / rrel, run_dir)
            scores = {n: r.get("f") for n, r in (report.get("reports") or {}).items()}
            if scores != logged_scores:
                raise _Bad(f"{rrel}: scores differ from {_entry(e)}")
    checked.append(f"round {k}: candidate {data.index} ({data.status}"
                   f"{', kept' if data.kept else ''}) matches {CANDIDATES_FILE}"
                   + ("; its action re-checked and its reports give the logged scores"
                      if o.status == "done" else ""))


def _check_manifest(run_dir: Path, config: Any, k: int, action: DataAction,
                    logged: AuditEntry | None, checked: list[str]) -> DatasetManifest:
    from mosaic.markers import file_fingerprint, file_sha256
    from mosaic.tools.build_dataset import _action_hash as manifest_action_hash
    from mosaic.tools.run_round import DATASET_MARKER, round_seed, run_data

    rel = f"round_{k}/dataset/manifest.json"
    data = _read_json(run_dir / rel, run_dir)
    try:
        m = DatasetManifest.model_validate(data)
    except ValidationError as e:
        raise _Bad(f"{rel}: not a valid manifest ({e.error_count()} errors)") from None
    budget = config.budget.max_tokens
    if m.budget != budget:
        raise _Bad(f"{rel}: budget {m.budget:,} is not the run's budget {budget:,}")
    if m.total_tokens > m.budget:
        raise _Bad(f"{rel}: total_tokens {m.total_tokens:,} exceeds the budget {m.budget:,}")
    tokens, rows = sum(b.tokens_used for b in m.buckets), sum(b.rows for b in m.buckets)
    if tokens != m.total_tokens:
        raise _Bad(f"{rel}: bucket tokens sum to {tokens:,}, total_tokens says "
                   f"{m.total_tokens:,}")
    if rows != m.total_rows:
        raise _Bad(f"{rel}: bucket rows sum to {rows:,}, total_rows says {m.total_rows:,}")
    for b in m.buckets:
        if b.tokens_used > b.allocation:
            raise _Bad(f"{rel}: bucket {b.objective}/{b.bucket} uses {b.tokens_used:,} tokens "
                       f"over its allocation {b.allocation:,}")
    if m.seed != round_seed(config, k):
        raise _Bad(f"{rel}: seed {m.seed} is not round {k}'s seed {round_seed(config, k)}")
    if m.action_hash != manifest_action_hash(action):
        raise _Bad(f"{rel}: action_hash does not match the executed action")
    pools = run_data(config).prepared.pool_hashes
    changed = sorted(n for n in m.pool_hashes if pools.get(n) != m.pool_hashes[n])
    if changed:
        raise _Bad(f"{rel}: pool_hashes differ from the pools the run reads now: "
                   f"{', '.join(changed)}")
    # A crash between building and logging leaves a manifest the log does not name yet: it is
    # still checked against itself, its marker and its training file.
    ld = logged.data if logged is not None else {}
    for field in ("output_hash", "total_tokens", "total_rows", "budget") if logged else ():
        if ld.get(field) != getattr(m, field):
            raise _Bad(f"{rel}: {field} {getattr(m, field)!r} differs from {_entry(logged)} "
                       f"({ld.get(field)!r})")
    buckets = {f"{b.objective}/{b.bucket}": b.tokens_used for b in m.buckets}
    if logged is not None and "buckets" in ld and ld["buckets"] != buckets:
        raise _Bad(f"{rel}: bucket tokens differ from {_entry(logged)}")
    train = run_dir / f"round_{k}" / "dataset" / "train.parquet"
    trel = train.relative_to(run_dir).as_posix()
    if not train.is_file():
        raise _Bad(f"{trel}: missing")
    if file_sha256(train) != m.output_hash:
        raise _Bad(f"{trel}: sha256 differs from manifest.output_hash")
    _check_parquet(train, trel, m)
    marker = run_dir / f"round_{k}" / DATASET_MARKER
    outputs = (_read_json(marker, run_dir).get("outputs") or {}) if marker.is_file() else {}
    for name in ("dataset/manifest.json", "dataset/train.parquet"):
        path = run_dir / f"round_{k}" / name
        if name in outputs and outputs[name] != file_fingerprint(path):
            raise _Bad(f"round_{k}/{name}: differs from the fingerprint {DATASET_MARKER} "
                       f"recorded when it was built")
    checked.append(f"round {k}: manifest {m.total_tokens:,} tokens <= budget {m.budget:,}, "
                   f"buckets sum, {'matches the log' if logged else 'not yet logged'}; "
                   f"train.parquet sha256 = output_hash")
    return m


def _check_parquet(path: Path, rel: str, m: DatasetManifest) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["tokens"])
    except Exception as e:  # hash matched, so this is a writer/reader mismatch, still a fault
        raise _Bad(f"{rel}: unreadable as parquet ({type(e).__name__})") from None
    if table.num_rows != m.total_rows:
        raise _Bad(f"{rel}: {table.num_rows:,} rows, the manifest counts {m.total_rows:,}")
    tokens = int(pc.sum(table.column("tokens")).as_py() or 0) if table.num_rows else 0
    if tokens != m.total_tokens:
        raise _Bad(f"{rel}: {tokens:,} tokens, the manifest counts {m.total_tokens:,}")


def _check_training(run_dir: Path, k: int, manifest: DatasetManifest,
                    logged: AuditEntry, checked: list[str]) -> None:
    from mosaic.markers import file_fingerprint
    from mosaic.tools.run_round import ADAPTER_MARKER

    adapter = run_dir / f"round_{k}" / "adapter"
    for name in ADAPTER_FILES:
        if not (adapter / name).is_file():
            raise _Bad(f"round_{k}/adapter/{name}: missing (the log records round {k} as "
                       f"trained)")
    rel = f"round_{k}/adapter/train_result.json"
    try:
        result = TrainResult.model_validate(_read_json(adapter / "train_result.json", run_dir))
    except ValidationError:
        raise _Bad(f"{rel}: not a valid train result") from None
    ld = logged.data
    for field, attr in (("train_tokens", "train_tokens"), ("rows", "train_rows"),
                        ("steps", "steps"), ("final_loss", "final_loss")):
        if field in ld and ld[field] != getattr(result, attr):
            raise _Bad(f"{rel}: {attr} {getattr(result, attr)!r} differs from {_entry(logged)} "
                       f"({ld[field]!r})")
    marker = run_dir / f"round_{k}" / ADAPTER_MARKER
    saved = _read_json(marker, run_dir)
    if (saved.get("inputs") or {}).get("dataset") != manifest.output_hash:
        raise _Bad(f"round_{k}/{ADAPTER_MARKER}: the adapter was trained on another training "
                   f"set than round_{k}/dataset/manifest.json names")
    for name, fingerprint in (saved.get("outputs") or {}).items():
        path = run_dir / f"round_{k}" / name
        if not path.is_file():
            raise _Bad(f"round_{k}/{name}: missing")
        if file_fingerprint(path) != fingerprint:
            raise _Bad(f"round_{k}/{name}: differs from the fingerprint {ADAPTER_MARKER} "
                       f"recorded when it was trained")
    checked.append(f"round {k}: adapter and train_result.json present, match the log and "
                   f"{ADAPTER_MARKER}")


def _check_scores(run_dir: Path, e: AuditEntry, data: EventData, checked: list[str]) -> None:
    k = e.round
    for split, key in (("eval", "eval"), ("heldout", "heldout")):
        logged = getattr(data, key)
        if not isinstance(logged, dict):
            continue
        rel = f"round_{k}/{split}/eval_report.json"
        report = _read_json(run_dir / rel, run_dir)
        try:
            scores = {n: r.get("f") for n, r in (report.get("reports") or {}).items()}
        except AttributeError:
            raise _Bad(f"{rel}: not an eval report") from None
        if scores != logged:
            diff = sorted(n for n in set(scores) | set(logged) if scores.get(n) != logged.get(n))
            raise _Bad(f"{rel}: scores differ from {_entry(e)} for {', '.join(diff)}")
    checked.append(f"round {k}: eval/held-out reports give the logged scores")


__all__ = ["verify_run"]
