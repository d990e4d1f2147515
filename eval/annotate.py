"""Annotation of training pools: a judge's L3 atoms, then the objective type's L2 and L1.

The core is `annotate_batch`, a stage function over a batch of rows: a pandas frame with `id`,
`messages` and whatever atoms the rows already carry goes in; the same rows come out with their
L3 atoms, L2 and L1 filled where the judge labelled them, and `annotation_error` saying why where
it did not. It holds no state but the cache it is handed, so a Ray Data `map_batches` actor (one
judge and cache per actor) calls the same function as the local path and gets the same rows.

`annotate_pool` runs it over a frame batch by batch; `annotate_file` over a pool file, with an
`AtomCache`: atoms stored per conversation and channel under a hash of the content and the
judge's identity (model, prompt templates, settings), committed as each batch is labelled. A
killed run resumes without asking the judge again about any conversation it had labelled; the
annotated pool is written atomically; rows the judge could not label keep empty L1 and are
listed, with the reasons, in a failures file: never dropped, never given a default.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from mosaic.data import (L1_COLUMNS, DataFormatError, load_pool, rows_needing_annotation,
                         write_table)
from mosaic.eval.base import ObjectiveType, get_objective_type
from mosaic.eval.judge import Judge, JudgeError, check_judge_range
from mosaic.io import atomic_write_text
from mosaic.redact import redact

CACHE_VERSION = 1
ERROR_COLUMN = "annotation_error"  # why a row is not annotated (None when it is)
REASON_COLUMN = "annotation_reason"  # a short code for counting: endpoint_http_500, unparsed_reply, ...
REPLY_COLUMN = "annotation_reply"  # the judge's last reply for a failed row (truncated)


# ---- the per-row cache -------------------------------------------------------------------------


class AtomCache:
    """Atoms by content key in one SQLite file. WAL mode: a committed batch survives the process
    being killed, and a reader (a resumed run, a progress probe) never blocks the writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit is durable against a killed process (the data is in the OS);
            # only a power cut may lose the last commits, which are then simply re-judged.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS atoms (key TEXT PRIMARY KEY, "
                             "atoms TEXT NOT NULL)")
            self._db.commit()

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                rows = self._db.execute(f"SELECT key, atoms FROM atoms WHERE key IN "
                                        f"({','.join('?' * len(part))})", part).fetchall()
                for key, text in rows:
                    try:
                        value = json.loads(text)
                    except ValueError:
                        continue  # unreadable entry: labelled again
                    if isinstance(value, dict):
                        out[key] = value
        return out

    def put_many(self, items: Mapping[str, Mapping[str, Any]]) -> None:
        if not items:
            return
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO atoms (key, atoms) VALUES (?, ?)",
                                 [(k, json.dumps(v, sort_keys=True)) for k, v in items.items()])
            self._db.commit()

    def keys(self) -> set[str]:
        with self._lock:
            return {k for (k,) in self._db.execute("SELECT key FROM atoms")}

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM atoms").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def judge_identity(judge: Judge) -> dict[str, Any]:
    ident = getattr(judge, "identity", None)
    return ident() if callable(ident) else {"judge": judge.name}


def atom_key(identity: Mapping[str, Any], type_name: str, channel: str,
             conversation: Sequence[Mapping[str, str]],
             prompt_atoms: Mapping[str, Any] | None = None) -> str:
    """The cache key of one conversation's atoms of one channel: its content (the prompt atoms
    too, for response atoms a type may compute from them) and the judge's identity."""
    payload = {"v": CACHE_VERSION, "judge": identity, "type": type_name, "channel": channel,
               "conversation": [[m["role"], m["content"]] for m in conversation],
               "prompt_atoms": prompt_atoms}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# ---- the stage function ------------------------------------------------------------------------


def _otype(objective_type: str | ObjectiveType) -> ObjectiveType:
    return get_objective_type(objective_type) if isinstance(objective_type, str) else objective_type


