"""The dataset builder: budget, eval-overlap, dedup, focus and reproducibility guarantees."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from synthetic_pools import IF_IDS, synthetic_eval, synthetic_pool

from mosaic.eval import get_objective_type
from mosaic.schemas import DataAction
from mosaic.data import MESSAGE_TYPE
from mosaic.tools import build_dataset as bd
from mosaic.tools.build_dataset import (PoolError, build_training_set, check_and_build,
                                        write_training_set)
from mosaic.tools.dataset.allocation import greedy_fill
from mosaic.tools.dataset.assemble import parquet_bytes
from mosaic.tools.dataset.hashing import eval_prompt_hashes, normalise_text
from mosaic.tools.dataset.pools import PreparedPools, criteria_mask
from mosaic.tools.dataset.token_counts import TokenCounts
from mosaic.tools.validate_action import ActionContext, validate_action

TYPES = {"safety": "jailbreak", "boundary": "overrefusal", "instruction": "ifeval"}
REPO = Path(__file__).resolve().parents[1]


def norm(s: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", s).lower().split())


def user_seq(messages: list[dict[str, str]]) -> tuple[str, ...]:
    return tuple(norm(m["content"]) for m in messages if m["role"] == "user")


def make_world(seed: int, sizes: tuple[int, int, int], *, max_length: int | None = 200,
               per_message: bool = True, n_eval: int = 6):
    pools, counts, evals = {}, {}, {}
    for i, (name, t) in enumerate(TYPES.items()):
        pools[name], c = synthetic_pool(t, sizes[i], seed=seed * 7 + i, objective=name,
                                        responses_per_prompt=3, dup_rate=0.08)
        counts[name] = c if per_message else TokenCounts(row=c.row)
        evals[name] = synthetic_eval(pools[name], t, n_eval, seed=seed + 100 + i)
    eval_hashes = np.concatenate([eval_prompt_hashes(e.column("messages")) for e in evals.values()])
    prepared = PreparedPools(pools, TYPES, counts, eval_hashes, max_length=max_length)
    return prepared, pools, evals


def reference_eval_prompts(evals) -> set[tuple[str, ...]]:
    return {user_seq(m) for e in evals.values() for m in e.column("messages").to_pylist()}


# ---- strategies ---------------------------------------------------------------------------


def _criteria(draw, otype):
    out = {}
    for key in draw(st.lists(st.sampled_from(sorted(otype.focus_keys)), max_size=2, unique=True)):
        spec = otype.focus_keys[key]
        if spec.kind == "range":
            lo_b, hi_b = spec.bounds
            lo = draw(st.integers(int(lo_b), int(hi_b)))
            out[key] = [lo, draw(st.integers(lo, int(hi_b)))]
        else:
            values = spec.values if spec.values is not None else IF_IDS
            out[key] = draw(st.lists(st.sampled_from(list(values)), min_size=1, max_size=3,
                                     unique=True))
    return out


@st.composite
def actions(draw):
    names = list(TYPES)
    ws = [draw(st.integers(0, 10)) for _ in names]
    if sum(ws) == 0:
        ws[0] = 1
    mixture = {n: w / sum(ws) for n, w in zip(names, ws) if w > 0}
    objectives = {}
    for n in names:
        if not draw(st.booleans()):
            continue
        otype = get_objective_type(TYPES[n])
        oa: dict = {}
        if draw(st.booleans()):
            bs = draw(st.lists(st.sampled_from(list(otype.slices)), min_size=1, max_size=3, unique=True))
            bw = [draw(st.integers(1, 5)) for _ in bs]
            oa["bucket_weights"] = {b: w / sum(bw) for b, w in zip(bs, bw)}
        include, exclude = _criteria(draw, otype), _criteria(draw, otype)
        if include or exclude:
            oa["focus"] = {"include": include, "exclude": exclude}
        oa["focus_ratio"] = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]))
        oa["quality_threshold"] = draw(st.sampled_from([None, None, 3.0, 4.5]))
        objectives[n] = oa
    return {"mixture": mixture, "objectives": objectives,
            "quality_threshold": draw(st.sampled_from([None, 1.0, 2.5, 3.0, 4.0])),
            "method": draw(st.sampled_from(["sft", "sft", "dpo"])), "rationale": "property test"}


def threshold_of(action: DataAction, objective: str) -> float | None:
    """The quality threshold that applies to an objective: its own, else the action's."""
    oa = action.objectives.get(objective)
    return oa.quality_threshold if oa and oa.quality_threshold is not None else action.quality_threshold


