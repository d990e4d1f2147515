"""The builder's vectorised preparation: normalisation, content hashes, windows, chunks, cache."""

from __future__ import annotations

import unicodedata

import numpy as np
import pyarrow as pa
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic_pools import synthetic_pool

from mosaic.schemas import DataAction
from mosaic.data import MESSAGE_TYPE
from mosaic.tools.build_dataset import build_training_set
from mosaic.tools.dataset import hashing as bd
from mosaic.tools.dataset.allocation import _draw_order
from mosaic.tools.dataset.pools import PreparedPools
from mosaic.tools.dataset.token_counts import TokenCounts

# Every character class the normaliser treats differently: clean ASCII, ASCII whitespace,
# \x1c-\x1f, every non-ASCII whitespace Python splits on, NFKC-changing and case-changing
# characters, multi-byte characters next to spaces.
PIECES = ["a", "B", "z", "Q", " ", "  ", ".", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d",
          "\x1e", "\x1f", "\x00", "\x7f", "\x85", "\xa0", "\u1680", "\u2000", "\u2003", "\u200a",
          "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\u2019", "\u2014", "é", "É", "ﬁ",
          "½", "Ⅸ", "ẞ", "σ", "😀"]


def norm(s: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", s).lower().split())


texts = st.lists(st.lists(st.sampled_from(PIECES), max_size=40).map("".join), min_size=1,
                 max_size=40)


@settings(max_examples=120, deadline=None)
@given(texts, st.sampled_from([3, 8, 1 << 18]), st.integers(0, 2))
def test_normalise_text_equals_python_across_blocks_and_layouts(values, block, layout):
    bd_block = bd._BLOCK
    bd._BLOCK = block  # small blocks put block edges inside strings and inside double spaces
    try:
        arr = pa.array(values, type=pa.large_string() if layout == 2 else pa.string())
        if layout == 1:  # a slice: buffers start before the first string
            arr = pa.array(["x  y", *values]).slice(1)
        assert bd.normalise_text(arr).to_pylist() == [norm(v) for v in values]
    finally:
        bd._BLOCK = bd_block


def test_normalise_text_keeps_nulls_and_types():
    out = bd.normalise_text(pa.array(["A  b", None, " X\n", ""]))
    assert out.to_pylist() == ["a b", None, "x", ""]
    assert bd.normalise_text(pa.chunked_array([["Ab\t c"], ["D"]])).to_pylist() == ["ab c", "d"]
    assert bd.normalise_text(pa.array([], type=pa.string())).to_pylist() == []
    assert bd.normalise_text(pa.array(["Ab  c"], type=pa.large_string())).type == pa.large_string()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2**64 - 1), max_size=6), max_size=12))
def test_every_prefix_hash_matches_the_whole_sequence_hash_of_that_prefix(rows):
    # The eval guard compares prefix hashes of pool rows with whole-sequence hashes of eval
    # prompts: the two computations must agree exactly.
    values = np.array([v for r in rows for v in r], dtype=np.uint64)
    parent = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    rank = bd._rank_within(parent, len(rows))
    prefix = bd._prefix_hashes(values, rank)
    k = 0
    for r in rows:
        for j in range(len(r)):
            one = np.array(r[:j + 1], dtype=np.uint64)
            whole = bd._seq_hash(one, np.zeros(j + 1, dtype=np.int64), np.arange(j + 1), 1)
            assert whole[0] == prefix[k]
            k += 1
    seq = bd._seq_hash(values, parent, rank, len(rows))
    # order matters, and the empty sequence hashes to 0
    for i, r in enumerate(rows):
        if not r:
            assert seq[i] == 0
        elif r != r[::-1]:
            rev = np.array(r[::-1], dtype=np.uint64)
            assert bd._seq_hash(rev, np.zeros(len(r), dtype=np.int64), np.arange(len(r)), 1)[0] != seq[i]


def _conversations(convs: list[list[tuple[str, str]]]) -> pa.Array:
    return pa.array([[{"role": r, "content": c} for r, c in conv] for conv in convs],
                    type=MESSAGE_TYPE)


GOLDEN_CONVS = [[("user", "Hello  World"), ("assistant", "Hi.\n\nHow can I help?")],
                [("system", "Be brief."), ("user", "Café — ok?"), ("assistant", "Yes")],
                [("user", "a"), ("assistant", "b"), ("user", "C\u2028d"), ("assistant", "")]]


