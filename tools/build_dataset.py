"""Budget-exact, vectorised training-set builder: pools + a checked data action + seed -> parquet + manifest.

Two stages. *Preparation* (once per run: per-pool work that no action can change) hashes every
message, windows over-long conversations by whole turns, drops rows that would put an eval item
into training, rows with invalid labels, and exact / normalised duplicates. *Building* (every
round) applies the action: quality threshold, exclude and include criteria, per-objective and
per-bucket allocations, and a seeded greedy fill that never exceeds an allocation. Every step is
a column operation (Arrow compute / numpy); nothing loops over rows in Python, except one
C-level hash call per message during preparation (Arrow has no scalar hash kernel).

Guards. The eval guard drops a row if any prefix of its user turns, normalised (NFKC, case,
whitespace), equals an eval or held-out prompt, checked on the conversation as stored and as
windowed. Row identity uses 64-bit hashes of per-message xxh3 hashes: a collision can only drop
an extra row, never let an eval item or a duplicate through.

Semantics (DESIGN.md "Dataset building"), with the choices the design leaves open:
- objective allocation = floor(T_max x mixture weight); bucket allocation = floor(A_o x weight)
  for listed buckets (unlisted buckets get nothing). Without bucket_weights, buckets get A_o in
  proportion to the tokens they can supply after filters, which is uniform sampling over the
  filtered pool.
- inside a bucket, include-matching rows are drawn first up to floor(focus_ratio x allocation);
  the rest of the allocation is drawn from all remaining rows of the bucket (so focusing never
  shrinks what a bucket delivers; `focus_rows` counts every selected row matching include).
- rows are drawn in a seeded random order (one key per pool row, so a small change to the action
  keeps most of the selection); a row that does not fit is skipped and the fill goes on.
- the output lists objectives in config order, each in pool order: order carries no meaning
  (trainers shuffle with their own seed every epoch) and sorted gathers are much cheaper.
- DPO: rows sharing `prompt_id` form one pair: chosen = highest score >= threshold, rejected =
  lowest score, gap > 0, ties broken by the seeded key; exclude removes rows before pairing;
  a pair is a focus pair if either response matches include; pair tokens = prompt + chosen +
  rejected. DPO never windows (both responses must share one prompt): over-long rows drop.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from mosaic.eval.base import ObjectiveType, get_objective_type
from mosaic.io import atomic_write_bytes, atomic_write_json
from mosaic.schemas import BucketManifest, DataAction, DatasetManifest, ObjectiveAction
from mosaic.tools.token_counts import TokenCounts

if TYPE_CHECKING:
    from mosaic.config import MosaicConfig
    from mosaic.schemas import ActionVerdict
    from mosaic.tools.validate_action import ActionContext

ROLES = ("system", "user", "assistant")
SYSTEM, USER, ASSISTANT = 0, 1, 2
REQUIRED_COLUMNS = ("id", "prompt_id", "messages", "slice", "score", "valid")
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
TRAIN_FILE = "train.parquet"
MANIFEST_FILE = "manifest.json"
INDEX_FORMAT = 1

# Drop reasons in the order they are applied; a row is counted under the first that hits it.
STATIC_REASONS = ("too_long", "eval_overlap", "invalid_label", "duplicate_exact",
                  "duplicate_normalised")
ACTION_REASONS = ("below_quality", "excluded", "prompt_mismatch", "no_pair")

_SEED = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_ROLE_SALT = np.array([0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0],
                      dtype=np.uint64)


class PoolError(ValueError):
    """A pool, its token counts or an eval set is malformed; the message names which and where."""


# --------------------------------------------------------------------------------------------
# Content hashing
# --------------------------------------------------------------------------------------------


def normalise_text(arr: pa.Array) -> pa.Array:
    """NFKC, lower case, whitespace runs collapsed to one space, trimmed (vectorised).

    Equivalent to `" ".join(unicodedata.normalize("NFKC", s).lower().split())` on ordinary text.
    """
    arr = pc.utf8_lower(pc.utf8_normalize(arr, "NFKC"))
    # Splitting and re-joining is the costly part, so only strings that need it pay for it.
    needs = pc.match_substring_regex(
        arr, r"[\t\n\r\f\x0b\x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}"
             r"\x{202f}\x{205f}\x{3000}]|  |^ | $")
    needs = needs.fill_null(False)
    if not pc.any(needs).as_py():
        return arr
    # Arrow's split keeps empty pieces at the ends, so trim first.
    fixed = pc.binary_join(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(arr.filter(needs))), " ")
    return pc.replace_with_mask(arr, needs, fixed)


def _xxh_strings(arr: pa.Array) -> np.ndarray:
    """xxh3-64 of each string's UTF-8 bytes (stable across platforms and versions)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_large_string(arr.type):
        off_dtype = np.int64
    else:
        arr = arr.cast(pa.string())
        off_dtype = np.int32
    n = len(arr)
    bufs = arr.buffers()
    off = np.frombuffer(bufs[1], dtype=off_dtype)[arr.offset:arr.offset + n + 1]
    data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
    digest = xxhash.xxh3_64_intdigest
    # One C call per string: Arrow has no scalar hash kernel. This runs once per pool (cached),
    # never in the per-round build.
    return np.fromiter((digest(data[a:b]) for a, b in zip(off[:-1].tolist(), off[1:].tolist())),
                       dtype=np.uint64, count=n)


