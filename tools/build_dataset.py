"""Budget-exact, vectorised training-set builder: pools + a checked data action + seed -> parquet + manifest.

Two stages. *Preparation* (once per run: per-pool work that no action can change) fingerprints
every conversation, windows over-long conversations by whole turns, drops rows that would put an
eval item into training, rows with invalid labels, and exact / normalised duplicates. *Building*
(every round) applies the action: quality threshold, exclude and include criteria, per-objective
and per-bucket allocations, and a seeded greedy fill that never exceeds an allocation. Every step
is a column operation (Arrow compute / numpy); the only per-item Python work is one C-level xxh3
call per conversation and per user turn during preparation (Arrow has no scalar hash kernel, and
hashing variable-length strings in numpy measured slower: see `_xxh_spans`).

Guards. The eval guard drops a row if any prefix of its user turns, normalised (NFKC, case,
whitespace), equals an eval or held-out prompt, checked on the conversation as stored and as
windowed. Row identity is 64-bit: xxh3 of the conversation's concatenated contents, mixed with a
hash of its (role, length) sequence, which fixes the message boundaries. A collision can only
drop an extra row, never let an eval item or a duplicate through; at a million rows the chance
that one happens at all is about n^2 / 2^65 ~ 3e-8 (dedup) and n_prefixes x n_eval / 2^64
(eval guard), so 64 bits is enough and halves the memory of 128.

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
# Part of the index cache's file name: bump it whenever a hash definition or a field changes,
# so an index written by an older release is never mixed with freshly computed eval hashes.
INDEX_FORMAT = 2

# Drop reasons in the order they are applied; a row is counted under the first that hits it.
STATIC_REASONS = ("too_long", "eval_overlap", "invalid_label", "duplicate_exact",
                  "duplicate_normalised")
ACTION_REASONS = ("below_quality", "excluded", "prompt_mismatch", "no_pair")

_GOLD = np.uint64(0x9E3779B97F4A7C15)
_LEN = np.uint64(0xD6E8FEB86659FD93)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_BLOCK = 1 << 18  # bytes per block of the byte scans: temporaries stay in cache (measured best)
_CHUNK_MESSAGES = 1 << 18  # messages per chunk of text processing (see _row_chunks)


class PoolError(ValueError):
    """A pool, its token counts or an eval set is malformed; the message names which and where."""


# --------------------------------------------------------------------------------------------
# Content hashing
# --------------------------------------------------------------------------------------------


def _string_buffers(arr: pa.Array) -> tuple[np.ndarray, memoryview, np.ndarray]:
    """Absolute byte offsets (int64, len + 1), and the UTF-8 data as a memoryview and uint8 array."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    off_dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    n = len(arr)
    bufs = arr.buffers()
    if bufs[1] is None:  # an array of length 0 may come without buffers
        return np.zeros(1, dtype=np.int64), memoryview(b""), np.zeros(0, dtype=np.uint8)
    off = np.frombuffer(bufs[1], dtype=off_dtype)[arr.offset:arr.offset + n + 1].astype(np.int64)
    data = bufs[2] if bufs[2] is not None else pa.py_buffer(b"")
    return off, memoryview(data), np.frombuffer(data, dtype=np.uint8)