# ---- vectorised primitives against sequential references ----------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=80), st.integers(0, 600))
def test_greedy_fill_equals_the_sequential_pass(tokens, cap):
    arr = np.array(tokens, dtype=np.int64)
    expected, left = [], cap
    for t in tokens:
        fits = t <= left
        expected.append(fits)
        left -= t if fits else 0
    got = greedy_fill(arr, cap)
    assert got.tolist() == expected
    assert int(arr[got].sum()) <= cap


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet="aBcÉ xY\t\n\r\x0b\x1c\xa0\u2003\u2028\u3000ﬁ½Ⅸ.,", max_size=30), min_size=1, max_size=20))
def test_normalise_text_equals_the_python_reference(texts):
    got = normalise_text(pa.array(texts)).to_pylist()
    assert got == [norm(t) for t in texts]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fast_focus_masks_equal_the_objective_types_masks(data):
    prepared, _, _ = make_world(data.draw(st.integers(0, 5)), (60, 60, 60))
    for name, cands in prepared.candidates("sft").items():
        otype = cands.otype
        criteria = _criteria(data.draw, otype)
        frame = cands.focus_table.to_pandas(types_mapper=pd.ArrowDtype)
        expected = otype.criteria_mask(frame, criteria)
        assert criteria_mask(cands, criteria).tolist() == list(map(bool, expected))


# ---- the build's guarantees over random pools and actions ----------------------------------


def _pool_frames(pools):
    return {n: t.to_pandas(types_mapper=pd.ArrowDtype) for n, t in pools.items()}


def _check_guarantees(prepared, pools, evals, action, budget, table, manifest):
    assert manifest.total_tokens <= budget
    assert int(pa.compute.sum(table["tokens"]).as_py() or 0) == manifest.total_tokens
    assert table.num_rows == manifest.total_rows
    for name, alloc in manifest.allocations.items():
        used = sum(b.tokens_used for b in manifest.buckets if b.objective == name)
        assert used <= alloc
        assert alloc <= int(budget * action.mixture.get(name, 0.0)) + 1
    for b in manifest.buckets:
        assert 0 <= b.tokens_used <= b.allocation
        assert b.shortfall == b.allocation - b.tokens_used
    rows = table.to_pylist()
    for b in manifest.buckets:
        mine = [r for r in rows if r["objective"] == b.objective and r["bucket"] == b.bucket]
        assert sum(r["tokens"] for r in mine) == b.tokens_used
        assert len(mine) == b.rows
        assert sum(r["focus"] for r in mine) == b.focus_rows
    # no eval item: no prefix of a training sample's user turns equals an eval prompt
    eval_prompts = reference_eval_prompts(evals)
    for r in rows:
        msgs = r["messages"] if action.method == "sft" else r["prompt"]
        seq = user_seq(msgs)
        assert not {seq[:k] for k in range(1, len(seq) + 1)} & eval_prompts
    # focus rows really match include and nothing matches exclude (the objective type's own masks)
    frames = _pool_frames(pools)
    for name in {r["objective"] for r in rows}:
        oa = action.objectives.get(name)
        frame = frames[name]
        ids = frame["id"].astype(str).tolist()
        pos = {i: k for k, i in enumerate(ids)}
        otype = get_objective_type(TYPES[name])
        inc = otype.criteria_mask(frame, oa.focus.include) if oa and oa.focus else np.zeros(len(frame), bool)
        exc = otype.criteria_mask(frame, oa.focus.exclude) if oa and oa.focus else np.zeros(len(frame), bool)
        for r in (r for r in rows if r["objective"] == name):
            refs = [r["id"]] if action.method == "sft" else [r["chosen_id"], r["rejected_id"]]
            k = [pos[x] for x in refs]
            assert not any(exc[i] for i in k)
            assert bool(r["focus"]) == any(inc[i] for i in k)
    if action.method == "sft":
        # no exact or normalised duplicates in the output, and quality threshold honoured
        keys = [tuple((m["role"], norm(m["content"])) for m in r["messages"]) for r in rows]
        assert len(keys) == len(set(keys))
        for r in rows:
            q = threshold_of(action, r["objective"])
            assert q is None or r["score"] >= q
        for r in rows:
            assert r["messages"][-1]["role"] == "assistant"
            if prepared.max_length is not None:
                assert r["tokens"] <= prepared.max_length
    else:
        for r in rows:
            assert r["chosen_score"] > r["rejected_score"]
            q = threshold_of(action, r["objective"])
            assert q is None or r["chosen_score"] >= q


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 50), sizes=st.tuples(*[st.integers(40, 200)] * 3), raw=actions(),
       budget=st.integers(200, 40_000), build_seed=st.integers(0, 3))