def _fmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _S33)
    h = h * _C1
    h = h ^ (h >> _S33)
    h = h * _C2
    return h ^ (h >> _S33)


def _fold(n_rows: int, parent: np.ndarray, rank: np.ndarray, values: np.ndarray,
          hits_against: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Order-sensitive hash of each row's sequence of values (rank = position in the row).

    With `hits_against`, also flags rows any of whose prefixes hashes into that set.
    """
    h = np.full(n_rows, _SEED, dtype=np.uint64)
    hit = np.zeros(n_rows, dtype=bool) if hits_against is not None else None
    if len(parent) == 0:
        return h, hit
    top = int(rank.max())
    order = np.argsort(rank.astype(np.int16 if top < 32_000 else np.int64), kind="stable")
    bounds = np.searchsorted(rank[order], np.arange(top + 2))
    for j in range(top + 1):
        sel = order[bounds[j]:bounds[j + 1]]
        p = parent[sel]
        h[p] = _fmix(h[p] ^ values[sel])
        if hit is not None and len(hits_against):
            hit[p] |= np.isin(h[p], hits_against)
    return h, hit


def _rank_within(parent: np.ndarray, n_rows: int) -> np.ndarray:
    """Position of each element within its row, for elements listed row by row."""
    counts = np.bincount(parent, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.arange(len(parent)) - starts[parent]


@dataclass(frozen=True)
class MessageIndex:
    """Per-message facts of a pool, in flattened message order: the input of every static step."""

    offsets: np.ndarray  # int64 [rows + 1]
    role: np.ndarray  # int8: 0 system, 1 user, 2 assistant
    raw: np.ndarray  # uint64: xxh3 of the exact content
    norm: np.ndarray  # uint64: xxh3 of the normalised content


def _flat_messages(messages: pa.Array | pa.ChunkedArray, where: str) -> tuple[np.ndarray, pa.Array, pa.Array]:
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    t = messages.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        raise PoolError(f"{where}: column 'messages' must be list<struct<role, content>>, got {t}")
    names = {t.value_type.field(i).name for i in range(t.value_type.num_fields)}
    if not {"role", "content"} <= names:
        raise PoolError(f"{where}: messages need 'role' and 'content' fields, got {sorted(names)}")
    if messages.null_count:
        row = int(np.flatnonzero(~pc.is_valid(messages).to_numpy(zero_copy_only=False))[0])
        raise PoolError(f"{where}: row {row}: 'messages' is null; expected a list of messages")
    lengths = pc.list_value_length(messages).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(messages)
    role = pc.struct_field(flat, "role")
    content = pc.struct_field(flat, "content")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return offsets, role, content


def message_index(messages: pa.Array | pa.ChunkedArray, *, where: str = "pool") -> MessageIndex:
    """Roles and exact / normalised content hashes of every message of every row."""
    offsets, role, content = _flat_messages(messages, where)
    codes = pc.index_in(role.cast(pa.string()), value_set=pa.array(ROLES))
    if codes.null_count:
        m = int(np.flatnonzero(~pc.is_valid(codes).to_numpy(zero_copy_only=False))[0])
        row = int(np.searchsorted(offsets, m, side="right") - 1)
        raise PoolError(f"{where}: row {row}, message {m - offsets[row]}: role "
                        f"{role[m].as_py()!r} is not one of {list(ROLES)}")
    if content.null_count:
        m = int(np.flatnonzero(~pc.is_valid(content).to_numpy(zero_copy_only=False))[0])
        row = int(np.searchsorted(offsets, m, side="right") - 1)
        raise PoolError(f"{where}: row {row}, message {m - offsets[row]}: content is null")
    codes = codes.to_numpy(zero_copy_only=False).astype(np.int8)
    return MessageIndex(offsets=offsets, role=codes, raw=_xxh_strings(content),
                        norm=_xxh_strings(normalise_text(content)))


def eval_prompt_hashes(messages: pa.Array | pa.ChunkedArray, *, where: str = "eval set") -> np.ndarray:
    """Normalised content hash of each eval item's prompt: its user turns, in order."""
    idx = message_index(messages, where=where)
    n = len(idx.offsets) - 1
    parent = np.repeat(np.arange(n), np.diff(idx.offsets))
    user = idx.role == USER
    h, _ = _fold(n, parent[user], _rank_within(parent[user], n), idx.norm[user])
    return h


def pool_content_hash(table: pa.Table) -> str:
    """sha256 of a table's content (Arrow IPC of fixed-size batches, schema metadata dropped)."""
    table = table.replace_schema_metadata(None)
    h = hashlib.sha256()

    class _Sink:
        closed = False

        def write(self, b: Any) -> int:
            h.update(b)
            return len(b)

        def flush(self) -> None:
            pass

    sink = pa.PythonFile(_Sink(), mode="w")
    # Fixed 65,536-row batches, whatever the table's chunking (a file read in row groups and
    # the same rows built in memory hash alike); only one batch is copied at a time.
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for start in range(0, table.num_rows, 65_536):
            piece = table.slice(start, 65_536).combine_chunks()
            for batch in piece.to_batches():
                writer.write_batch(batch)
    return h.hexdigest()


def cached_message_index(table: pa.Table, cache_dir: str | Path | None, *, pool_hash: str,
                         where: str = "pool") -> MessageIndex:
    """`message_index` of a pool, cached at cache_dir/index-<pool hash>.npz."""
    import io

    path = Path(cache_dir) / f"index-{INDEX_FORMAT}-{pool_hash[:32]}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return MessageIndex(offsets=z["offsets"], role=z["role"], raw=z["raw"], norm=z["norm"])
    idx = message_index(table.column("messages"), where=where)
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, offsets=idx.offsets, role=idx.role, raw=idx.raw, norm=idx.norm)
        atomic_write_bytes(path, buf.getvalue())
    return idx