def _xxh_spans(data: memoryview, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """xxh3-64 of each byte range data[start:end] (stable across platforms and versions).

    One C call per range: ~0.2 us, almost all interpreter overhead. Vectorised alternatives were
    measured on 2.5M messages (216 MB) and lost: a numpy word-wise hash (gather 8-byte words,
    mix, segment sums) 0.72 s and pandas `hash_array` 0.67 s + 0.34 s to make Python strings,
    against 0.48 s here. So the preparation calls it per conversation (one span of contiguous
    contents) and per user turn, not per message.
    """
    digest = xxhash.xxh3_64_intdigest
    return np.fromiter((digest(data[a:b]) for a, b in zip(starts.tolist(), ends.tolist())),
                       dtype=np.uint64, count=len(starts))


def _scan_bytes(off: np.ndarray, buf: np.ndarray, flag: Any, lookahead: int = 0) -> np.ndarray:
    """Strings holding a byte for which `flag(block, next_1, ..., next_lookahead)` is true.

    The data buffer is scanned in cache-sized blocks (large temporaries cost more in page faults
    than in arithmetic); bytes past a string's end read as 0, so look-ahead never matches there
    except into the next string, which can only flag a string too many (callers accept that).
    """
    n = len(off) - 1
    lo, hi = (int(off[0]), int(off[-1])) if n else (0, 0)
    flagged = []
    for s in range(lo, hi, _BLOCK):
        e = min(hi, s + _BLOCK)
        ext = buf[s:min(hi, e + lookahead)]
        if len(ext) < e - s + lookahead:
            ext = np.concatenate([ext, np.zeros(e - s + lookahead - len(ext), dtype=np.uint8)])
        b = ext[:e - s]
        hits = np.flatnonzero(flag(b, *(ext[k:k + e - s] for k in range(1, lookahead + 1))))
        if len(hits):
            flagged.append(hits + s)
    out = np.zeros(n, dtype=bool)
    if flagged:
        out[np.searchsorted(off, np.concatenate(flagged), side="right") - 1] = True
    return out


def _is_ascii_ws(b: np.ndarray) -> np.ndarray:
    # \t \n \v \f \r and space: Python's ASCII whitespace except \x1c-\x1f (sent to the Unicode
    # path, since Arrow's ASCII kernels do not count them as whitespace).
    return (b == 0x20) | ((b - np.uint8(0x09)) <= np.uint8(0x04))


def _classify(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per string: (needs the Unicode path, may need whitespace work).

    Unicode path: any non-ASCII byte or a 0x1c-0x1f control. Whitespace work: any ASCII
    whitespace other than single interior spaces (tab, newline, ..., two spaces in a row, a
    space at either end).
    """
    off, _, buf = _string_buffers(arr)
    n = len(off) - 1
    lo, hi = (int(off[0]), int(off[-1])) if n else (0, 0)
    odd, pairs = [], []
    for s in range(lo, hi, _BLOCK):
        e = min(hi, s + _BLOCK)
        b = buf[s:e]
        # One pass finds every byte outside 0x20-0x7f (controls and non-ASCII, uint8 wrap-around);
        # they are few, and are told apart afterwards.
        hits = np.flatnonzero((b - np.uint8(0x20)) >= np.uint8(0x60))
        if len(hits):
            odd.append(hits + s)
        # Two spaces in a row, as 16-bit words at even and at odd offsets (half a pass each).
        ext = buf[s:min(hi, e + 1)]
        for k in (0, 1):
            w = ext[k:k + ((len(ext) - k) // 2) * 2].view(np.uint16)
            hits = np.flatnonzero(w == 0x2020)
            if len(hits):
                pairs.append(2 * hits + (s + k))
    uni = np.zeros(n, dtype=bool)
    ws = np.zeros(n, dtype=bool)
    if odd:
        pos = np.concatenate(odd)
        v = buf[pos]
        is_uni = (v >= 0x80) | ((v >= 0x1C) & (v <= 0x1F))
        row = np.searchsorted(off, pos, side="right") - 1
        uni[row[is_uni]] = True
        ws[row[~is_uni]] = True  # other controls: \t-\r are whitespace, the rest are harmless
    if pairs:
        ws[np.searchsorted(off, np.concatenate(pairs), side="right") - 1] = True
    nonempty = off[1:] > off[:-1]
    if len(buf):
        first = np.where(nonempty, off[:-1], 0)
        last = np.where(nonempty, off[1:] - 1, 0)
        ws |= nonempty & ((buf[first] == 0x20) | (buf[last] == 0x20))
    return uni, ws


def _exotic_whitespace(b: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """UTF-8 of whitespace Python splits on that is not ASCII whitespace: 0x1c-0x1f, U+0085,
    U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000 (NFKC has already
    turned most into spaces; all are listed so the check does not lean on that)."""
    return (((b >= 0x1C) & (b <= 0x1F))
            | ((b == 0xC2) & ((b1 == 0x85) | (b1 == 0xA0)))
            | ((b == 0xE1) & (b1 == 0x9A) & (b2 == 0x80))
            | ((b == 0xE2) & (b1 == 0x80) & ((b2 <= 0x8A) | (b2 == 0xA8) | (b2 == 0xA9) | (b2 == 0xAF)))
            | ((b == 0xE2) & (b1 == 0x81) & (b2 == 0x9F))
            | ((b == 0xE3) & (b1 == 0x80) & (b2 == 0x80)))


def _collapse_ascii_whitespace(arr: pa.Array) -> pa.Array:
    """Trim, and replace every run of ASCII whitespace by one space, on the UTF-8 bytes (no nulls).

    Exact for strings whose only whitespace is ASCII (UTF-8 continuation bytes are >= 0x80, so
    no multi-byte character is touched). Splitting into words and re-joining does the same in
    Arrow but costs ~15 ms per MB of text with line breaks; this is a few numpy passes.
    """
    arr = pc.ascii_trim_whitespace(arr)
    off, _, buf = _string_buffers(arr)
    n = len(off) - 1
    lo, hi = (int(off[0]), int(off[-1])) if n else (0, 0)
    pieces, drop_pos = [], []
    prev_ws = False  # trimmed strings start with a non-space, so runs never span two strings
    for s in range(lo, hi, _BLOCK):
        e = min(hi, s + _BLOCK)
        b = buf[s:e]
        ws = _is_ascii_ws(b)
        drop = ws.copy()
        drop[1:] &= ws[:-1]
        drop[0] &= prev_ws
        prev_ws = bool(ws[-1])
        keep = ~drop
        pieces.append(np.where(ws, np.uint8(0x20), b)[keep])
        drop_pos.append(np.flatnonzero(drop) + s)
    data = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
    dropped = np.zeros(n, dtype=np.int64)
    if drop_pos:
        pos = np.concatenate(drop_pos)
        dropped = np.bincount(np.searchsorted(off, pos, side="right") - 1, minlength=n)
    new_off = off - lo - np.concatenate([[0], np.cumsum(dropped)])
    off_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    return pa.Array.from_buffers(arr.type, n, [None, pa.py_buffer(new_off.astype(off_type)),
                                               pa.py_buffer(data)])


def normalise_text(arr: pa.Array) -> pa.Array:
    """NFKC, lower case, whitespace runs collapsed to one space, trimmed (vectorised).

    Equivalent to `" ".join(unicodedata.normalize("NFKC", s).lower().split())` on ordinary text.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        valid = pc.is_valid(arr)
        done = normalise_text(pc.fill_null(arr, ""))
        return pc.if_else(valid, done, pa.scalar(None, done.type))
    # ASCII is NFKC-stable and its lower case is ASCII's: clean ASCII text (most of it) needs one
    # cheap kernel; only strings with other characters pay for NFKC and Unicode case folding.
    uni, ws = _classify(arr)
    out = pc.ascii_lower(arr)
    if uni.any():
        mask = pa.array(uni)
        unicode = pc.utf8_lower(pc.utf8_normalize(arr.filter(mask), "NFKC"))
        out = pc.replace_with_mask(out, mask, unicode)
    work = ws | uni
    if not work.any():
        return out
    mask = pa.array(work)
    sub = out.filter(mask)
    off, _, buf = _string_buffers(sub)
    exotic = _scan_bytes(off, buf, _exotic_whitespace, lookahead=2)
    fixed = _collapse_ascii_whitespace(sub)
    if exotic.any():
        # Whitespace outside ASCII: Arrow's Unicode split (its pieces at the ends are empty, so
        # trim first), exact but slow, for the few strings that hold any.
        em = pa.array(exotic)
        joined = pc.binary_join(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(sub.filter(em))),
                                pa.scalar(" ", type=sub.type))
        fixed = pc.replace_with_mask(fixed, em, joined.cast(fixed.type))
    return pc.replace_with_mask(out, mask, fixed)


def _fmix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: a bijection that spreads every input bit."""
    h = h ^ (h >> _S33)
    h = h * _C1
    h = h ^ (h >> _S33)
    h = h * _C2
    return h ^ (h >> _S33)


def _rank_within(parent: np.ndarray, n_rows: int) -> np.ndarray:
    """Position of each element within its row, for elements listed row by row."""
    counts = np.bincount(parent, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.arange(len(parent)) - starts[parent]


def _salted(values: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """fmix(value ^ salt of its position): sums of these are order-sensitive (uint64 sums wrap
    mod 2^64, which numpy does silently for arrays)."""
    salt = _fmix((np.arange(int(rank.max()) + 1, dtype=np.uint64) + np.uint64(1)) * _GOLD)
    return _fmix(values.astype(np.uint64) ^ salt[rank])


def _prefix_hashes(values: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Hash of every prefix of each row's sequence of uint64 values, ending at each element.

    Elements are listed row by row (rank = position in the row). The hash of (v_0..v_k) is
    fmix(sum_i fmix(v_i ^ salt_i) ^ (k+1) * L) mod 2^64: position-salted, so order counts, and a
    plain sum, so every prefix of every row comes out of one cumulative sum.
    """
    if len(values) == 0:
        return np.zeros(0, dtype=np.uint64)
    cs = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(_salted(values, rank))])
    idx = np.arange(len(values))
    total = cs[idx + 1] - cs[idx - rank]
    return _fmix(total ^ ((rank.astype(np.uint64) + np.uint64(1)) * _LEN))