def test_build_guarantees_hold_for_random_pools_and_actions(seed, sizes, raw, budget, build_seed):
    prepared, pools, evals = make_world(seed, sizes)
    action = DataAction.model_validate(raw)
    verdict = validate_action(raw, ActionContext(objectives=TYPES, budget=budget, pools=prepared,
                                                 seed=build_seed))
    # Random actions are well-formed; only the pools' capacity may be insufficient, or a tiny
    # pool may hold none of the constraint ids the action includes.
    codes = {p.code for p in verdict.problems
             if not (p.code == "unknown_focus_value" and "failed_constraint" in p.path)}
    assert codes <= {"unfillable"}, verdict.problems
    table, manifest = build_training_set(prepared, action, budget, build_seed)
    event(f"{action.method}, output {'empty' if table.num_rows == 0 else 'non-empty'}, "
          f"focus rows {'present' if any(table.column('focus').to_pylist()) else 'absent'}")
    _check_guarantees(prepared, pools, evals, action, budget, table, manifest)
    # When the check passed, its supply figures are the builder's.
    if verdict.ok:
        for b in manifest.buckets:
            assert b.available_tokens >= b.allocation or b.allocation == 0
    # Same inputs and seed, freshly prepared: byte-identical output and identical manifest.
    prepared2, _, _ = make_world(seed, sizes)
    table2, manifest2 = build_training_set(prepared2, action, budget, build_seed)
    assert parquet_bytes(table) == parquet_bytes(table2)
    assert manifest.model_dump() == manifest2.model_dump()


_CROSS_PROCESS = """
import sys; sys.path.insert(0, {tests!r})
from test_build_dataset import make_world
from mosaic.schemas import DataAction
from mosaic.tools.build_dataset import build_training_set
prepared, _, _ = make_world(3, (120, 90, 80))
action = DataAction.model_validate({action!r})
_, manifest = build_training_set(prepared, action, 9000, 7)
print(manifest.output_hash)
"""


def test_output_is_byte_identical_across_processes():
    action = {"mixture": {"safety": 0.5, "boundary": 0.3, "instruction": 0.2},
              "objectives": {"safety": {"focus": {"include": {"leak_types": ["step_leak"]}},
                                        "focus_ratio": 0.5}}}
    prepared, _, _ = make_world(3, (120, 90, 80))
    _, manifest = build_training_set(prepared, DataAction.model_validate(action), 9000, 7)
    code = _CROSS_PROCESS.format(tests=str(REPO / "tests"), action=action)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == manifest.output_hash


# ---- specific behaviours -------------------------------------------------------------------