def test_index_hashes_are_xxh3_of_the_contents_and_eval_hashes_are_pinned():
    """Cached indexes are mixed with freshly computed eval hashes: the index holds plain xxh3-64
    of UTF-8 bytes (stable across versions and platforms), and any change to a definition must
    bump INDEX_FORMAT."""
    idx = bd.message_index(_conversations(GOLDEN_CONVS))
    assert bd.INDEX_FORMAT == 2
    contents = [c for conv in GOLDEN_CONVS for _, c in conv]
    assert idx.raw_len.tolist() == [len(c.encode()) for c in contents]
    assert idx.norm_len.tolist() == [len(norm(c).encode()) for c in contents]
    xxh = xxhash.xxh3_64_intdigest
    assert idx.row_raw.tolist() == [xxh("".join(c for _, c in conv).encode()) for conv in GOLDEN_CONVS]
    assert idx.row_norm.tolist() == [xxh("".join(norm(c) for _, c in conv).encode())
                                     for conv in GOLDEN_CONVS]
    users = [c for conv in GOLDEN_CONVS for r, c in conv if r == "user"]
    assert idx.user_norm[idx.role == bd.USER].tolist() == [xxh(norm(c).encode()) for c in users]
    assert not idx.user_norm[idx.role != bd.USER].any()
    evals = bd.eval_prompt_hashes(_conversations([[("user", "hello world")],
                                                  [("user", "A"), ("user", "c d")]]))
    assert [hex(int(h)) for h in evals] == ["0x1f63c5defdae11e3", "0xd1ea8d6cb57b9c63"]
    # both eval prompts are the user turns of a golden row, normalised (case, "  ", U+2028)
    prepared = PreparedPools({"p": _golden_pool()}, {"p": "jailbreak"},
                                {"p": np.full(3, 10)}, evals)
    assert prepared.candidates("sft")["p"].dropped["eval_overlap"] == 2


def _golden_pool() -> pa.Table:
    pool, _ = synthetic_pool("jailbreak", len(GOLDEN_CONVS), seed=7, invalid_rate=0.0)
    return pool.set_column(pool.schema.get_field_index("messages"), "messages",
                           _conversations(GOLDEN_CONVS))


def test_message_index_is_the_same_in_any_chunking(monkeypatch):
    pool, _ = synthetic_pool("jailbreak", 300, seed=3)
    whole = bd.message_index(pool.column("messages"))
    monkeypatch.setattr(bd, "_CHUNK_MESSAGES", 7)
    assert len(bd._row_chunks(whole.offsets, 7)) > 50
    chunked = bd.message_index(pool.column("messages"))
    for f in bd.MessageIndex.FIELDS:
        assert np.array_equal(getattr(whole, f), getattr(chunked, f)), f