def _seq_hash(values: np.ndarray, parent: np.ndarray, rank: np.ndarray, n_rows: int) -> np.ndarray:
    """Hash of each row's whole sequence: `_prefix_hashes` at its last element, computed per
    row rather than per element. Rows without elements get fmix(0) = 0."""
    if len(values) == 0:
        return np.zeros(n_rows, dtype=np.uint64)
    cs = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(_salted(values, rank))])
    count = np.bincount(parent, minlength=n_rows)
    end = np.cumsum(count)
    total = cs[end] - cs[end - count]
    return _fmix(total ^ (count.astype(np.uint64) * _LEN))


def _prefix_hits(values: np.ndarray, parent: np.ndarray, rank: np.ndarray, n_rows: int,
                 targets: np.ndarray) -> np.ndarray:
    """Rows any of whose prefixes hashes into `targets` (sorted, unique)."""
    hit = np.zeros(n_rows, dtype=bool)
    if len(values) and len(targets):
        h = _prefix_hashes(values, rank)
        at = np.minimum(np.searchsorted(targets, h), len(targets) - 1)
        hit[parent[targets[at] == h]] = True
    return hit


def _structure(lengths: np.ndarray, role: np.ndarray) -> np.ndarray:
    """One value per message from its role and byte length: with the concatenated contents it
    pins down the conversation (the lengths place the message boundaries)."""
    return (lengths.astype(np.uint64) << np.uint64(2)) | role.astype(np.uint64)