def _py(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_py(v) for v in value]
    if isinstance(value, dict):
        return {k: _py(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _parsed(value: Any, source: str, row: int, column: str) -> dict[str, Any] | None:
    """Atoms the row already carries (None when absent); unreadable ones are the user's error."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str):
        raise DataFormatError(source, f"expected a JSON object, got {type(value).__name__}",
                              row=row, field=column)
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise DataFormatError(source, f"not valid JSON: {e.msg}", row=row, field=column) from None
    if not isinstance(obj, dict):
        raise DataFormatError(source, f"expected a JSON object, got {type(obj).__name__}",
                              row=row, field=column)
    return obj


def prompt_part(conversation: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The prompt channel: everything before the final assistant response."""
    conv = [{"role": m["role"], "content": m["content"]} for m in conversation]
    return conv[:-1] if conv and conv[-1]["role"] == "assistant" else conv


@dataclass
class _Failed:
    error: str
    reason: str
    reply: str | None = None


def _ask(judge: Judge, call: Callable[[], Any], n: int, channel: str, wanted: Sequence[str],
         ) -> tuple[list[dict[str, Any] | None], list[_Failed | None]]:
    """One judge call over n conversations -> atoms or why not, per conversation. Bad judge
    output is data (a JudgeError carries what was labelled and why the rest was not); a judge
    that breaks its contract (a wrong count, a non-list) is a bug and raises."""
    failed: list[_Failed | None] = [None] * n
    try:
        got: Any = call()
    except JudgeError as e:
        got = e.partial
        for f in e.failures:
            failed[f.index] = _Failed(f"{channel} atoms: " + ("; ".join(f.errors) or "judge failure"),
                                      f.reason, f.last_reply or None)
    if not isinstance(got, list) or len(got) != n:
        count = len(got) if isinstance(got, list) else type(got).__name__
        raise ValueError(f"judge {judge.name!r} returned {count} {channel} annotations for {n} "
                         f"conversations")
    atoms: list[dict[str, Any] | None] = []
    for i, a in enumerate(got):
        if a is None:
            atoms.append(None)
            failed[i] = failed[i] or _Failed(f"{channel} atoms: the judge returned none",
                                             "judge_failure")
        elif not isinstance(a, Mapping):
            atoms.append(None)
            failed[i] = _Failed(f"{channel} atoms: the judge returned {type(a).__name__}, not "
                                f"an object", "judge_failure")
        elif missing := [k for k in wanted if k not in a]:
            atoms.append(None)
            failed[i] = _Failed(f"{channel} atoms: the judge's labels lack {missing}",
                                "missing_atoms")
        else:
            atoms.append(dict(a))
    return atoms, failed


def annotate_batch(batch: pd.DataFrame, objective_type: str | ObjectiveType, judge: Judge, *,
                   cache: AtomCache | None = None, identity: Mapping[str, Any] | None = None,
                   counts: Counter[str] | None = None, source: str | None = None,
                   row_numbers: Sequence[int] | None = None) -> pd.DataFrame:
    """Rows in -> the same rows with `l3_prompt`, `l3_response`, the L1 columns and the type's
    `l2_*` columns filled, plus `annotation_error` (None where the row is annotated),
    `annotation_reason` (a short code) and `annotation_reply` (the judge's last reply).

    Atoms a row already has are kept (the judge is asked only for the missing channel); a
    conversation whose atoms are in `cache` is not sent to the judge, and identical
    conversations in the batch are sent once. `counts` (optional) tallies cached and judged
    conversations per channel. Atoms in the input that cannot be read or scored are the data's
    error (a DataFormatError naming `source` and the row: `row_numbers`, default the position);
    atoms the judge gave that cannot be scored are that row's annotation error.
    """
    otype = _otype(objective_type)
    source = source or batch.attrs.get("source", "<dataframe>")
    counts = counts if counts is not None else Counter()
    n = len(batch)
    rownum = list(row_numbers) if row_numbers is not None else list(range(n))
    ident = identity if identity is not None else (judge_identity(judge) if cache is not None else {})
    convs = [[{"role": m["role"], "content": m["content"]} for m in _py(msgs)]
             for msgs in batch["messages"].tolist()]

    def existing(col: str) -> list[Any]:
        return batch[col].tolist() if col in batch.columns else [None] * n

    prompts = [_parsed(v, source, rownum[i], "l3_prompt")
               for i, v in enumerate(existing("l3_prompt"))]
    responses = [_parsed(v, source, rownum[i], "l3_response")
                 for i, v in enumerate(existing("l3_response"))]
    given_p = [p is not None for p in prompts]
    given_r = [r is not None for r in responses]
    failed: list[_Failed | None] = [None] * n

    def label(channel: str, rows: list[int], keyed: Callable[[int], str],
              call: Callable[[list[int]], Any], wanted: Sequence[str],
              into: list[dict[str, Any] | None]) -> None:
        keys = {i: keyed(i) for i in rows}
        hits = cache.get_many(keys.values()) if cache is not None else {}
        ask: dict[str, int] = {}  # key -> first row asking it (identical conversations once)
        for i in rows:
            hit = hits.get(keys[i])
            if hit is not None and all(k in hit for k in wanted):
                into[i] = dict(hit)
                counts[f"cached_{channel}"] += 1
            else:
                ask.setdefault(keys[i], i)
        if not ask:
            return
        first = list(ask.values())
        atoms, why = _ask(judge, lambda: call(first), len(first), channel, wanted)
        counts[f"judged_{channel}"] += len(first)
        if cache is not None:
            cache.put_many({keys[i]: a for i, a in zip(first, atoms) if a is not None})
        by_key = {keys[i]: (a, w) for i, a, w in zip(first, atoms, why)}
        for i in rows:
            if into[i] is None and keys[i] in by_key:
                a, w = by_key[keys[i]]
                if a is not None:
                    into[i] = dict(a)
                else:
                    failed[i] = w

    # Prompt channel: from the conversation before the scored reply.
    need_p = [i for i in range(n) if prompts[i] is None]
    if need_p and otype.prompt_atoms_from_data:
        for i in need_p:
            failed[i] = _Failed(f"prompt atoms: {otype.type_name!r} prompt atoms "
                                f"({', '.join(otype.prompt_atoms)}) come from the data, not a "
                                f"judge; import the pool with them (mosaic import "
                                f"--instruction-ids/--kwargs)", "atoms_from_data")
    elif need_p:
        parts = {i: prompt_part(convs[i]) for i in need_p}
        label("prompt", need_p,
              lambda i: atom_key(ident, otype.type_name, "prompt", parts[i]),
              lambda rows: judge.prompt_atoms(otype.type_name, [parts[i] for i in rows]),
              otype.prompt_atoms, prompts)

    # Response channel: from the whole conversation, given the prompt atoms.
    need_r = [i for i in range(n) if responses[i] is None and prompts[i] is not None
              and failed[i] is None]
    if need_r:
        label("response", need_r,
              lambda i: atom_key(ident, otype.type_name, "response", convs[i], prompts[i]),
              lambda rows: judge.response_atoms(otype.type_name, [convs[i] for i in rows],
                                                [prompts[i] for i in rows]),
              otype.response_atoms, responses)

    l1: dict[str, list[Any]] = {c: [None] * n for c in L1_COLUMNS}
    l2: dict[str, list[Any]] = {f: [None] * n for f in otype.l2_columns}
    for i in range(n):
        if failed[i] is not None or prompts[i] is None or responses[i] is None:
            failed[i] = failed[i] or _Failed("no atoms", "judge_failure")
            continue
        try:
            l2_i, l1_i = otype.score(prompts[i], responses[i])
        except (KeyError, TypeError, ValueError) as e:
            if given_p[i] and given_r[i]:
                raise DataFormatError(source, f"cannot score the row's L3 atoms "
                                              f"({otype.type_name}): {e!r}", row=rownum[i],
                                      field="l3_prompt/l3_response") from None
            failed[i] = _Failed(f"the atoms do not fit {otype.type_name!r}: "
                                f"{type(e).__name__}: {e}", "unscorable")
            continue
        for c in L1_COLUMNS:
            l1[c][i] = getattr(l1_i, c)
        for f in otype.l2_columns:
            l2[f][i] = l2_i[f]

    out = batch.copy()
    # Sorted keys: the same atoms give the same text whether they came from the judge or the cache.
    out["l3_prompt"] = [json.dumps(p, ensure_ascii=False, sort_keys=True) if p is not None else None
                        for p in prompts]
    out["l3_response"] = [json.dumps(r, ensure_ascii=False, sort_keys=True) if r is not None
                          else None for r in responses]
    ok = [f is None for f in failed]
    out["slice"] = pd.Series([s if k else None for s, k in zip(l1["slice"], ok)],
                             index=out.index, dtype=object)
    out["score"] = pd.array([float(v) if k else None for v, k in zip(l1["score"], ok)], "Float64")
    out["valid"] = pd.array([bool(v) if k else None for v, k in zip(l1["valid"], ok)], "boolean")
    out["weight"] = pd.array([float(v) if k else None for v, k in zip(l1["weight"], ok)], "Float64")
    out["failure"] = pd.array([bool(v) if k else None for v, k in zip(l1["failure"], ok)], "boolean")
    for f in otype.l2_columns:
        out[f"l2_{f}"] = pd.Series(l2[f], index=out.index, dtype=object)
    out[ERROR_COLUMN] = pd.Series([f.error if f else None for f in failed], index=out.index,
                                  dtype=object)
    out[REASON_COLUMN] = pd.Series([f.reason if f else None for f in failed], index=out.index,
                                   dtype=object)
    out[REPLY_COLUMN] = pd.Series([f.reply[:2000] if f and f.reply else None for f in failed],
                                  index=out.index, dtype=object)
    return out


# ---- over a frame and a file -------------------------------------------------------------------


@dataclass
class RowFailure:
    """A pool row left unannotated: where it is and why."""

    row: int
    id: str
    error: str
    reason: str
    last_reply: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "id": self.id, "reason": self.reason, "error": self.error,
                "last_reply": self.last_reply}


@dataclass
class Annotated:
    """A pool after annotation: every row (failed ones with empty L1) and the failures."""

    frame: pd.DataFrame
    failures: list[RowFailure]
    rows_todo: int  # rows that needed annotation
    counts: Counter[str] = field(default_factory=Counter)
    # The judges' request counts, tokens and cost, summed over the Ray workers (None on the
    # local engine: the caller's judge holds them).
    judge_stats: dict[str, Any] | None = None
    # Seconds each Ray worker spent annotating its batches (from the batches that came back):
    # beside the stage's wall time, what Ray's start and transfers cost. Empty on local.
    worker_seconds: dict[str, float] = field(default_factory=dict)


def _column(values: list[Any]) -> Any:
    """A pool column from per-row Python values (lists become an Arrow list column)."""
    if any(isinstance(v, list) for v in values):
        arr = pa.array(values)
        if pa.types.is_null(arr.type.value_type):
            arr = arr.cast(pa.list_(pa.string()))
        return pd.arrays.ArrowExtensionArray(arr)
    return values


class EndpointDown(RuntimeError):
    """Every request of a batch failed for good: the endpoint is down, not a row's problem."""


class WorkersLost(RuntimeError):
    """The Ray pipeline failed for good (a worker died past its restarts, a node was lost)."""


def _cell(value: Any) -> Any:
    """A frame cell as a plain JSON value (missing values of any kind become None)."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return _py(value)


def _result_columns(otype: ObjectiveType) -> list[str]:
    return ["l3_prompt", "l3_response", *L1_COLUMNS, *(f"l2_{f}" for f in otype.l2_columns),
            ERROR_COLUMN, REASON_COLUMN, REPLY_COLUMN]


def _endpoint_down(results: Sequence[Mapping[str, Any]]) -> EndpointDown | None:
    reasons = [r[REASON_COLUMN] for r in results]
    if reasons and all(isinstance(r, str) and r.startswith("endpoint_") for r in reasons):
        return EndpointDown(f"every request of the last batch failed for good, e.g. "
                            f"{results[0][ERROR_COLUMN]}; stopping (the endpoint looks down). "
                            f"Rows labelled so far are cached: rerun to resume")
    return None


def annotate_pool(df: pd.DataFrame, objective_type: str | ObjectiveType, judge: Judge, *,
                  batch_size: int = 512, rescore: bool = False, cache: AtomCache | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  ray_config: Any = None) -> Annotated:
    """`annotate_batch` over the rows that need it (all with `rescore`), `batch_size` at a time.
    Rows already annotated are left as they are; the input frame is not changed. A batch whose
    every row failed on its endpoint stops the run (EndpointDown): going on would only list
    every remaining row as failed; the cache keeps what was labelled.

    `ray_config` (a MosaicConfig whose `runtime.engine` is `ray`) runs the batches through Ray
    Data instead (`AnnotateStage`: one judge built from that config per worker, each with its
    own connection to `cache`); the same batches, so the same rows, atoms and counts."""
    otype = _otype(objective_type)
    source = df.attrs.get("source", "<dataframe>")
    todo = np.flatnonzero(np.ones(len(df), dtype=bool) if rescore
                          else rows_needing_annotation(df, otype))
    counts: Counter[str] = Counter()
    out = df.copy()
    if todo.size == 0:
        return Annotated(out, [], 0, counts)
    cols = _result_columns(otype)
    judge_stats: dict[str, Any] | None = None
    worker_seconds: dict[str, float] = {}
    if ray_config is not None and ray_config.runtime.engine == "ray":
        results, judge_stats, worker_seconds = _annotate_on_ray(df, todo, otype, judge, ray_config, cache=cache,
                                                batch_size=batch_size, counts=counts,
                                                source=source, progress=progress)
    else:
        ident = judge_identity(judge) if cache is not None else None
        work = df.iloc[todo]
        results = []
        for start in range(0, todo.size, batch_size):
            got = annotate_batch(work.iloc[start:start + batch_size], otype, judge, cache=cache,
                                 identity=ident, counts=counts, source=source,
                                 row_numbers=[int(i) for i in todo[start:start + batch_size]])
            part = [dict(zip(cols, values)) for values in
                    zip(*([_cell(v) for v in got[c].tolist()] for c in cols))]
            if (down := _endpoint_down(part)) is not None:
                raise down
            results.extend(part)
            if progress is not None:
                progress(min(start + batch_size, todo.size), todo.size)
    new = {c: [r[c] for r in results] for c in cols}

    def merged(col: str) -> list[Any]:
        base = [_py(v) for v in df[col].tolist()] if col in df.columns else [None] * len(df)
        for j, i in enumerate(todo):
            base[int(i)] = new[col][j]
        return [None if v is pd.NA or (isinstance(v, float) and np.isnan(v)) else v for v in base]

    out["l3_prompt"] = pd.Series(merged("l3_prompt"), index=out.index, dtype=object)
    out["l3_response"] = pd.Series(merged("l3_response"), index=out.index, dtype=object)
    out["slice"] = pd.Series(merged("slice"), index=out.index, dtype=object)
    out["score"] = pd.array(merged("score"), "Float64")
    out["valid"] = pd.array(merged("valid"), "boolean")
    out["weight"] = pd.array(merged("weight"), "Float64")
    out["failure"] = pd.array(merged("failure"), "boolean")
    for f in otype.l2_columns:
        values = merged(f"l2_{f}")
        out[f"l2_{f}"] = pd.Series(_column(values), index=out.index)
    ids = df["id"].astype(str).tolist()
    failures = [RowFailure(row=int(i), id=ids[int(i)], error=new[ERROR_COLUMN][j],
                           reason=new[REASON_COLUMN][j], last_reply=new[REPLY_COLUMN][j])
                for j, i in enumerate(todo) if new[ERROR_COLUMN][j] is not None]
    return Annotated(out, failures, int(todo.size), counts, judge_stats, worker_seconds)


# ---- on Ray Data ---------------------------------------------------------------------------------

TALLY = "_tally"  # a batch's counts and its worker's judge stats, on the batch's first result
DATA_ERROR = "_data_error"  # a batch's DataFormatError, on its first result


class AnnotateStage:
    """`annotate_batch` as a batch stage (`mosaic.engine`): one judge per worker, built from the
    config (an LLM judge keeps its endpoint's `concurrency` requests in flight, per worker), and
    its own connection to the shared atom cache, so a batch's atoms are committed by the worker
    that judged them: a worker killed mid-batch loses only what it had not committed, and its
    rerun (or a resumed run) asks the judge only about the rest."""

    def __init__(self, config: dict[str, Any], objective_type: str, cache_path: str | None,
                 source: str) -> None:
        from uuid import uuid4

        from mosaic.config import MosaicConfig
        from mosaic.eval import build_judge

        cfg = MosaicConfig.model_validate(config)
        self.judge = build_judge(cfg, request_cache=False, record_endpoint_errors=True)
        self.otype = get_objective_type(objective_type)
        self.cache = AtomCache(cache_path) if cache_path is not None else None
        self.identity = judge_identity(self.judge)
        self.source = source
        self.worker = uuid4().hex  # a restarted worker is another one (its stats start at 0)
        self.batches = 0
        self.seconds = 0.0  # spent in annotate_batch

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        frame = pd.DataFrame({"id": [r["id"] for r in rows],
                              "messages": [r["messages"] for r in rows],
                              "l3_prompt": [r["l3_prompt"] for r in rows],
                              "l3_response": [r["l3_response"] for r in rows]})
        counts: Counter[str] = Counter()
        start = time.perf_counter()
        try:
            got = annotate_batch(frame, self.otype, self.judge, cache=self.cache,
                                 identity=self.identity if self.cache is not None else None,
                                 counts=counts, source=self.source,
                                 row_numbers=[r["row"] for r in rows])
        except DataFormatError as e:
            # The data's error, not the worker's: sent back as a result (raised, Ray would
            # rerun the batch max_retries times and hand the caller a wrapped exception).
            error = {"path": e.path, "message": e.message, "row": e.row, "field": e.field,
                     "line": e.line}
            return [{DATA_ERROR: error}, *({} for _ in rows[1:])]
        cols = _result_columns(self.otype)
        results = [dict(zip(cols, values)) for values in
                   zip(*([_cell(v) for v in got[c].tolist()] for c in cols))]
        self.batches += 1
        self.seconds += time.perf_counter() - start
        # Stats are cumulative per worker: the driver keeps each worker's latest and sums them.
        results[0][TALLY] = {"worker": self.worker, "batch": self.batches, "counts": dict(counts),
                             "seconds": self.seconds,
                             "identity": self.identity,
                             "stats": _py(dict(getattr(self.judge, "stats", {}) or {}))}
        return results


def _add_stats(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two judges' stats summed key by key (numbers added, nested dicts merged, None where
    neither has a number: a cost without a configured price)."""
    out: dict[str, Any] = dict(a)
    for k, v in b.items():
        if k not in out or out[k] is None:
            out[k] = v
        elif isinstance(v, Mapping) and isinstance(out[k], Mapping):
            out[k] = _add_stats(out[k], v)
        elif isinstance(v, (int, float)) and isinstance(out[k], (int, float)):
            out[k] = out[k] + v
    return out


def _annotate_on_ray(df: pd.DataFrame, todo: np.ndarray, otype: ObjectiveType, judge: Judge,
                     config: Any, *, cache: AtomCache | None, batch_size: int,
                     counts: Counter[str], source: str,
                     progress: Callable[[int, int], None] | None,
                     ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float]]:
    from mosaic.engine import map_rows

    def atoms(v: Any) -> str | None:
        v = _cell(v)
        return json.dumps(v, ensure_ascii=False) if isinstance(v, Mapping) else v

    def column(col: str) -> list[Any]:
        return df[col].tolist() if col in df.columns else [None] * len(df)

    ids, msgs = df["id"].astype(str).tolist(), df["messages"].tolist()
    l3p, l3r = column("l3_prompt"), column("l3_response")
    rows = [{"row": int(i), "id": ids[i],
             "messages": [{"role": m["role"], "content": m["content"]} for m in _py(msgs[i])],
             "l3_prompt": atoms(l3p[i]), "l3_response": atoms(l3r[i])} for i in todo]
    mine = judge_identity(judge)
    latest: dict[str, dict[str, Any]] = {}  # worker -> its latest tally
    done = 0

    def on_part(positions: list[int], results: list[Any]) -> None:
        nonlocal done
        if results and DATA_ERROR in results[0]:
            e = results[0][DATA_ERROR]
            raise DataFormatError(e["path"], e["message"], row=e["row"], field=e["field"],
                                  line=e["line"])
        for r in results:
            tally = r.pop(TALLY, None)
            if tally is None:
                continue
            if tally["identity"] != mine:
                # Keys hash the judge's identity: a worker with other templates or another
                # model would label differently and cache under other keys.
                raise RuntimeError(f"a Ray worker's judge is not this process's judge "
                                   f"({tally['identity']} != {mine}); install the same MOSAIC "
                                   f"and prompts on every node")
            counts.update(tally["counts"])
            if tally["batch"] > latest.get(tally["worker"], {}).get("batch", 0):
                latest[tally["worker"]] = tally
        if (down := _endpoint_down(results)) is not None:
            raise down
        done += len(positions)
        if progress is not None:
            progress(done, len(rows))

    import ray

    try:
        results = map_rows(AnnotateStage, rows, kwargs={
            "config": config.model_dump(mode="json"), "objective_type": otype.type_name,
            "cache_path": str(cache.path.resolve()) if cache is not None else None,
            "source": str(source)}, runtime=config.runtime, batch_rows=batch_size,
            what="annotation", on_part=on_part)
    except ray.exceptions.RayError as e:
        raise WorkersLost(f"the Ray pipeline failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''} (workers restart at most "
                          f"runtime.ray.max_retries={config.runtime.ray.max_retries} times). "
                          f"Rows labelled so far are cached: rerun to resume") from e
    stats: dict[str, Any] = {}
    for tally in latest.values():
        stats = _add_stats(stats, tally["stats"])
    return results, stats, {w: t["seconds"] for w, t in latest.items()}


@dataclass
class AnnotateSummary:
    """What `annotate_file` did, for the terminal and the tests."""

    source: Path
    out: Path
    failures_file: Path | None
    rows: int
    rows_todo: int
    annotated: int
    failed: int
    counts: dict[str, int]
    judge_stats: dict[str, Any]
    seconds: float
    warnings: list[str]
    failure_reasons: dict[str, int]

    @property
    def rows_per_second(self) -> float:
        return self.rows_todo / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {"source": str(self.source), "out": str(self.out),
                "failures_file": str(self.failures_file) if self.failures_file else None,
                "rows": self.rows, "rows_todo": self.rows_todo, "annotated": self.annotated,
                "failed": self.failed, "failure_reasons": self.failure_reasons,
                "counts": self.counts, "judge_stats": self.judge_stats,
                "seconds": self.seconds, "rows_per_second": self.rows_per_second,
                "warnings": self.warnings}


def failures_path(out: str | Path) -> Path:
    """Where the failed rows of a pool written to `out` are listed: `<stem>.failed.jsonl`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.failed.jsonl")


def annotate_file(path: str | Path, objective_type: str, judge: Judge, *,
                  out: str | Path | None = None, objective: str | None = None,
                  cache: AtomCache | None = None, batch_size: int = 64, rescore: bool = False,
                  allow_out_of_range: bool = False, secrets: Sequence[str] = (),
                  progress: Callable[[int, int], None] | None = None,
                  ray_config: Any = None) -> AnnotateSummary:
    """Annotate the pool file `path` (written to `out`, default in place) with `judge`.

    Refuses (JudgeRangeError) a sandbox-only judge on a file that is not sandbox text unless
    `allow_out_of_range`. Failed rows are listed in `<out stem>.failed.jsonl` (replies redacted
    of `secrets`); a rerun asks the judge only about rows not in `cache`. `ray_config`: run on
    Ray Data when its `runtime.engine` is `ray` (`annotate_pool`).
    """
    path = Path(path)
    out = Path(out) if out is not None else path
    warnings = check_judge_range(judge, [path], allow=allow_out_of_range)
    start = time.perf_counter()
    df = load_pool(path, objective_type, objective)
    result = annotate_pool(df, objective_type, judge, batch_size=batch_size, rescore=rescore,
                           cache=cache, progress=progress, ray_config=ray_config)
    write_table(out, result.frame)
    failed_file = failures_path(out)
    if result.failures:
        lines = [json.dumps({**f.as_dict(), "error": redact(f.error, secrets),
                             "last_reply": redact(f.last_reply, secrets) if f.last_reply else None},
                            ensure_ascii=False) for f in result.failures]
        atomic_write_text(failed_file, "\n".join(lines) + "\n")
    else:
        failed_file.unlink(missing_ok=True)  # a list from an earlier run no longer holds
    reasons = Counter(f.reason for f in result.failures)
    return AnnotateSummary(
        source=path, out=out, failures_file=failed_file if result.failures else None,
        rows=len(df), rows_todo=result.rows_todo,
        annotated=result.rows_todo - len(result.failures), failed=len(result.failures),
        counts=dict(result.counts),
        judge_stats=(result.judge_stats if result.judge_stats is not None
                     else dict(getattr(judge, "stats", {}) or {})),
        seconds=time.perf_counter() - start, warnings=warnings, failure_reasons=dict(reasons))
