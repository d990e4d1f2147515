"""Assembly and output of a built training set: the selected rows as one Arrow table in the
training-file format (docs/data-format.md), its reproducible parquet bytes, and the atomic write
of train.parquet + manifest.json (the completion marker).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mosaic.data import MESSAGE_TYPE
from mosaic.io import atomic_write_bytes, atomic_write_json
from mosaic.schemas import DatasetManifest

if TYPE_CHECKING:
    from mosaic.tools.dataset.allocation import Units
    from mosaic.tools.dataset.pools import Candidates, PreparedPools

TRAIN_FILE = "train.parquet"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Selection:
    """What one bucket of one objective took: indices into its objective's units."""

    objective: str
    bucket: str
    cands: "Candidates"
    units: "Units"
    chosen: np.ndarray

    def windowed_rows(self) -> int:
        return int(np.sum(self.cands.window_start[self.units.first[self.chosen]] > 0))


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


def assemble(prepared: "PreparedPools", parts: list[Selection], method: str) -> pa.Table:
    """The output table: objectives in config order, each pool's rows in pool order.

    Output order carries no meaning (trainers shuffle with their own seed each epoch), and
    ascending takes from a large pool are several times cheaper than a shuffled gather.
    """
    by_pool: dict[str, list[Selection]] = {}
    for p in parts:
        by_pool.setdefault(p.objective, []).append(p)
    cols: dict[str, list[pa.Array]] = {}

    def add(name: str, arr: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        cols.setdefault(name, []).append(arr)

    for name in prepared.objectives:
        plist = by_pool.get(name)
        if not plist:
            continue
        cands, units = plist[0].cands, plist[0].units
        table = prepared.tables[name]
        # Units are in candidate order and candidates in pool order, so a mask over units
        # yields the selection sorted by pool row (SFT) or chosen row (DPO) without a sort.
        picked = np.full(len(units.first), -1, dtype=np.int32)
        for i, p in enumerate(plist):
            picked[p.chosen] = i
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
        labels = pa.array([p.bucket for p in plist], type=pa.string())
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