@dataclass(frozen=True)
class MessageIndex:
    """Per-pool facts every static step needs; cacheable (independent of max length and method).

    A row's messages are offsets[i]:offsets[i+1] in flattened message order.
    """

    offsets: np.ndarray  # int64 [rows + 1]
    role: np.ndarray  # int8 per message: 0 system, 1 user, 2 assistant
    raw_len: np.ndarray  # int64 per message: UTF-8 bytes of the content
    norm_len: np.ndarray  # int64 per message: UTF-8 bytes of the normalised content
    user_norm: np.ndarray  # uint64 per message: xxh3 of the normalised content (user turns; else 0)
    row_raw: np.ndarray  # uint64 per row: xxh3 of the row's contents, concatenated
    row_norm: np.ndarray  # uint64 per row: xxh3 of the row's normalised contents, concatenated

    FIELDS = ("offsets", "role", "raw_len", "norm_len", "user_norm", "row_raw", "row_norm")


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


def _contents(table: pa.Table) -> pa.Array:
    """Every message's content, flattened (the pool was checked when it was indexed)."""
    col = table.column("messages")
    col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return pc.struct_field(pc.list_flatten(col), "content")


def message_index(messages: pa.Array | pa.ChunkedArray, *, where: str = "pool") -> MessageIndex:
    """Roles, content lengths and the content hashes of every row (and user turn) of a pool."""
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
    n, n_msg = len(offsets) - 1, int(offsets[-1])
    raw_len = np.empty(n_msg, dtype=np.int64)
    norm_len = np.empty(n_msg, dtype=np.int64)
    user_norm = np.zeros(n_msg, dtype=np.uint64)
    row_raw = np.empty(n, dtype=np.uint64)
    row_norm = np.empty(n, dtype=np.uint64)
    for r0, r1 in _row_chunks(offsets):
        m0, m1 = int(offsets[r0]), int(offsets[r1])
        part = content.slice(m0, m1 - m0)
        raw_off, raw_data, _ = _string_buffers(part)
        norm_off, norm_data, _ = _string_buffers(normalise_text(part))
        # A row's messages are contiguous in the flattened column, and so are their contents in
        # the data buffer: one hash per row covers the whole conversation.
        local = offsets[r0:r1 + 1] - m0
        row_raw[r0:r1] = _xxh_spans(raw_data, raw_off[local[:-1]], raw_off[local[1:]])
        row_norm[r0:r1] = _xxh_spans(norm_data, norm_off[local[:-1]], norm_off[local[1:]])
        user = np.flatnonzero(codes[m0:m1] == USER)
        user_norm[m0 + user] = _xxh_spans(norm_data, norm_off[user], norm_off[user + 1])
        raw_len[m0:m1] = np.diff(raw_off)
        norm_len[m0:m1] = np.diff(norm_off)
    return MessageIndex(offsets=offsets, role=codes, raw_len=raw_len, norm_len=norm_len,
                        user_norm=user_norm, row_raw=row_raw, row_norm=row_norm)