def test_index_cache_is_versioned_and_reused(tmp_path, monkeypatch):
    pool, _ = synthetic_pool("ifeval", 50, seed=4)
    h = bd.pool_content_hash(pool)
    first = bd.cached_message_index(pool, tmp_path, pool_hash=h)
    files = list(tmp_path.glob("index-*.npz"))
    assert [f.name.split("-")[1] for f in files] == [str(bd.INDEX_FORMAT)]
    monkeypatch.setattr(bd, "message_index", lambda *a, **k: pytest.fail("cache not used"))
    again = bd.cached_message_index(pool, tmp_path, pool_hash=h)
    for f in bd.MessageIndex.FIELDS:
        assert np.array_equal(getattr(first, f), getattr(again, f)), f


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flip"])
def test_a_corrupt_index_cache_file_is_logged_and_rebuilt(tmp_path, caplog, damage):
    pool, _ = synthetic_pool("ifeval", 50, seed=4)
    h = bd.pool_content_hash(pool)
    first = bd.cached_message_index(pool, tmp_path, pool_hash=h)
    (path,) = tmp_path.glob("index-*.npz")
    data = path.read_bytes()
    broken = {"truncate": data[: len(data) // 2], "garbage": b"not a zip at all",
              "empty": b"",
              # One byte flipped inside the first array: only the zip CRC check sees it.
              "flip": data[:200] + bytes([data[200] ^ 0xFF]) + data[201:]}[damage]
    path.write_bytes(broken)
    with caplog.at_level("WARNING", logger=bd.__name__):
        again = bd.cached_message_index(pool, tmp_path, pool_hash=h)
    for f in bd.MessageIndex.FIELDS:
        assert np.array_equal(getattr(first, f), getattr(again, f)), f
    assert any(str(path) in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert path.read_bytes() == data  # rewritten whole: the next run reads it again
    assert bd.read_cache_file(path, bd.MessageIndex.FIELDS) is not None


def test_draw_order_is_the_stable_argsort_even_with_ties():
    rng = np.random.default_rng(0)
    keys = rng.random(10_000)
    assert np.array_equal(_draw_order(keys), np.argsort(keys, kind="stable"))
    tied = np.round(keys, 2)  # many ties: candidate order must break them
    assert np.array_equal(_draw_order(tied), np.argsort(tied, kind="stable"))


def test_windowed_rows_are_deduplicated_by_what_they_keep():
    """A windowed conversation is the same training sample as a stored one equal to its window
    (exactly, or after normalisation), wherever its system messages sit."""
    convs = [
        [("user", "A1"), ("assistant", "B1"), ("user", "C1"), ("assistant", "D1")],  # -> C1 D1
        [("user", "C1"), ("assistant", "D1")],  # exact duplicate of row 0's window
        [("user", "c1 "), ("assistant", "d1")],  # normalised duplicate
        [("system", "S"), ("user", "E"), ("assistant", "F"), ("user", "G"), ("assistant", "H")],
        [("system", "S"), ("user", "G"), ("assistant", "H")],  # duplicate of row 3's window
        [("user", "I"), ("assistant", "J"), ("system", "K"), ("user", "L"), ("assistant", "M")],
        [("system", "K"), ("user", "L"), ("assistant", "M")],  # duplicate of row 5's window
        [("user", "L"), ("assistant", "M")],  # not a duplicate: row 5 keeps its system message
    ]
    pool, _ = synthetic_pool("jailbreak", len(convs), seed=5, invalid_rate=0.0, dup_rate=0.0)
    pool = pool.set_column(pool.schema.get_field_index("messages"), "messages", _conversations(convs))
    # Rows 0, 3 and 5 are over 40 tokens; only their last turn (plus system messages) fits.
    per_msg = [[60, 10, 10, 10], [10, 10], [10, 10], [10, 60, 10, 10, 10], [10, 10, 10],
               [60, 10, 10, 10, 10], [10, 10, 10], [10, 10]]
    counts = TokenCounts(row=np.array([sum(m) for m in per_msg]),
                         message=np.array([t for m in per_msg for t in m]))
    prepared = PreparedPools({"safety": pool}, {"safety": "jailbreak"}, {"safety": counts},
                                max_length=40)
    cands = prepared.candidates("sft")["safety"]
    assert cands.windowed == 3
    assert cands.dropped["duplicate_exact"] == 3 and cands.dropped["duplicate_normalised"] == 1
    assert cands.rows.tolist() == [0, 3, 5, 7]
    table, _ = build_training_set(prepared, DataAction.model_validate({"mixture": {"safety": 1.0}}),
                                     10_000, 0)
    kept = {r["id"]: [(m["role"], m["content"]) for m in r["messages"]] for r in table.to_pylist()}
    ids = pool.column("id").to_pylist()
    assert kept[ids[0]] == convs[1] and kept[ids[3]] == convs[4] and kept[ids[5]] == convs[6]


def test_the_eval_guard_sees_the_window_and_the_whole_conversation():
    convs = [
        [("user", "warm up"), ("assistant", "ok"), ("user", "Secret  Eval"), ("assistant", "x")],
        [("user", "SECRET eval"), ("assistant", "y"), ("user", "more"), ("assistant", "z")],
        [("user", "secret"), ("assistant", "w")],
    ]
    pool, _ = synthetic_pool("jailbreak", len(convs), seed=6, invalid_rate=0.0, dup_rate=0.0)
    pool = pool.set_column(pool.schema.get_field_index("messages"), "messages", _conversations(convs))
    per_msg = [[60, 10, 10, 10], [10, 10, 10, 10], [10, 10]]
    counts = TokenCounts(row=np.array([sum(m) for m in per_msg]),
                         message=np.array([t for m in per_msg for t in m]))
    evals = bd.eval_prompt_hashes(_conversations([[("user", "secret eval")]]))
    prepared = PreparedPools({"safety": pool}, {"safety": "jailbreak"}, {"safety": counts},
                                evals, max_length=40)
    cands = prepared.candidates("sft")["safety"]
    # row 0 only as windowed (its window starts with the eval prompt), row 1 as stored
    assert cands.windowed == 1 and cands.dropped["eval_overlap"] == 2
    assert cands.rows.tolist() == [2]
