"""`mosaic audit RUN_DIR --verify`: re-check a run folder end to end; stop at the first bad entry.

In order:

1. the audit log's hash chain, sequence numbers and head (`mosaic.audit.verify_log`): an edited,
   deleted, reordered or truncated line is named by its line, seq, event and round;
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
5. every scored round: the eval and held-out reports give the scores the audit log recorded.

The log is the anchor: it is hash-chained, so a manifest edited to match an edited training
file still disagrees with the log. (Anyone who can rewrite the whole log and its head can forge
a consistent history; the chain detects edits, it does not authenticate the writer.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mosaic.audit import HEAD_FILE, LOG_FILE, verify_log
from mosaic.schemas import DataAction, DatasetManifest, RunVerification, TrainResult

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_result.json")


class _Bad(Exception):
    """The first bad entry: its description is the verification's problem."""


def _logged_action_hash(action: dict[str, Any]) -> str:
    # As the loop's build node hashes it (agents/nodes.py::_action_hash).
    return hashlib.sha256(json.dumps(action, sort_keys=True).encode()).hexdigest()


def _entry(e: dict[str, Any]) -> str:
    where = f", round {e['round']}" if e.get("round") is not None else ""
    return f"{LOG_FILE} line {e['seq']} (seq {e['seq']}, {e['event']}{where})"


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


def verify_run(run_dir: str | Path) -> RunVerification:
    """Re-check the run in `run_dir` (see the module docstring); never raises on a bad folder."""
    run_dir = Path(run_dir)
    checked: list[str] = []
    entries = 0
    try:
        entries = _verify(run_dir, checked)
    except _Bad as e:
        return RunVerification(run_dir=str(run_dir), ok=False, entries=entries, checked=checked,
                               problem=str(e))
    return RunVerification(run_dir=str(run_dir), ok=True, entries=entries, checked=checked)


def _verify(run_dir: Path, checked: list[str]) -> int:
    from mosaic.config import ConfigError
    from mosaic.run_store import saved_config

    chain = verify_log(run_dir)
    if not chain.ok:
        raise _Bad(f"{LOG_FILE} {chain.problem}" if chain.problem and chain.problem.startswith(
            "line") else str(chain.problem))
    checked.append(f"{LOG_FILE}: {chain.entries} entries; hash chain, sequence and "
                   f"{HEAD_FILE} intact")
    entries = [json.loads(raw) for raw in (run_dir / LOG_FILE).read_bytes().split(b"\n") if raw]
    try:
        config = saved_config(run_dir)
    except ConfigError as e:
        raise _Bad(f"config.yaml: {e}") from None

    first: dict[tuple[int, str], dict[str, Any]] = {}
    for e in entries:
        if e.get("round") is not None:
            first.setdefault((e["round"], e["event"]), e)
    previous: DataAction | None = None
    human_limits: dict[str, Any] | None = None
    executed = 0
    for e in entries:  # in log order, so the first problem found is the earliest entry's
        if e["event"] == "human_limits" and isinstance(e.get("data"), dict):
            # The limits a person set in chat (agents/nodes.py::decide logs the whole set).
            if e["data"].get("accepted", True) and isinstance(e["data"].get("limits"), dict):
                human_limits = e["data"]["limits"]
        elif e["event"] in ("scores", "baseline"):
            _check_scores(run_dir, e, checked)
        elif e["event"] == "executed":
            k = e["round"]
            action = _check_action(run_dir, config, e, previous, human_limits, checked)
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
    return chain.entries


def _check_action(run_dir: Path, config: Any, e: dict[str, Any], previous: DataAction | None,
                  human_limits: dict[str, Any] | None, checked: list[str]) -> DataAction:
    from mosaic.tools.run_round import round_seed, run_data
    from mosaic.tools.validate_action import ActionContext, format_problems, validate_action

    k, data = e["round"], e.get("data") or {}
    raw = data.get("action")
    if not isinstance(raw, dict):
        raise _Bad(f"{_entry(e)}: no action recorded")
    if data.get("action_hash") != _logged_action_hash(raw):
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
        raise _Bad(f"{_entry(e)}: the executed action fails the check against the saved "
                   f"settings and pools:\n{format_problems(verdict)}")
    checked.append(f"round {k}: executed action ({data.get('decided_by') or e.get('author')}) "
                   f"re-checked against config.yaml and the pools: {verdict.status}")
    return verdict.action


def _check_manifest(run_dir: Path, config: Any, k: int, action: DataAction,
                    logged: dict[str, Any] | None, checked: list[str]) -> DatasetManifest:
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
    ld = (logged.get("data") or {}) if logged is not None else {}
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
                    logged: dict[str, Any], checked: list[str]) -> None:
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
    ld = logged.get("data") or {}
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


def _check_scores(run_dir: Path, e: dict[str, Any], checked: list[str]) -> None:
    k, data = e["round"], e.get("data") or {}
    for split, key in (("eval", "eval"), ("heldout", "heldout")):
        logged = data.get(key)
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