def test_eval_prompts_are_dropped_even_when_case_and_spacing_differ():
    prepared, pools, evals = make_world(1, (150, 150, 150), n_eval=10)
    eval_prompts = reference_eval_prompts(evals)
    for name, cands in prepared.candidates("sft").items():
        msgs = pools[name].column("messages").to_pylist()
        flagged = {i for i, m in enumerate(msgs)
                   if {user_seq(m)[:k] for k in range(1, len(user_seq(m)) + 1)} & eval_prompts}
        # Some eval items are copies of pool prompts, so the guard must fire; no flagged row
        # survives (a row windowing would shorten is judged by its full conversation too), and
        # each is counted once, under eval_overlap or the earlier too_long.
        assert flagged
        assert not flagged & set(cands.rows.tolist())
        assert cands.dropped["eval_overlap"] <= len(flagged) <= \
            cands.dropped["eval_overlap"] + cands.dropped["too_long"]
    action = DataAction.model_validate({"mixture": {"safety": 0.4, "boundary": 0.3,
                                                    "instruction": 0.3}})
    table, manifest = build_training_set(prepared, action, 10**7, 0)
    assert manifest.dropped["eval_overlap"] > 0
    for r in table.to_pylist():
        seq = user_seq(r["messages"])
        assert not {seq[:k] for k in range(1, len(seq) + 1)} & eval_prompts


def test_exact_and_normalised_duplicates_are_counted_and_removed():
    prepared, pools, _ = make_world(2, (200, 200, 200), max_length=None, n_eval=0)
    seen_exact, seen_norm = set(), set()
    exp_exact = exp_norm = 0
    cands = prepared.candidates("sft")
    for name in TYPES:
        valid = pools[name].column("valid").to_pylist()
        for m, ok in zip(pools[name].column("messages").to_pylist(), valid):
            if not ok:
                continue
            ek = tuple((x["role"], x["content"]) for x in m)
            nk = tuple((x["role"], norm(x["content"])) for x in m)
            if ek in seen_exact:
                exp_exact += 1
            elif nk in seen_norm:
                exp_norm += 1
            seen_exact.add(ek)
            seen_norm.add(nk)
    assert exp_exact > 0 and exp_norm > 0
    assert sum(c.dropped["duplicate_exact"] for c in cands.values()) == exp_exact
    assert sum(c.dropped["duplicate_normalised"] for c in cands.values()) == exp_norm


def test_over_long_conversations_are_windowed_by_turn_or_dropped():
    prepared, pools, _ = make_world(4, (300, 50, 50), max_length=60, n_eval=0)
    cands = prepared.candidates("sft")["safety"]
    assert cands.windowed > 0 and cands.dropped["too_long"] > 0
    action = DataAction.model_validate({"mixture": {"safety": 1.0}})
    table, manifest = build_training_set(prepared, action, 10**6, 0)
    originals = {r["id"]: r["messages"] for r in pools["safety"].select(["id", "messages"]).to_pylist()}
    rows = [r for r in table.to_pylist() if r["windowed"]]
    assert rows and manifest.windowed_rows == len(rows)
    for r in rows:
        orig = originals[r["id"]]
        body = [m for m in r["messages"] if m["role"] != "system"]
        orig_body = [m for m in orig if m["role"] != "system"]
        assert r["tokens"] <= 60
        assert body[0]["role"] == "user" and body[-1]["role"] == "assistant"
        assert len(body) < len(orig_body) and orig_body[-len(body):] == body  # a suffix of turns
        assert [m for m in r["messages"] if m["role"] == "system"] == \
            [m for m in orig if m["role"] == "system"]
    # Without per-message counts nothing can be windowed: over-long rows are dropped instead.
    prepared2, _, _ = make_world(4, (300, 50, 50), max_length=60, per_message=False, n_eval=0)
    c2 = prepared2.candidates("sft")["safety"]
    assert c2.windowed == 0
    assert c2.dropped["too_long"] == cands.dropped["too_long"] + cands.windowed


