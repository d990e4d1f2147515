"""Pool preparation: the static, per-pool work no action can change, done once per run.

Every conversation is fingerprinted (`hashing`), over-long conversations are windowed by whole
turns, and rows that would put an eval item into training, rows with invalid labels, and exact
or normalised duplicates are dropped. The eval guard drops a row if any prefix of its user
turns, normalised (NFKC, case, whitespace), equals an eval or held-out prompt, checked on the
conversation as stored and as windowed. What is left are the `Candidates` that both the check
and the builder draw from, so the check's "this bucket can supply N tokens" is exactly what the
builder will find.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mosaic.data import ROLES
from mosaic.eval.base import ObjectiveType, get_objective_type
from mosaic.tools.dataset.hashing import (ASSISTANT, SYSTEM, USER, MessageIndex, PoolError,
                                          _contents, _fmix, _prefix_hits, _rank_within,
                                          _row_chunks, _seq_hash, _string_buffers, _structure,
                                          _xxh_spans, cached_message_index, eval_prompt_hashes,
                                          message_index, normalise_text, pool_content_hash)
from mosaic.tools.dataset.token_counts import TokenCounts, cached_token_counts

if TYPE_CHECKING:
    from mosaic.config import MosaicConfig

REQUIRED_COLUMNS = ("id", "prompt_id", "messages", "slice", "score", "valid")
# Drop reasons in the order they are applied; a row is counted under the first that hits it.
STATIC_REASONS = ("too_long", "eval_overlap", "invalid_label", "duplicate_exact",
                  "duplicate_normalised")


@dataclass
class Candidates:
    """The rows of one pool that any action may draw from, for one training method."""

    objective: str
    otype: ObjectiveType
    n_pool_rows: int
    rows: np.ndarray  # pool row of each candidate
    buckets: list[str]  # distinct slices, sorted
    bucket: np.ndarray  # int32 index into `buckets`
    score: np.ndarray  # float64
    tokens: np.ndarray  # int64 (after windowing)
    last_tokens: np.ndarray | None  # tokens of the final assistant message (DPO pair budget)
    window_start: np.ndarray  # int64: first kept non-system message; 0 = not windowed
    prompt_code: np.ndarray  # int64: dictionary code of prompt_id
    prompt_raw: np.ndarray  # uint64: exact hash of every message but the last (DPO; SFT: 0)
    focus_table: pa.Table  # the type's focus columns, candidate rows only
    dropped: dict[str, int]
    windowed: int  # over-long rows shortened by whole turns instead of dropped
    _pandas: pd.DataFrame | None = field(default=None, repr=False)

    def focus_frame(self) -> pd.DataFrame:
        if self._pandas is None:
            self._pandas = self.focus_table.to_pandas(types_mapper=pd.ArrowDtype)
        return self._pandas


@dataclass
class _Static:
    """One pool's rows after the static steps of one method, before cross-pool dedup."""

    alive: np.ndarray  # bool per pool row; dedup clears more
    hashes: dict[str, np.ndarray]  # "exact" / "norm" -> uint64 row identity
    prompt_raw: np.ndarray
    tokens: np.ndarray
    last_tokens: np.ndarray | None
    window_start: np.ndarray
    dropped: dict[str, int]
    windowed: int


def _fast_focus_mask(table: pa.Table, spec: Any, value: Any) -> np.ndarray:
    col = table.column(spec.column).combine_chunks()
    n = len(col)
    if spec.kind == "range":
        lo, hi = value
        arr = col.to_numpy(zero_copy_only=False).astype(float)
        return (arr >= lo) & (arr <= hi)
    if spec.is_list:
        flat = pc.list_flatten(col)
        parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
        hit = pc.is_in(flat, value_set=pa.array(list(value)).cast(flat.type)).fill_null(False)
        hit = hit.to_numpy(zero_copy_only=False)
        return np.bincount(parents[hit], minlength=n) > 0
    vs = pa.array(list(value)).cast(col.type)
    return pc.is_in(col, value_set=vs).fill_null(False).to_numpy(zero_copy_only=False)