def _row_chunks(offsets: np.ndarray, messages: int = _CHUNK_MESSAGES) -> list[tuple[int, int]]:
    """Consecutive row ranges of about `messages` messages each (at least one row each).

    Text is processed a chunk at a time: the temporaries of a chunk (normalised copies, masks)
    are reused by the allocator for the next one, where whole-pool temporaries would each touch
    fresh memory; page faults made a whole-pool pass ~1.5x slower here.
    """
    n = len(offsets) - 1
    starts = np.arange(0, int(offsets[-1]), messages)
    bounds = np.unique(np.searchsorted(offsets, starts, side="right") - 1)
    bounds = [int(b) for b in bounds if 0 <= b < n]
    bounds = sorted(set([0, *bounds])) + [n]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def eval_prompt_hashes(messages: pa.Array | pa.ChunkedArray, *, where: str = "eval set") -> np.ndarray:
    """Normalised content hash of each eval item's prompt: its user turns, in order."""
    idx = message_index(messages, where=where)
    n = len(idx.offsets) - 1
    parent = np.repeat(np.arange(n), np.diff(idx.offsets))
    user = idx.role == USER
    pu = parent[user]
    return _seq_hash(idx.user_norm[user], pu, _rank_within(pu, n), n)


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
    """`message_index` of a pool, cached at cache_dir/index-<format>-<pool hash>.npz."""
    import io

    path = Path(cache_dir) / f"index-{INDEX_FORMAT}-{pool_hash[:32]}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            if set(MessageIndex.FIELDS) <= set(z.files):
                return MessageIndex(**{k: z[k] for k in MessageIndex.FIELDS})
    idx = message_index(table.column("messages"), where=where)
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, **{k: getattr(idx, k) for k in MessageIndex.FIELDS})
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
    prompt_raw: np.ndarray  # uint64: exact hash of every message but the last (DPO; SFT: 0)
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
            # A hash table (pandas), not a sort: O(n), and keep="first" is the rule above.
            dup = pd.Series(hashes).duplicated(keep="first").to_numpy()
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


def _draw_order(keys: np.ndarray) -> np.ndarray:
    """`np.argsort(keys, kind="stable")`, faster: numpy's default sort is SIMD and ~5x quicker,
    and without ties every correct sort gives the same order; ties (rare: 53-bit keys) get the
    stable sort, so the order never depends on the sort's internals or the CPU."""
    order = np.argsort(keys)
    ranked = keys[order]
    if len(ranked) > 1 and bool((ranked[1:] == ranked[:-1]).any()):
        return np.argsort(keys, kind="stable")
    return order


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
        drawn = _draw_order(keys[units.first])
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