def test_dpo_pairs_follow_the_rules_and_trl_conversational_format():
    prepared, pools, evals = make_world(5, (240, 240, 240), max_length=None)
    action = DataAction.model_validate({"mixture": {"safety": 0.3, "boundary": 0.4,
                                                    "instruction": 0.3},
                                        "quality_threshold": 3.0, "method": "dpo"})
    table, manifest = build_training_set(prepared, action, 20_000, 1)
    assert table.num_rows > 0 and manifest.method == "dpo"
    assert set(table.column_names) >= {"prompt", "chosen", "rejected"}
    by_id = {n: {r["id"]: r for r in pools[n].to_pylist()} for n in TYPES}
    # The rows any pair may use: the candidates left after the static filters (dedup, eval
    # overlap, invalid labels), grouped by prompt.
    scores_of: dict[tuple[str, str], list[float]] = {}
    for n, cands in prepared.candidates("dpo").items():
        rows = pools[n].to_pylist()
        for i in cands.rows.tolist():
            scores_of.setdefault((n, rows[i]["prompt_id"]), []).append(rows[i]["score"])
    for r in table.to_pylist():
        src = by_id[r["objective"]]
        c, j = src[r["chosen_id"]], src[r["rejected_id"]]
        assert c["prompt_id"] == j["prompt_id"] == r["prompt_id"]
        assert r["prompt"] == c["messages"][:-1]
        assert r["chosen"] == [c["messages"][-1]] and r["chosen"][0]["role"] == "assistant"
        assert r["rejected"] == [j["messages"][-1]] and r["rejected"][0]["role"] == "assistant"
        assert c["score"] >= 3.0 and c["score"] > j["score"]
        # chosen is the best eligible response, rejected the worst, among the prompt's rows
        group = scores_of[(r["objective"], r["prompt_id"])]
        assert c["score"] == max(s for s in group if s >= 3.0)
        assert j["score"] == min(group)
        assert r["chosen_score"] == c["score"] and r["rejected_score"] == j["score"]
        assert r["tokens"] > 0
    assert manifest.total_tokens <= 20_000