# --------------------------------------------------------------------------------------------
# Preparation: static per-pool filtering
# --------------------------------------------------------------------------------------------


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
    prompt_raw: np.ndarray  # uint64: exact hash of every message but the last
    focus_table: pa.Table  # the type's focus columns, candidate rows only
    dropped: dict[str, int]
    windowed: int  # over-long rows shortened by whole turns instead of dropped
    _pandas: pd.DataFrame | None = field(default=None, repr=False)

    def focus_frame(self) -> pd.DataFrame:
        if self._pandas is None:
            self._pandas = self.focus_table.to_pandas(types_mapper=pd.ArrowDtype)
        return self._pandas


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
            hashes = np.concatenate([s["hash_" + kind][s["alive"]] for s in staged.values()])
            dup = np.ones(len(hashes), dtype=bool)
            dup[np.unique(hashes, return_index=True)[1]] = False
            start = 0
            for s in staged.values():
                alive_idx = np.flatnonzero(s["alive"])
                d = dup[start:start + len(alive_idx)]
                start += len(alive_idx)
                s["dropped"][reason] = int(d.sum())
                s["alive"][alive_idx[d]] = False
        return {name: self._finish(name, staged[name]) for name in self.objectives}

    def _static(self, name: str, method: str) -> dict[str, Any]:
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
        kept = (idx.role == SYSTEM) | (pos >= window_start[parent])
        pk = parent[kept]
        rank = _rank_within(pk, n)
        salt = _ROLE_SALT[idx.role[kept]]
        hash_exact, _ = _fold(n, pk, rank, idx.raw[kept] ^ salt)
        hash_norm, _ = _fold(n, pk, rank, idx.norm[kept] ^ salt)
        not_last = kept.copy()
        not_last[idx.offsets[1:] - 1] = False
        pn = parent[not_last]
        prompt_raw, _ = _fold(n, pn, _rank_within(pn, n),
                              idx.raw[not_last] ^ _ROLE_SALT[idx.role[not_last]])
        # The guard looks at the conversation as it is in the pool AND as it will be trained
        # (a window starts at a later user turn, which may begin an eval prompt): a row whose
        # original is an eval conversation stays out even when windowing would disguise it.
        is_user = idx.role == USER
        pu = parent[is_user]
        _, overlap = _fold(n, pu, _rank_within(pu, n), idx.norm[is_user],
                           hits_against=self.eval_hashes)
        if windowed:
            wu = is_user & kept & (window_start[parent] > 0)
            pw = parent[wu]
            _, w_overlap = _fold(n, pw, _rank_within(pw, n), idx.norm[wu],
                                 hits_against=self.eval_hashes)
            overlap |= w_overlap
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
        return {"alive": alive, "hash_exact": hash_exact, "hash_norm": hash_norm,
                "prompt_raw": prompt_raw, "tokens": tokens, "last_tokens": last_tokens,
                "window_start": window_start, "dropped": dropped, "windowed": windowed}

    def _finish(self, name: str, s: dict[str, Any]) -> Candidates:
        table, otype = self.tables[name], self.types[name]
        rows = np.flatnonzero(s["alive"])
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
        lt = s["last_tokens"]
        return Candidates(
            objective=name, otype=otype, n_pool_rows=table.num_rows, rows=rows,
            buckets=sorted(buckets), bucket=bucket,
            score=table.column("score").to_numpy().astype(float)[rows],
            tokens=s["tokens"][rows], last_tokens=lt[rows] if lt is not None else None,
            window_start=s["window_start"][rows],
            prompt_code=pid.indices.to_numpy(zero_copy_only=False).astype(np.int64),
            prompt_raw=s["prompt_raw"][rows], focus_table=focus_table,
            dropped=s["dropped"], windowed=s["windowed"])


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