def criteria_mask(cands: Candidates, criteria: Mapping[str, Any]) -> np.ndarray:
    """Candidates matching ANY criterion. Built-in types use an Arrow fast path with the same
    semantics as `ObjectiveType.focus_mask`; a plug-in type that overrides it is honoured."""
    otype = cands.otype
    mask = np.zeros(len(cands.rows), dtype=bool)
    custom = type(otype).focus_mask is not ObjectiveType.focus_mask
    for key, value in criteria.items():
        spec = otype.focus_keys[key]
        if custom:
            mask |= np.asarray(otype.focus_mask(cands.focus_frame(), key, value), dtype=bool)
            continue
        try:
            mask |= _fast_focus_mask(cands.focus_table, spec, value)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            # Values of another type than the column (e.g. ints for a string column) match
            # nothing in the fast path's cast; pandas compares them the same way focus_mask does.
            mask |= np.asarray(otype.focus_mask(cands.focus_frame(), key, value), dtype=bool)
    return mask


def _check_pool(name: str, table: pa.Table, otype: ObjectiveType, counts: TokenCounts,
                index: MessageIndex, where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    focus_cols = sorted({k.column for k in otype.focus_keys.values()})
    missing += [c for c in focus_cols if c not in table.column_names]
    if missing:
        raise PoolError(f"{where}: missing column(s) {missing}; pools of type {otype.type_name!r} "
                        f"need {list(REQUIRED_COLUMNS) + focus_cols} (docs/data-format.md)")
    n = table.num_rows
    score_t = table.schema.field("score").type
    if not (pa.types.is_floating(score_t) or pa.types.is_integer(score_t)):
        raise PoolError(f"{where}: column 'score' must be numeric, got {score_t}")
    score = table.column("score").to_numpy().astype(float)
    bad = np.flatnonzero(~np.isfinite(score))
    if len(bad):
        raise PoolError(f"{where}: row {int(bad[0])}: score is {score[bad[0]]}; expected a "
                        f"finite number in [1, 5]")
    for col in ("slice", "prompt_id", "id", "valid"):
        if table.column(col).null_count:
            row = int(np.flatnonzero(~pc.is_valid(table.column(col)).to_numpy(zero_copy_only=False))[0])
            raise PoolError(f"{where}: row {row}: {col!r} is null")
    if len(counts.row) != n:
        raise PoolError(f"{where}: token counts have {len(counts.row)} entries for {n} rows")
    bad = np.flatnonzero(counts.row < 1)
    if len(bad):
        raise PoolError(f"{where}: row {int(bad[0])}: token count {counts.row[bad[0]]} < 1")
    if len(index.offsets) != n + 1:
        raise PoolError(f"{where}: message index covers {len(index.offsets) - 1} rows, the pool "
                        f"has {n} (a stale cache?)")
    n_msg = int(index.offsets[-1])
    if counts.message is not None and len(counts.message) != n_msg:
        raise PoolError(f"{where}: per-message token counts have {len(counts.message)} entries "
                        f"for {n_msg} messages")
    lengths = np.diff(index.offsets)
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise PoolError(f"{where}: row {int(empty[0])}: 'messages' is empty")
    last_role = index.role[index.offsets[1:] - 1]
    bad = np.flatnonzero(last_role != ASSISTANT)
    if len(bad):
        raise PoolError(f"{where}: row {int(bad[0])}: the last message must be the assistant "
                        f"response being scored, got role {ROLES[last_role[bad[0]]]!r}")


class PreparedPools:
    """Pools after the static steps, ready for any number of actions (validator and builder).

    Both the check and the build read availability from here, so the check's "this bucket can
    supply N tokens" is exactly what the builder will find.
    """

    def __init__(self, pools: Mapping[str, pa.Table | pd.DataFrame],
                 objective_types: Mapping[str, str | ObjectiveType],
                 token_counts: Mapping[str, TokenCounts | np.ndarray],
                 eval_hashes: np.ndarray | Sequence[int] | None = None, *,
                 max_length: int | None = None,
                 indexes: Mapping[str, MessageIndex] | None = None,
                 pool_hashes: Mapping[str, str] | None = None,
                 sources: Mapping[str, str] | None = None) -> None:
        self.objectives = list(pools)
        self.max_length = max_length
        self.sources = dict(sources or {})
        self.eval_hashes = np.unique(np.asarray(eval_hashes if eval_hashes is not None else [],
                                                dtype=np.uint64))
        self.tables: dict[str, pa.Table] = {}
        self.types: dict[str, ObjectiveType] = {}
        self.counts: dict[str, TokenCounts] = {}
        self.indexes: dict[str, MessageIndex] = {}
        self.pool_hashes: dict[str, str] = {}
        for name, pool in pools.items():
            where = self.where(name)
            table = pa.Table.from_pandas(pool, preserve_index=False) if isinstance(pool, pd.DataFrame) else pool
            if name not in objective_types:
                raise PoolError(f"{where}: no objective type given for pool {name!r}")
            t = objective_types[name]
            self.types[name] = get_objective_type(t) if isinstance(t, str) else t
            if name not in token_counts:
                raise PoolError(f"{where}: no token counts given")
            self.counts[name] = TokenCounts.coerce(token_counts[name])
            if "messages" not in table.column_names:
                raise PoolError(f"{where}: missing column 'messages'")
            self.indexes[name] = (indexes[name] if indexes and name in indexes
                                  else message_index(table.column("messages"), where=where))
            _check_pool(name, table, self.types[name], self.counts[name], self.indexes[name], where)
            self.tables[name] = table
            self.pool_hashes[name] = (pool_hashes[name] if pool_hashes and name in pool_hashes
                                      else pool_content_hash(table))
        self._cands: dict[str, dict[str, Candidates]] = {}

    def where(self, name: str) -> str:
        src = self.sources.get(name)
        return f"pool {name!r}" + (f" ({src})" if src else "")

    def candidates(self, method: str) -> dict[str, Candidates]:
        if method not in self._cands:
            self._cands[method] = self._prepare(method)
        return self._cands[method]

    def _prepare(self, method: str) -> dict[str, Candidates]:
        staged = {name: self._static(name, method) for name in self.objectives}
        # Duplicates are removed across all pools: first occurrence (pool order, row order) wins.
        for kind, reason in (("exact", "duplicate_exact"), ("norm", "duplicate_normalised")):
            hashes = np.concatenate([s.hashes[kind][s.alive] for s in staged.values()])
            # A hash table (pandas), not a sort: O(n), and keep="first" is the rule above.
            dup = pd.Series(hashes).duplicated(keep="first").to_numpy()
            start = 0
            for s in staged.values():
                alive_idx = np.flatnonzero(s.alive)
                d = dup[start:start + len(alive_idx)]
                start += len(alive_idx)
                s.dropped[reason] = int(d.sum())
                s.alive[alive_idx[d]] = False
        return {name: self._finish(name, staged[name]) for name in self.objectives}

    def _static(self, name: str, method: str) -> "_Static":
        table, idx, counts = self.tables[name], self.indexes[name], self.counts[name]
        n = table.num_rows
        lengths = np.diff(idx.offsets)
        parent = np.repeat(np.arange(n), lengths)
        pos = np.arange(len(parent)) - idx.offsets[parent]
        tokens = counts.row.astype(np.int64).copy()
        window_start = np.zeros(n, dtype=np.int64)
        too_long = np.zeros(n, dtype=bool)
        windowed = 0
        if self.max_length is not None:
            over = tokens > self.max_length
            if over.any():
                if method == "sft" and counts.message is not None:
                    ok_rows, starts, new_tokens = _windows(over, parent, pos, idx.role,
                                                           counts.message, tokens, self.max_length)
                    window_start[ok_rows] = starts
                    tokens[ok_rows] = new_tokens
                    too_long = over.copy()
                    too_long[ok_rows] = False
                    windowed = len(ok_rows)
                else:
                    too_long = over
        # Identity of the conversation as stored: its concatenated contents (one xxh3 in the
        # index) and its (role, length) sequence, which places the message boundaries.
        struct_raw = _seq_hash(_structure(idx.raw_len, idx.role), parent, pos, n)
        struct_norm = _seq_hash(_structure(idx.norm_len, idx.role), parent, pos, n)
        hash_exact = _fmix(idx.row_raw ^ struct_raw)
        hash_norm = _fmix(idx.row_norm ^ struct_norm)
        is_user = idx.role == USER
        pu = parent[is_user]
        overlap = _prefix_hits(idx.user_norm[is_user], pu, _rank_within(pu, n), n, self.eval_hashes)
        content = None
        if windowed:
            # The guard looks at the conversation as it is in the pool AND as it will be trained
            # (a window starts at a later user turn, which may begin an eval prompt): a row
            # whose original is an eval conversation stays out even when windowing would
            # disguise it. Identity (dedup) is that of the window.
            kept = (window_start[parent] > 0) & ((idx.role == SYSTEM) | (pos >= window_start[parent]))
            wu = kept & is_user
            pw = parent[wu]
            overlap |= _prefix_hits(idx.user_norm[wu], pw, _rank_within(pw, n), n, self.eval_hashes)
            content = _contents(table)
            wrows = np.flatnonzero(window_start > 0)
            pk = parent[kept]
            rk = _rank_within(pk, n)
            row_off = np.concatenate([[0], np.cumsum(np.bincount(pk, minlength=n)[wrows])])
            spans = {"exact": np.empty(len(wrows), dtype=np.uint64),
                     "norm": np.empty(len(wrows), dtype=np.uint64)}
            for a, b in _row_chunks(row_off):
                # Kept messages, filtered in order, lie row after row: one span per row.
                m0, m1 = int(idx.offsets[wrows[a]]), int(idx.offsets[wrows[b - 1] + 1])
                part = content.slice(m0, m1 - m0).filter(pa.array(kept[m0:m1]))
                local = row_off[a:b + 1] - row_off[a]
                for key, text in (("exact", part), ("norm", normalise_text(part))):
                    off, data, _ = _string_buffers(text)
                    spans[key][a:b] = _xxh_spans(data, off[local[:-1]], off[local[1:]])
            for target, key, lens in ((hash_exact, "exact", idx.raw_len),
                                      (hash_norm, "norm", idx.norm_len)):
                seq = _seq_hash(_structure(lens[kept], idx.role[kept]), pk, rk, n)[wrows]
                target[wrows] = _fmix(spans[key] ^ seq)
        if method == "dpo":
            # Pairs must share the prompt itself, not only its prompt_id: the exact identity of
            # every message but the last (DPO never windows).
            if content is None:
                content = _contents(table)
            raw_off, raw_data, _ = _string_buffers(content)
            span = _xxh_spans(raw_data, raw_off[idx.offsets[:-1]], raw_off[idx.offsets[1:] - 1])
            not_last = np.ones(len(parent), dtype=bool)
            not_last[idx.offsets[1:] - 1] = False
            seq = _seq_hash(_structure(idx.raw_len[not_last], idx.role[not_last]),
                            parent[not_last], pos[not_last], n)
            prompt_raw = _fmix(span ^ seq)
        else:
            prompt_raw = np.zeros(n, dtype=np.uint64)  # only DPO pairs compare prompts
        valid = table.column("valid").to_numpy(zero_copy_only=False).astype(bool)
        dropped: dict[str, int] = {}
        alive = np.ones(n, dtype=bool)
        for reason, mask in (("too_long", too_long), ("eval_overlap", overlap),
                             ("invalid_label", ~valid)):
            hit = alive & mask
            dropped[reason] = int(hit.sum())
            alive &= ~mask
        last_tokens = (counts.message[idx.offsets[1:] - 1].astype(np.int64)
                       if counts.message is not None else None)
        return _Static(alive=alive, hashes={"exact": hash_exact, "norm": hash_norm},
                       prompt_raw=prompt_raw, tokens=tokens, last_tokens=last_tokens,
                       window_start=window_start, dropped=dropped, windowed=windowed)

    def _finish(self, name: str, s: "_Static") -> Candidates:
        table, otype = self.tables[name], self.types[name]
        rows = np.flatnonzero(s.alive)
        take = pa.array(rows, type=pa.int64())
        slices = pc.dictionary_encode(table.column("slice").combine_chunks().take(take).cast(pa.string()))
        buckets = [str(b) for b in slices.dictionary.to_pylist()]
        order = np.argsort(buckets)
        remap = np.empty(len(buckets), dtype=np.int32)
        remap[order] = np.arange(len(buckets), dtype=np.int32)
        bucket = remap[slices.indices.to_numpy(zero_copy_only=False)] if len(buckets) else \
            np.zeros(0, dtype=np.int32)
        pid = pc.dictionary_encode(table.column("prompt_id").combine_chunks().take(take).cast(pa.string()))
        focus_cols = sorted({k.column for k in otype.focus_keys.values()})
        focus_table = table.select(focus_cols).take(take) if focus_cols else pa.table({})
        lt = s.last_tokens
        return Candidates(
            objective=name, otype=otype, n_pool_rows=table.num_rows, rows=rows,
            buckets=sorted(buckets), bucket=bucket,
            score=table.column("score").to_numpy().astype(float)[rows],
            tokens=s.tokens[rows], last_tokens=lt[rows] if lt is not None else None,
            window_start=s.window_start[rows],
            prompt_code=pid.indices.to_numpy(zero_copy_only=False).astype(np.int64),
            prompt_raw=s.prompt_raw[rows], focus_table=focus_table,
            dropped=s.dropped, windowed=s.windowed)


def _windows(over: np.ndarray, parent: np.ndarray, pos: np.ndarray, role: np.ndarray,
             msg_tokens: np.ndarray, row_tokens: np.ndarray,
             max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each over-long row, the longest suffix of whole turns that fits: it keeps system
    messages and starts at a user message. Returns (rows that fit, start index, new tokens)."""
    sel = np.flatnonzero(over[parent])
    p, k, r = parent[sel], pos[sel], role[sel]
    c = msg_tokens[sel].astype(np.int64)
    c_ns = np.where(r != SYSTEM, c, 0)
    cs = np.cumsum(c_ns)
    # Elements of a row are contiguous, so each row's last element closes its running sum.
    last = np.flatnonzero(np.append(p[1:] != p[:-1], True))
    row_last = np.repeat(last, np.diff(np.concatenate([[-1], last])))
    suffix = cs[row_last] - cs + c_ns
    n = len(over)
    overhead = row_tokens - np.bincount(parent, weights=msg_tokens, minlength=n).astype(np.int64)
    sys_tokens = np.bincount(p, weights=np.where(r == SYSTEM, c, 0), minlength=n).astype(np.int64)
    window = overhead[p] + sys_tokens[p] + suffix
    cand = (r == USER) & (window <= max_length)
    rows, first = np.unique(p[cand], return_index=True)
    return rows, k[cand][first], window[cand][first]


@dataclass
class RunData:
    prepared: PreparedPools
    eval_ids: frozenset[str]
    eval_hashes: np.ndarray
    eval_sources: dict[str, str]


def prepare_from_config(config: "MosaicConfig", tokenizer: Any, *,
                        cache_dir: str | Path = ".cache/pools") -> RunData:
    """Load (validated) every objective's pool and eval/held-out sets named in the config,
    count tokens with `tokenizer` (cached) and prepare the pools."""
    from mosaic.data import load_eval_set, load_pool

    tables, counts, indexes, hashes, sources = {}, {}, {}, {}, {}
    eval_hashes: list[np.ndarray] = []
    eval_ids: set[str] = set()
    eval_sources: dict[str, str] = {}
    for name, obj in config.objectives.items():
        if not obj.pool:
            raise PoolError(f"objective {name!r} has no `pool` file in the config "
                            f"(objectives.{name}.pool)")
        if not Path(obj.pool).is_file():
            raise PoolError(f"pool file for objective {name!r} not found: {obj.pool} "
                            f"(generate the sandbox data first, or fix objectives.{name}.pool)")
        table = pa.Table.from_pandas(load_pool(obj.pool, obj.type, name), preserve_index=False)
        tables[name] = table
        sources[name] = str(obj.pool)
        hashes[name] = pool_content_hash(table)
        indexes[name] = cached_message_index(table, cache_dir, pool_hash=hashes[name],
                                             where=f"pool {name!r} ({obj.pool})")
        counts[name] = cached_token_counts(table, tokenizer, cache_dir, pool_hash=hashes[name])
        for kind, path in (("eval", obj.eval), ("heldout", obj.heldout)):
            if not path:
                continue
            if not Path(path).is_file():
                raise PoolError(f"{kind} file for objective {name!r} not found: {path} "
                                f"(objectives.{name}.{kind})")
            ev = load_eval_set(path, obj.type, name)
            msgs = pa.Table.from_pandas(ev[["messages"]], preserve_index=False).column("messages")
            eval_hashes.append(eval_prompt_hashes(msgs, where=f"{kind} set {path}"))
            eval_ids.update(str(x) for x in ev["id"].tolist() if x is not None)
            eval_sources[f"{name}.{kind}"] = str(path)
    all_eval = np.concatenate(eval_hashes) if eval_hashes else np.zeros(0, dtype=np.uint64)
    types = {name: obj.type for name, obj in config.objectives.items()}
    prepared = PreparedPools(tables, types, counts, all_eval, max_length=config.model.max_length,
                             indexes=indexes, pool_hashes=hashes, sources=sources)
    return RunData(prepared=prepared, eval_ids=frozenset(eval_ids), eval_hashes=all_eval,
                   eval_sources=eval_sources)