def test_bucket_weights_restrict_buckets_and_default_is_proportional():
    prepared, _, _ = make_world(6, (300, 100, 100), max_length=None, n_eval=0)
    action = DataAction.model_validate({
        "mixture": {"safety": 1.0},
        "objectives": {"safety": {"bucket_weights": {"complexity_2": 0.25, "complexity_3": 0.75}}}})
    table, manifest = build_training_set(prepared, action, 6000, 0)
    assert {b.bucket for b in manifest.buckets} == {"complexity_2", "complexity_3"}
    assert set(table.column("bucket").to_pylist()) <= {"complexity_2", "complexity_3"}
    alloc = {b.bucket: b.allocation for b in manifest.buckets}
    assert alloc == {"complexity_2": 1500, "complexity_3": 4500}
    plain = DataAction.model_validate({"mixture": {"safety": 1.0}})
    _, m2 = build_training_set(prepared, plain, 6000, 0)
    avail = {b.bucket: b.available_tokens for b in m2.buckets}
    total = sum(avail.values())
    assert {b.bucket: b.allocation for b in m2.buckets} == {k: 6000 * v // total for k, v in avail.items()}


def test_focus_rows_come_first_up_to_the_focus_ratio():
    prepared, _, _ = make_world(7, (400, 50, 50), max_length=None, n_eval=0)
    include = {"pc_patterns": ["P4_C3", "P5_C3", "P2_C4"], "safety": ["safe"]}
    for ratio in (0.0, 0.5, 1.0):
        action = DataAction.model_validate({
            "mixture": {"safety": 1.0},
            "objectives": {"safety": {"focus": {"include": include}, "focus_ratio": ratio}}})
        _, manifest = build_training_set(prepared, action, 5000, 3)
        biggest = int(prepared.candidates("sft")["safety"].tokens.max())
        for b in manifest.buckets:
            want = min(b.focus_allocation, b.focus_available_tokens)
            assert b.focus_allocation == int(b.allocation * ratio)
            # Every focus row the focus phase skipped was larger than what was left, so it
            # stops less than one row short of its target (or takes every focus row).
            assert b.focus_tokens > want - biggest or b.focus_tokens == b.focus_available_tokens
            assert b.focus_tokens <= b.tokens_used <= b.allocation


def test_write_is_atomic_and_the_manifest_hashes_the_file(tmp_path):
    prepared, _, _ = make_world(8, (100, 100, 100))
    action = DataAction.model_validate({"mixture": {"safety": 0.2, "boundary": 0.5,
                                                    "instruction": 0.3}})
    table, manifest = build_training_set(prepared, action, 8000, 0)
    out = write_training_set(tmp_path / "ds", table, manifest)
    data = (out / "train.parquet").read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest.output_hash
    assert json.loads((out / "manifest.json").read_text())["output_hash"] == manifest.output_hash
    assert pq.read_table(out / "train.parquet").equals(table)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.parquet"]
    assert set(manifest.pool_hashes) == set(TYPES)


def test_different_seeds_draw_different_rows():
    prepared, _, _ = make_world(9, (300, 300, 300), max_length=None)
    action = DataAction.model_validate({"mixture": {"safety": 0.4, "boundary": 0.3,
                                                    "instruction": 0.3}})
    a, _ = build_training_set(prepared, action, 8000, 0)
    b, _ = build_training_set(prepared, action, 8000, 1)
    assert set(a.column("id").to_pylist()) != set(b.column("id").to_pylist())


def test_an_invalid_action_never_reaches_the_builder(tmp_path, monkeypatch):
    prepared, _, _ = make_world(10, (100, 100, 100))
    calls = []
    real = bd.build_training_set
    monkeypatch.setattr(bd, "build_training_set", lambda *a, **k: calls.append(1) or real(*a, **k))
    ctx = ActionContext(objectives=TYPES, budget=5000, pools=prepared)
    bad = '{"mixture": {"safety": 0.7, "boundary": 0.7}}'
    outcome = check_and_build(bad, ctx, seed=0, out_dir=tmp_path / "ds")
    assert outcome.verdict.status == "invalid" and outcome.table is None
    assert calls == [] and not (tmp_path / "ds").exists()
    good = '{"mixture": {"safety": 0.5, "boundary": 0.5}}'
    outcome = check_and_build(good, ctx, seed=0, out_dir=tmp_path / "ds")
    assert outcome.verdict.ok and calls == [1]
    assert (tmp_path / "ds" / "manifest.json").is_file()
    # the builder itself refuses what the check would have refused
    with pytest.raises(ValueError, match="validate_action"):
        build_training_set(prepared, DataAction.model_validate(json.loads(bad)), 5000, 0)


def test_malformed_pools_raise_errors_that_name_the_problem():
    pool, counts = synthetic_pool("jailbreak", 30, seed=1, objective="safety")
    with pytest.raises(PoolError, match=r"missing column\(s\) \['l2_pressure'\]"):
        PreparedPools({"safety": pool.drop_columns(["l2_pressure"])}, {"safety": "jailbreak"},
                      {"safety": counts})
    with pytest.raises(PoolError, match="token counts have 29 entries for 30 rows"):
        PreparedPools({"safety": pool}, {"safety": "jailbreak"}, {"safety": counts.row[:-1]})
    msgs = pool.column("messages").to_pylist()
    msgs[4] = msgs[4][:-1] + [{"role": "user", "content": "x"}]
    bad = pool.set_column(pool.schema.get_field_index("messages"), "messages",
                          pa.array(msgs, type=MESSAGE_TYPE))
    with pytest.raises(PoolError, match="row 4: the last message must be the assistant"):
        PreparedPools({"safety": bad}, {"safety": "jailbreak"}, {"safety": counts.row})
    msgs[4][0]["role"] = "robot"
    bad = pool.set_column(pool.schema.get_field_index("messages"), "messages",
                          pa.array(msgs, type=MESSAGE_TYPE))
    with pytest.raises(PoolError, match="row 4, message 0: role 'robot'"):
        PreparedPools({"safety": bad}, {"safety": "jailbreak"}, {"safety": counts.row})


# ---- token counts and the command line ----------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from mosaic.training.tokenizer import build_tokenizer

    pool, _ = synthetic_pool("jailbreak", 200, seed=0)
    texts = [m["content"] for conv in pool.column("messages").to_pylist() for m in conv]
    return build_tokenizer(texts, vocab_size=400)


def test_token_counts_follow_the_chat_template_and_are_cached(tokenizer, tmp_path, monkeypatch):
    from mosaic.tools.dataset import token_counts as tc

    pool, _ = synthetic_pool("jailbreak", 40, seed=11)
    counts = tc.cached_token_counts(pool, tokenizer, tmp_path)
    convs = pool.column("messages").to_pylist()
    expected = [len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in convs]
    assert counts.row.tolist() == expected
    lengths = [len(c) for c in convs]
    per_row = np.add.reduceat(counts.message, np.r_[0, np.cumsum(lengths)[:-1]])
    assert (per_row == counts.row).all()  # this template has no fixed overhead
    # each message's count is what appending it adds to the templated length
    first = convs[0]
    assert counts.message[0] == len(tokenizer.apply_chat_template(first[:1], tokenize=True,
                                                                  return_dict=False))
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1
    monkeypatch.setattr(tc, "count_tokens", lambda *a, **k: pytest.fail("cache not used"))
    again = tc.cached_token_counts(pool, tokenizer, tmp_path)
    assert (again.row == counts.row).all() and (again.message == counts.message).all()


def test_a_truncated_token_count_cache_is_logged_and_rebuilt(tokenizer, tmp_path, caplog):
    from mosaic.tools.dataset import token_counts as tc

    pool, _ = synthetic_pool("jailbreak", 30, seed=12)
    counts = tc.cached_token_counts(pool, tokenizer, tmp_path)
    (path,) = tmp_path.glob("tokens-*.npz")
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # a crash mid-copy: the zip directory at the end is gone
    with caplog.at_level("WARNING"):
        again = tc.cached_token_counts(pool, tokenizer, tmp_path)
    assert (again.row == counts.row).all() and (again.message == counts.message).all()
    assert any(str(path) in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records)
    assert path.read_bytes() == data


def _cli_world(tmp_path, tokenizer):
    import yaml

    from mosaic.data import write_table

    objectives = {}
    for i, (name, t) in enumerate(TYPES.items()):
        pool, _ = synthetic_pool(t, 150, seed=50 + i, objective=name)
        write_table(tmp_path / f"pools/{name}.parquet", pool)
        write_table(tmp_path / f"eval/{name}.parquet", synthetic_eval(pool, t, 5, seed=i))
        objectives[name] = {"type": t, "pool": str(tmp_path / f"pools/{name}.parquet"),
                            "eval": str(tmp_path / f"eval/{name}.parquet")}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "objectives": objectives,
                                   "budget": {"max_tokens": 3000}, "model": {"max_length": 200}}))
    tokenizer.save_pretrained(tmp_path / "tok")
    return cfg