# --------------------------------------------------------------------------------------------
# Units (rows or pairs), allocations, greedy fill
# --------------------------------------------------------------------------------------------


@dataclass
class Units:
    """What one objective can draw under one action: SFT rows or DPO pairs."""

    bucket: np.ndarray
    tokens: np.ndarray
    focus: np.ndarray
    first: np.ndarray  # candidate index (the row, or the chosen row of a pair)
    second: np.ndarray | None  # DPO: candidate index of the rejected row
    dropped: dict[str, int]


def objective_units(cands: Candidates, oa: ObjectiveAction | None, threshold: float | None,
                    method: str, keys: np.ndarray | None = None) -> Units:
    """Apply an action's per-objective filters to the candidates (vectorised)."""
    n = len(cands.rows)
    focus = oa.focus if oa is not None else None
    alive = np.ones(n, dtype=bool)
    dropped: dict[str, int] = {}
    if method == "sft" and threshold is not None:
        low = cands.score < threshold
        dropped["below_quality"] = int(low.sum())
        alive &= ~low
    if focus is not None and focus.exclude:
        ex = criteria_mask(cands, focus.exclude) & alive
        dropped["excluded"] = int(ex.sum())
        alive &= ~ex
    inc = criteria_mask(cands, focus.include) if focus is not None and focus.include else \
        np.zeros(n, dtype=bool)
    if method == "sft":
        idx = np.flatnonzero(alive)
        return Units(bucket=cands.bucket[idx], tokens=cands.tokens[idx], focus=inc[idx], first=idx,
                     second=None, dropped=dropped)
    return _pairs(cands, alive, inc, threshold, keys, dropped)


def _pairs(cands: Candidates, alive: np.ndarray, inc: np.ndarray, threshold: float | None,
           keys: np.ndarray | None, dropped: dict[str, int]) -> Units:
    idx = np.flatnonzero(alive)
    code = cands.prompt_code[idx]
    score = cands.score[idx]
    tie = keys[idx] if keys is not None else np.zeros(len(idx))
    elig = score >= threshold if threshold is not None else np.ones(len(idx), dtype=bool)
    # Chosen: eligible first, then highest score, then the seeded key; rejected: lowest score.
    oc = np.lexsort((tie, -score, ~elig, code))
    orj = np.lexsort((tie, score, code))
    starts_c = np.flatnonzero(np.diff(code[oc], prepend=-1) != 0)
    starts_r = np.flatnonzero(np.diff(code[orj], prepend=-1) != 0)
    chosen, rejected = idx[oc[starts_c]], idx[orj[starts_r]]
    ok = elig[oc[starts_c]] & (cands.score[chosen] > cands.score[rejected])
    same_prompt = cands.prompt_raw[chosen] == cands.prompt_raw[rejected]
    dropped["prompt_mismatch"] = int((ok & ~same_prompt).sum())
    dropped["no_pair"] = int((~ok).sum())
    ok &= same_prompt
    chosen, rejected = chosen[ok], rejected[ok]
    if cands.last_tokens is not None:
        tokens = cands.tokens[chosen] + cands.last_tokens[rejected]
    else:  # no per-message counts: count the prompt twice, which can only under-spend
        tokens = cands.tokens[chosen] + cands.tokens[rejected]
    return Units(bucket=cands.bucket[chosen], tokens=tokens, focus=inc[chosen] | inc[rejected],
                 first=chosen, second=rejected, dropped=dropped)


