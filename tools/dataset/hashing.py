"""Content identity of conversations, vectorised: text normalisation, xxh3 hashes of rows and
user turns, the per-pool message index (cached on disk), eval-prompt hashes and pool hashes.

Row identity is 64-bit: xxh3 of the conversation's concatenated contents, mixed with a hash of
its (role, length) sequence, which fixes the message boundaries. A collision can only drop an
extra row, never let an eval item or a duplicate through; at a million rows the chance that one
happens at all is about n^2 / 2^65 ~ 3e-8 (dedup) and n_prefixes x n_eval / 2^64 (eval guard),
so 64 bits is enough and halves the memory of 128. The only per-item Python work is one C-level
xxh3 call per conversation and per user turn (Arrow has no scalar hash kernel, and hashing
variable-length strings in numpy measured slower: see `_xxh_spans`).
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from mosaic.data import ROLES
from mosaic.io import atomic_write_bytes

log = logging.getLogger(__name__)

SYSTEM, USER, ASSISTANT = 0, 1, 2  # codes of ROLES in a message index
# Part of the index cache's file name: bump it whenever a hash definition or a field changes,
# so an index written by an older release is never mixed with freshly computed eval hashes.
INDEX_FORMAT = 2

_GOLD = np.uint64(0x9E3779B97F4A7C15)
_LEN = np.uint64(0xD6E8FEB86659FD93)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_BLOCK = 1 << 18  # bytes per block of the byte scans: temporaries stay in cache (measured best)
_CHUNK_MESSAGES = 1 << 18  # messages per chunk of text processing (see _row_chunks)


class PoolError(ValueError):
    """A pool, its token counts or an eval set is malformed; the message names which and where."""



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


# What reading a truncated or overwritten .npz raises (np.load parses a zip of .npy files).
_CACHE_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def read_cache_file(path: Path, fields: Iterable[str]) -> dict[str, np.ndarray] | None:
    """The arrays `fields` of an .npz cache file, or None when it is absent, lacks a field or
    cannot be read. A corrupt file (a crash mid-copy, a full disk, a hand edit) is logged and
    reported as absent, so the caller recomputes and overwrites it instead of failing on it
    every run."""
    if not path.is_file():
        return None
    fields = list(fields)
    try:
        with np.load(path, allow_pickle=False) as z:
            if not set(fields) <= set(z.files):
                return None  # an older layout: rebuilt like a missing file
            # Indexing reads each member in full, so a damaged one fails here, not later.
            return {k: z[k] for k in fields}
    except _CACHE_READ_ERRORS as e:
        log.warning("pool cache file %s is corrupt (%s: %s); rebuilding it", path,
                    type(e).__name__, e)
        return None


def cached_message_index(table: pa.Table, cache_dir: str | Path | None, *, pool_hash: str,
                         where: str = "pool") -> MessageIndex:
    """`message_index` of a pool, cached at cache_dir/index-<format>-<pool hash>.npz."""
    import io

    path = Path(cache_dir) / f"index-{INDEX_FORMAT}-{pool_hash[:32]}.npz" if cache_dir else None
    cached = read_cache_file(path, MessageIndex.FIELDS) if path is not None else None
    if cached is not None:
        return MessageIndex(**cached)
    idx = message_index(table.column("messages"), where=where)
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, **{k: getattr(idx, k) for k in MessageIndex.FIELDS})
        atomic_write_bytes(path, buf.getvalue())
    return idx