def test_cli_build_dataset_refuses_dry_runs_and_writes(tmp_path, tokenizer):
    from typer.testing import CliRunner

    from mosaic.cli import app

    cfg = _cli_world(tmp_path, tokenizer)
    common = ["--config", str(cfg), "--tokenizer", str(tmp_path / "tok"),
              "--cache-dir", str(tmp_path / "cache")]
    runner = CliRunner()
    bad = tmp_path / "bad.json"
    bad.write_text('{"mixture": {"safety": 0.6, "boundary": 0.6}, "budget": 99}')
    res = runner.invoke(app, ["build-dataset", str(bad), *common])
    assert res.exit_code == 2, res.output
    assert "weights_not_summing" in res.output and "budget_not_settable" in res.output
    assert not (tmp_path / "run").exists()

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"mixture": {"safety": 0.4, "boundary": 0.3, "instruction": 0.3},
                                "quality_threshold": 2.0}))
    res = runner.invoke(app, ["build-dataset", str(good), *common, "--dry-run", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert '"output_hash"' in res.output and "dry run: nothing written" in res.output
    assert not (tmp_path / "run").exists()

    out = tmp_path / "ds"
    res = runner.invoke(app, ["build-dataset", str(good), *common, "--seed", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert hashlib.sha256((out / "train.parquet").read_bytes()).hexdigest() == manifest["output_hash"]
    assert 0 < manifest["total_tokens"] <= 3000
    table = pq.read_table(out / "train.parquet")
    convs = table.column("messages").to_pylist()
    counted = [len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in convs]
    assert counted == table.column("tokens").to_pylist()  # the budget is in the model's tokens