def supply(cands: Candidates, units: Units) -> tuple[dict[str, int], dict[str, int]]:
    """Tokens each bucket can supply, and how many of them come from focus units."""
    nb = len(cands.buckets)
    tot = np.bincount(units.bucket, weights=units.tokens, minlength=nb)
    foc = np.bincount(units.bucket[units.focus], weights=units.tokens[units.focus], minlength=nb)
    return ({b: int(tot[i]) for i, b in enumerate(cands.buckets)},
            {b: int(foc[i]) for i, b in enumerate(cands.buckets)})


def _clamp_sum(alloc: dict[str, int], total: int) -> dict[str, int]:
    # Float products can round a floor up by one; the budget guarantee must not depend on luck.
    excess = sum(alloc.values()) - total
    for key in sorted(alloc, key=lambda k: (-alloc[k], k)):
        if excess <= 0:
            break
        cut = min(excess, alloc[key])
        alloc[key] -= cut
        excess -= cut
    return alloc


def objective_allocations(budget: int, mixture: Mapping[str, float]) -> dict[str, int]:
    return _clamp_sum({o: max(0, int(math.floor(budget * w))) for o, w in mixture.items()}, budget)


def bucket_allocations(allocation: int, bucket_weights: Mapping[str, float] | None,
                       available: Mapping[str, int]) -> dict[str, int]:
    if bucket_weights is not None:
        return _clamp_sum({b: max(0, int(math.floor(allocation * w)))
                           for b, w in sorted(bucket_weights.items())}, allocation)
    total = sum(available.values())
    if total == 0:
        return {}
    # Integer arithmetic: proportional shares are exact and never sum above the allocation.
    return {b: allocation * a // total for b, a in sorted(available.items()) if a > 0}


def greedy_fill(tokens: np.ndarray, cap: int) -> np.ndarray:
    """Mask of the items a sequential 'take it if it still fits' pass would take, in order.

    Vectorised in rounds: each round takes the longest fitting prefix (a cumsum), skips the
    item that broke it and drops every item larger than what is left (it can never fit again,
    since what is left only shrinks). Equal to the sequential pass, item for item.
    """
    n = len(tokens)
    take = np.zeros(n, dtype=bool)
    remaining = int(cap)
    cand = np.flatnonzero(tokens <= remaining)
    rounds = 0
    while cand.size and remaining > 0:
        rounds += 1
        if rounds > 64:  # pathological size mixes: finish the (by now short) tail sequentially
            for i in cand.tolist():
                t = int(tokens[i])
                if t <= remaining:
                    take[i] = True
                    remaining -= t
            break
        cs = np.cumsum(tokens[cand])
        k = int(np.searchsorted(cs, remaining, side="right"))
        take[cand[:k]] = True
        remaining -= int(cs[k - 1]) if k else 0
        if k >= cand.size:
            break
        rest = cand[k + 1:]
        cand = rest[tokens[rest] <= remaining]
    return take


def _stable_id(name: str) -> int:
    return xxhash.xxh3_64_intdigest(name.encode("utf-8")) & 0xFFFFFFFF


def row_keys(seed: int, objective: str, n_pool_rows: int) -> np.ndarray:
    """The seeded random draw order: one key per pool row, independent of the other pools."""
    return np.random.default_rng([int(seed), _stable_id(objective)]).random(n_pool_rows)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _action_hash(action: DataAction) -> str:
    text = json.dumps(action.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_buildable(action: DataAction, prepared: PreparedPools) -> None:
    """Refuse an action that has not passed the check (defence in depth, not the check itself)."""
    ws = list(action.mixture.values())
    if not ws or any(not math.isfinite(w) or w < 0 for w in ws) or abs(sum(ws) - 1) > 1e-6:
        raise ValueError(f"mixture {action.mixture} is not a set of non-negative weights summing "
                         f"to 1; run validate_action first")
    for name in set(action.mixture) | set(action.objectives):
        if name not in prepared.tables:
            raise ValueError(f"action names objective {name!r} that has no pool; pools: "
                             f"{prepared.objectives}")
    for name, oa in action.objectives.items():
        otype = prepared.types[name]
        if oa.bucket_weights is not None:
            bad = [b for b in oa.bucket_weights if b not in otype.slices]
            bws = list(oa.bucket_weights.values())
            if bad or any(not math.isfinite(w) or w < 0 for w in bws) or abs(sum(bws) - 1) > 1e-6:
                raise ValueError(f"objective {name!r}: bucket_weights {oa.bucket_weights} are not "
                                 f"valid; run validate_action first")
        if oa.focus is not None:
            bad = [k for k in (*oa.focus.include, *oa.focus.exclude) if k not in otype.focus_keys]
            if bad:
                raise ValueError(f"objective {name!r}: unknown focus keys {bad}")
        if not 0 <= oa.focus_ratio <= 1:
            raise ValueError(f"objective {name!r}: focus_ratio {oa.focus_ratio} outside [0, 1]")


def build_training_set(pools: PreparedPools | Mapping[str, pa.Table | pd.DataFrame],
                       action: DataAction, budget: int, seed: int,
                       token_counts: Mapping[str, TokenCounts | np.ndarray] | None = None,
                       eval_hashes: np.ndarray | Sequence[int] | None = None, *,
                       objective_types: Mapping[str, str | ObjectiveType] | None = None,
                       max_length: int | None = None) -> tuple[pa.Table, DatasetManifest]:
    """Select the round's training set. Returns the table (as it will be written) and the
    manifest; `manifest.output_hash` is the sha256 of the exact parquet bytes `write_training_set`
    writes. Same (pools, action, seed) -> byte-identical output."""
    if isinstance(pools, PreparedPools):
        prepared = pools
    else:
        if token_counts is None or objective_types is None:
            raise ValueError("raw pools need token_counts and objective_types")
        prepared = PreparedPools(pools, objective_types, token_counts, eval_hashes,
                                 max_length=max_length)
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of tokens, got {budget}")
    check_buildable(action, prepared)
    method = action.method
    cands_all = prepared.candidates(method)
    allocs = objective_allocations(budget, action.mixture)
    buckets_out: list[BucketManifest] = []
    parts: list[dict[str, Any]] = []
    dropped_by: dict[str, dict[str, int]] = {}
    notes: list[str] = []
    for name in prepared.objectives:
        cands = cands_all[name]
        oa = action.objectives.get(name)
        keys = row_keys(seed, name, cands.n_pool_rows)[cands.rows]
        units = objective_units(cands, oa, action.quality_threshold, method, keys)
        merged = {**cands.dropped, **units.dropped}
        dropped_by[name] = {r: merged[r] for r in (*STATIC_REASONS, *ACTION_REASONS)
                            if merged.get(r)}
        a_o = allocs.get(name, 0)
        if a_o == 0:
            continue
        avail, focus_avail = supply(cands, units)
        bw = oa.bucket_weights if oa is not None else None
        if bw is None:
            notes.append(f"{name}: no bucket_weights, buckets proportional to available tokens")
        balloc = bucket_allocations(a_o, bw, avail)
        # Without include criteria there are no focus rows and focus_ratio has no effect.
        ratio = oa.focus_ratio if oa is not None and oa.focus is not None and oa.focus.include else 0.0
        # One sort per objective: every bucket's units, filtered by mask, stay in draw order.
        drawn = np.argsort(keys[units.first], kind="stable")
        drawn_bucket = units.bucket[drawn]
        for b, a_b in balloc.items():
            bi = cands.buckets.index(b) if b in cands.buckets else -1
            in_b = drawn[drawn_bucket == bi]
            f_alloc = min(a_b, int(math.floor(a_b * ratio)))
            fmask = units.focus[in_b]
            focus_idx = in_b[fmask]
            t1 = greedy_fill(units.tokens[focus_idx], f_alloc)
            chosen1 = focus_idx[t1]
            used1 = int(units.tokens[chosen1].sum())
            taken1 = np.zeros(len(in_b), dtype=bool)
            taken1[np.flatnonzero(fmask)[t1]] = True
            rest = in_b[~taken1]
            t2 = greedy_fill(units.tokens[rest], a_b - used1)
            chosen = np.concatenate([chosen1, rest[t2]])
            used = int(units.tokens[chosen].sum())
            if used > a_b:  # cannot happen; the guarantee is checked, not assumed
                raise RuntimeError(f"{name}/{b}: filled {used} tokens over allocation {a_b}")
            n_focus = int(units.focus[chosen].sum())
            buckets_out.append(BucketManifest(
                objective=name, bucket=b, allocation=a_b, tokens_used=used, rows=len(chosen),
                focus_rows=n_focus, focus_tokens=int(units.tokens[chosen][units.focus[chosen]].sum()),
                shortfall=a_b - used, available_tokens=avail.get(b, 0),
                focus_allocation=f_alloc, focus_available_tokens=focus_avail.get(b, 0)))
            parts.append({"name": name, "bucket": b, "units": units, "sel": chosen, "cands": cands})
    table = _assemble(prepared, parts, method)
    total = int(pc.sum(table.column("tokens")).as_py() or 0) if table.num_rows else 0
    if total > budget:
        raise RuntimeError(f"selected {total} tokens over the budget {budget}")
    for name in prepared.objectives:
        used = sum(b.tokens_used for b in buckets_out if b.objective == name)
        if used > allocs.get(name, 0):
            raise RuntimeError(f"{name}: {used} tokens over its allocation {allocs.get(name, 0)}")
    short = [f"{b.objective}/{b.bucket} short by {b.shortfall}" for b in buckets_out
             if b.shortfall > max(0, b.allocation // 100)]
    if short:
        notes.append("shortfalls over 1% of allocation: " + ", ".join(short))
    if len(prepared.eval_hashes) == 0:
        notes.append("no eval item hashes given: the eval-overlap guard had nothing to compare")
    dropped_total = {r: sum(d.get(r, 0) for d in dropped_by.values())
                     for r in (*STATIC_REASONS, *ACTION_REASONS)}
    dropped_total = {r: v for r, v in dropped_total.items() if v}
    manifest = DatasetManifest(
        seed=seed, budget=budget, total_tokens=total, total_rows=table.num_rows, method=method,
        action_hash=_action_hash(action), pool_hashes=dict(prepared.pool_hashes),
        output_hash=hashlib.sha256(parquet_bytes(table)).hexdigest(), buckets=buckets_out,
        dropped=dropped_total, dropped_by_objective=dropped_by, allocations=allocs,
        windowed_rows=sum(int(np.sum(p["cands"].window_start[p["units"].first[p["sel"]]] > 0))
                          for p in parts),
        max_length=prepared.max_length, eval_items=int(len(prepared.eval_hashes)), notes=notes)
    return table, manifest


def _messages_of(table: pa.Table, rows: np.ndarray, start: np.ndarray | None,
                 drop_last: bool = False, only_last: bool = False) -> pa.Array:
    """Messages of `rows` in canonical type; optionally windowed from `start`, without or with
    only the final message. Rows should be ascending: a sorted take is several times faster
    than a random one on a large pool."""
    msgs = table.column("messages").take(pa.array(rows, type=pa.int64())).combine_chunks()
    if isinstance(msgs, pa.ChunkedArray):
        msgs = msgs.combine_chunks()
    windowing = start is not None and bool((start > 0).any())
    if not (windowing or drop_last or only_last):
        return msgs if msgs.type == MESSAGE_TYPE else msgs.cast(MESSAGE_TYPE)
    lengths = pc.list_value_length(msgs).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(msgs)
    n = len(rows)
    parent = np.repeat(np.arange(n), lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pos = np.arange(len(parent)) - offsets[parent]
    keep = np.ones(len(parent), dtype=bool)
    if windowing:
        is_sys = pc.equal(pc.struct_field(flat, "role"), "system").to_numpy(zero_copy_only=False)
        keep &= is_sys | (pos >= start[parent])
    last = pos == lengths[parent] - 1
    if drop_last:
        keep &= ~last
    if only_last:
        keep &= last
    values = flat.filter(pa.array(keep))
    new_off = np.concatenate([[0], np.cumsum(np.bincount(parent[keep], minlength=n))])
    return pa.ListArray.from_arrays(pa.array(new_off.astype(np.int32)), values).cast(MESSAGE_TYPE)


def _assemble(prepared: PreparedPools, parts: list[dict[str, Any]], method: str) -> pa.Table:
    """The output table: objectives in config order, each pool's rows in pool order.

    Output order carries no meaning (trainers shuffle with their own seed each epoch), and
    ascending takes from a large pool are several times cheaper than a shuffled gather.
    """
    by_pool: dict[str, list[dict[str, Any]]] = {}
    for p in parts:
        by_pool.setdefault(p["name"], []).append(p)
    cols: dict[str, list[pa.Array]] = {}

    def add(name: str, arr: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        cols.setdefault(name, []).append(arr)

    for name in prepared.objectives:
        plist = by_pool.get(name)
        if not plist:
            continue
        cands: Candidates = plist[0]["cands"]
        units: Units = plist[0]["units"]
        table = prepared.tables[name]
        # Units are in candidate order and candidates in pool order, so a mask over units
        # yields the selection sorted by pool row (SFT) or chosen row (DPO) without a sort.
        picked = np.full(len(units.first), -1, dtype=np.int32)
        for i, p in enumerate(plist):
            picked[p["sel"]] = i
        sel = np.flatnonzero(picked >= 0)
        bucket_names = picked[sel]
        first = units.first[sel]
        rows = cands.rows[first]
        n = len(rows)
        take = pa.array(rows, type=pa.int64())
        ids = table.column("id").take(take).cast(pa.string())
        if method == "sft":
            add("messages", _messages_of(table, rows, cands.window_start[first]))
            add("id", ids)
            add("score", pa.array(cands.score[first], type=pa.float64()))
            add("windowed", pa.array(cands.window_start[first] > 0))
        else:
            second = units.second[sel]
            rrows = cands.rows[second]
            add("prompt", _messages_of(table, rows, None, drop_last=True))
            add("chosen", _messages_of(table, rows, None, only_last=True))
            add("rejected", _messages_of(table, rrows, None, only_last=True))
            add("chosen_id", ids)
            add("rejected_id", table.column("id").take(pa.array(rrows, type=pa.int64())).cast(pa.string()))
            add("chosen_score", pa.array(cands.score[first], type=pa.float64()))
            add("rejected_score", pa.array(cands.score[second], type=pa.float64()))
        add("prompt_id", table.column("prompt_id").take(take).cast(pa.string()))
        add("objective", pa.repeat(pa.scalar(name, pa.string()), n))
        labels = pa.array([p["bucket"] for p in plist], type=pa.string())
        add("bucket", labels.take(pa.array(bucket_names)))
        add("tokens", pa.array(units.tokens[sel], type=pa.int64()))
        add("focus", pa.array(units.focus[sel], type=pa.bool_()))
    if method == "sft":
        names = ["messages", "id", "prompt_id", "objective", "bucket", "score", "tokens", "focus",
                 "windowed"]
        types = [MESSAGE_TYPE, pa.string(), pa.string(), pa.string(), pa.string(), pa.float64(),
                 pa.int64(), pa.bool_(), pa.bool_()]
    else:
        names = ["prompt", "chosen", "rejected", "prompt_id", "chosen_id", "rejected_id",
                 "objective", "bucket", "chosen_score", "rejected_score", "tokens", "focus"]
        types = [MESSAGE_TYPE, MESSAGE_TYPE, MESSAGE_TYPE, pa.string(), pa.string(), pa.string(),
                 pa.string(), pa.string(), pa.float64(), pa.float64(), pa.int64(), pa.bool_()]
    schema = pa.schema(list(zip(names, types)))
    if not cols:
        return schema.empty_table()
    arrays = [pa.concat_arrays([a.cast(t) for a in cols[c]]) for c, t in zip(names, types)]
    return pa.Table.from_arrays(arrays, schema=schema)


def parquet_bytes(table: pa.Table) -> bytes:
    """The exact bytes written for a training set (fixed writer options -> reproducible)."""
    sink = pa.BufferOutputStream()
    # Dictionary encoding only where values repeat; trying it on message text costs more than
    # it saves.
    pq.write_table(table, sink, compression="zstd", compression_level=1, row_group_size=65_536,
                   use_dictionary=["objective", "bucket"], write_statistics=False,
                   store_schema=True)
    return sink.getvalue().to_pybytes()


def write_training_set(out_dir: str | Path, table: pa.Table, manifest: DatasetManifest) -> Path:
    """Write train.parquet then manifest.json (the completion marker), both atomically."""
    out = Path(out_dir)
    data = parquet_bytes(table)
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.output_hash:
        raise RuntimeError(f"output hash changed between build and write ({manifest.output_hash} "
                           f"-> {digest}); refusing to write a manifest that does not match")
    atomic_write_bytes(out / TRAIN_FILE, data)
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return out


# --------------------------------------------------------------------------------------------
# Tool entry: check, then build (an invalid action never reaches the builder)
# --------------------------------------------------------------------------------------------


@dataclass
class BuildOutcome:
    verdict: "ActionVerdict"
    table: pa.Table | None = None
    manifest: DatasetManifest | None = None
    out_dir: Path | None = None


def check_and_build(raw_action: str | bytes | dict[str, Any], context: "ActionContext", *,
                    seed: int, out_dir: str | Path | None = None,
                    dry_run: bool = False) -> BuildOutcome:
    """Validate the proposal; build (and unless dry_run, write) only if the check passes."""
    import dataclasses

    from mosaic.tools.validate_action import validate_action

    context = dataclasses.replace(context, seed=seed)
    verdict = validate_action(raw_action, context)
    if not verdict.ok or verdict.action is None:
        return BuildOutcome(verdict=verdict)
    if context.pools is None:
        raise ValueError("the action context has no prepared pools to build from")
    table, manifest = build_training_set(context.pools, verdict.action, context.budget, seed)
    manifest = manifest.model_copy(update={"notes": [*verdict.notes, *manifest.notes]})
    written = None
    if not dry_run:
        if out_dir is None:
            raise ValueError("out_dir is required unless dry_run")
        written = write_training_set(out_dir, table, manifest)
    return BuildOutcome(verdict=verdict, table=table, manifest=manifest, out_dir=written)


# --------------------------------------------------------------------------------------------
# From a run config: read pools and eval sets, count tokens, prepare
# --------------------------------------------------------------------------------------------


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
    from mosaic.tools.token_counts import cached_token_counts

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
