"""Token counts of pool samples under the model's own chat template, computed once and cached.

The builder spends a token budget, so counts must be what the trainer will see: the tokenizer's
`apply_chat_template` over the whole conversation. Per-message counts (prefix differences) come
along so the builder can window an over-long conversation by whole turns without re-tokenising.
Counts are cached on disk keyed by (pool content hash, tokenizer hash): a pool is tokenised once
per tokenizer, not once per round.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mosaic.io import atomic_write_bytes
from mosaic.tools.dataset.hashing import pool_content_hash, read_cache_file

CACHE_FORMAT = 1


@dataclass(frozen=True)
class TokenCounts:
    """Token counts of one pool, aligned with its rows (and flattened messages).

    `row[i]` is the exact chat-template length of row i. `message`, when present, holds one count
    per message in flattened order: the growth of the templated length when that message is
    appended, so `row[i] - sum(row i's message counts)` is the template's fixed overhead.
    """

    row: np.ndarray
    message: np.ndarray | None = None

    @classmethod
    def coerce(cls, value: "TokenCounts | np.ndarray | Any") -> "TokenCounts":
        if isinstance(value, TokenCounts):
            return value
        return cls(row=np.asarray(value, dtype=np.int64))


def tokenizer_hash(tokenizer: Any) -> str:
    """Content hash of a tokenizer: vocabulary/merges/normaliser plus its chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:  # slow tokenizers: the vocabulary is the best stable description available
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(b"\0chat_template\0")
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode("utf-8"))
    return h.hexdigest()


def _templated_lengths(tokenizer: Any, conversations: list[list[dict[str, str]]],
                       batch_size: int) -> np.ndarray:
    out = np.zeros(len(conversations), dtype=np.int64)
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        ids = tokenizer.apply_chat_template(batch, tokenize=True, return_dict=False)
        out[start:start + len(batch)] = [len(x) for x in ids]
    return out


def count_tokens(messages: pa.Array | pa.ChunkedArray, tokenizer: Any, *,
                 batch_size: int = 256, per_message: bool = True) -> TokenCounts:
    """Count tokens of each conversation in `messages` (list<struct<role, content>>)."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    lengths = pc.list_value_length(messages).to_numpy(zero_copy_only=False).astype(np.int64)
    # The tokenizer wants Python dicts; that conversion happens here, once per pool, never in
    # the builder's per-round hot path.
    convs: list[list[dict[str, str]]] = messages.to_pylist()
    row = _templated_lengths(tokenizer, convs, batch_size)
    if not per_message:
        return TokenCounts(row=row)
    try:
        base = len(tokenizer.apply_chat_template([], tokenize=True, return_dict=False))
    except Exception:  # some templates refuse an empty conversation; their overhead sits in c_0
        base = 0
    n_msg = int(lengths.sum())
    msg = np.zeros(n_msg, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    max_len = int(lengths.max()) if len(lengths) else 0
    prev = np.full(len(convs), base, dtype=np.int64)
    # Length of every prefix, one prefix length at a time, batched over all rows that long.
    for k in range(1, max_len + 1):
        rows = np.flatnonzero(lengths >= k)
        if k == 1:
            cur = _templated_lengths(tokenizer, [convs[i][:1] for i in rows], batch_size)
        else:
            full = lengths[rows] == k
            cur = np.empty(len(rows), dtype=np.int64)
            cur[full] = row[rows[full]]
            part = rows[~full]
            cur[~full] = _templated_lengths(tokenizer, [convs[i][:k] for i in part], batch_size)
        msg[offsets[rows] + k - 1] = cur - prev[rows]
        prev[rows] = cur
    if (msg < 0).any():
        # A template whose rendering of a prefix is longer than of the whole (rare) makes
        # differences meaningless; fall back to per-row counts (no windowing) rather than lie.
        return TokenCounts(row=row)
    return TokenCounts(row=row, message=msg)


def cached_token_counts(table: pa.Table, tokenizer: Any, cache_dir: str | Path, *,
                        pool_hash: str | None = None, batch_size: int = 256) -> TokenCounts:
    """`count_tokens` over `table["messages"]`, cached at cache_dir/<pool>-<tokenizer>.npz."""
    pool_hash = pool_hash or pool_content_hash(table)
    key = hashlib.sha256(f"{CACHE_FORMAT}:{pool_hash}:{tokenizer_hash(tokenizer)}".encode()).hexdigest()
    path = Path(cache_dir) / f"tokens-{key[:32]}.npz"
    z = read_cache_file(path, ("row", "n_rows", "has_message", "message"))
    if z is not None and int(z["n_rows"]) == table.num_rows and len(z["row"]) == table.num_rows:
        msg = z["message"] if bool(z["has_message"]) else None
        return TokenCounts(row=z["row"], message=msg)
    counts = count_tokens(table.column("messages"), tokenizer, batch_size=batch_size)
    buf = io.BytesIO()
    np.savez(buf, row=counts.row, n_rows=np.int64(table.num_rows),
             has_message=np.bool_(counts.message is not None),
             message=counts.message if counts.message is not None else np.zeros(0, np.int64))
    atomic_write_bytes(path, buf.getvalue())
    return counts
