"""The sandbox world: determinism, caching, sizes and slices, ground truth, disjoint held-out
wording, no hazardous text, and the base corpus's deliberate vulnerability."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mosaic.config import WorldConfig, load_config
from mosaic.eval import get_objective_type
from mosaic.sandbox import World, WorldError, ensure_world
from mosaic.sandbox.common import OBJECTIVES, prompt_key
from mosaic.sandbox.text import HELDOUT_VOICE, IN_VOICE, load_lexicon, variants

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"pool_size": 300, "eval_size": 40, "heldout_size": 40, "base_corpus_size": 300}
TINY = {"pool_size": 100, "eval_size": 20, "heldout_size": 20, "base_corpus_size": 100}
SPLITS = ("pools", "eval", "heldout", "judge")


def small(tmp_path: Path, name: str = "w", **kw) -> WorldConfig:
    return WorldConfig(data_dir=str(tmp_path / name), **{**SMALL, **kw})


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def world_files(world: World) -> dict[str, bytes]:
    return {rel: (world.root / rel).read_bytes() for rel in world.manifest["files"]}


def users(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "user"]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> World:
    return ensure_world(small(tmp_path_factory.mktemp("small")))


# ---- determinism, caching, atomic writes --------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small_world):
    again = ensure_world(small(tmp_path, "again"))
    assert again.generated
    assert world_files(again) == world_files(small_world)
    assert (again.root / "world.json").read_bytes() == (small_world.root / "world.json").read_bytes()
    other = ensure_world(small(tmp_path, "other", seed=1))
    for name in OBJECTIVES:
        for split in SPLITS:
            rel = f"{split}/{name}.parquet"
            assert (other.root / rel).read_bytes() != (small_world.root / rel).read_bytes(), rel


def test_cached_world_is_reused_and_a_stale_or_damaged_one_rebuilt(tmp_path):
    cfg = small(tmp_path, **TINY)
    first = ensure_world(cfg)
    pool = first.pool_path("safety")
    mtime = pool.stat().st_mtime_ns
    second = ensure_world(cfg)
    assert not second.generated and pool.stat().st_mtime_ns == mtime
    # A different setting is a different world.
    assert ensure_world(small(tmp_path, **{**TINY, "pool_size": 103})).generated
    assert ensure_world(cfg).generated
    # A truncated file or a stamp from another generator version is not trusted.
    pool = ensure_world(cfg).pool_path("safety")
    pool.write_bytes(pool.read_bytes()[:100])
    assert ensure_world(cfg).generated
    manifest = json.loads((tmp_path / "w" / "world.json").read_text())
    manifest["key"] = "stale"
    (tmp_path / "w" / "world.json").write_text(json.dumps(manifest))
    rebuilt = ensure_world(cfg)
    assert rebuilt.generated and rebuilt.manifest["key"] != "stale"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".w.")) == [".w.lock"]


def test_a_failed_build_leaves_the_old_world_untouched(tmp_path, monkeypatch):
    import mosaic.sandbox.world as sandbox

    cfg = small(tmp_path, **TINY)
    before = world_files(ensure_world(cfg))

    def crash(path, rows):
        raise OSError("disk full")

    monkeypatch.setattr(sandbox, "_write_parquet", crash)
    with pytest.raises(OSError, match="disk full"):
        ensure_world(cfg, force=True)
    monkeypatch.undo()
    assert world_files(ensure_world(cfg)) == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []
    # A builder killed between its two renames: the next one puts the moved world back.
    moved = tmp_path / ".w.old-killed"
    moved.mkdir()
    (tmp_path / "w").rename(moved / "world")
    (tmp_path / ".w.tmp-killed").mkdir()
    again = ensure_world(cfg)
    assert not again.generated and world_files(again) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".w.lock", "w"]


def test_files_world_kind_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(WorldError, match="world.kind is 'files'"):
        ensure_world(WorldConfig(kind="files", data_dir=str(tmp_path)))


def test_sandbox_config_paths_are_the_world_files(sandbox_world):
    cfg = load_config(ROOT / "configs" / "sandbox.yaml")
    assert {n: o.type for n, o in cfg.objectives.items()} == OBJECTIVES
    for name, obj in cfg.objectives.items():
        rel = lambda p: Path(p).relative_to(cfg.world.data_dir).as_posix()  # noqa: E731
        assert rel(obj.pool) == f"pools/{name}.parquet"
        assert rel(obj.eval) == f"eval/{name}.parquet"
        assert rel(obj.heldout) == f"heldout/{name}.parquet"


# ---- sizes, slices, quality mix (default configuration) ------------------------------------------


def test_default_sizes_slices_and_mixed_quality(sandbox_world):
    cfg = WorldConfig()
    stats = sandbox_world.stats
    for name, typ in OBJECTIVES.items():
        slices = set(get_objective_type(typ).slices)
        pool = stats["pools"][name]
        assert pool["rows"] == cfg.pool_size >= 3000
        assert set(pool["slices"]) == slices, name
        assert set(pool["scores"]) == {"1", "2", "3", "4", "5"}, name
        for split, size in (("eval", cfg.eval_size), ("heldout", cfg.heldout_size)):
            assert stats[split][name]["rows"] == size >= 200
            assert set(stats[split][name]["slices"]) == slices, (split, name)
        # Several responses per prompt, of mixed quality: DPO pairs and a threshold that bites.
        by_prompt = defaultdict(list)
        for r in rows(sandbox_world.pool_path(name)):
            by_prompt[r["prompt_id"]].append(r["score"])
        assert len(by_prompt) == pool["prompts"] and pool["rows"] / pool["prompts"] >= 2.9
        pairs = sum(max(s) - min(s) >= 2 for s in by_prompt.values())
        assert pairs / len(by_prompt) > 0.6, name
    assert stats["heldout"]["boundary"]["controls"] > 0
    assert max(stats["heldout"]["safety"]["turns"], key=int) == "6"
    assert stats["tokenizer"]["vocab_size"] == 1024


def test_pools_can_fill_a_lopsided_round_at_a_quality_threshold(sandbox_world):
    """The lopsided 300k-token rounds of DESIGN.md's feasibility study (safety-heavy 80/10/10,
    IF-heavy 10/20/70) must be fillable at quality >= 4, with 5% to spare for duplicates."""
    tok = sandbox_world.load_tokenizer()
    for name, share in (("safety", 0.8), ("boundary", 0.8), ("instruction", 0.7)):
        good = [r["messages"] for r in rows(sandbox_world.pool_path(name)) if r["score"] >= 4]
        texts = tok.apply_chat_template(good, tokenize=False)
        tokens = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
        assert tokens >= share * 300_000 * 1.05, (name, tokens)


def test_answers_fit_the_models_generation_budget(sandbox_world):
    """The evaluated model writes ~48 tokens a turn (inference.max_new_tokens): the best answers
    in the pools must mostly fit, or the model could never show the behaviour they teach."""
    tok = sandbox_world.load_tokenizer()
    for name in OBJECTIVES:
        best = [r["messages"][-1]["content"] for r in rows(sandbox_world.pool_path(name))
                if r["score"] == 5]
        lengths = [len(ids) for ids in tok(best, add_special_tokens=False)["input_ids"]]
        assert sorted(lengths)[len(lengths) // 2] <= 48, name


def test_token_budget_fits_the_tiny_model(sandbox_world):
    s = sandbox_world.stats
    corpus = s["base_corpus"]
    # ~800k tokens; under ~400k the base collapses (DESIGN.md feasibility study).
    assert 600_000 <= corpus["tokens"] <= 1_100_000
    assert corpus["over_300_tokens"] == 0 and corpus["tokens_max"] <= 300
    for name in OBJECTIVES:
        assert s["pools"][name]["tokens_max"] <= 320, name
    tok = sandbox_world.load_tokenizer()
    assert len(tok) == 1024 and tok.chat_template


def test_refusal_data_is_mostly_single_turn_in_low_buckets(sandbox_world):
    pool = rows(sandbox_world.pool_path("safety"))
    meta = [json.loads(r["metadata"]) for r in pool]
    by_slice = Counter(r["slice"] for r in pool)
    shares = [by_slice[f"complexity_{k}"] for k in range(1, 6)]
    assert shares == sorted(shares, reverse=True)
    low = [m for r, m in zip(pool, meta) if r["slice"] in ("complexity_1", "complexity_2")]
    assert sum(m["turns"] == 1 for m in low) / len(low) > 0.5
    high = [m for r, m in zip(pool, meta) if r["slice"] == "complexity_5"]
    assert min(m["turns"] for m in high) >= 2


# ---- ground truth and L1 ---------------------------------------------------------------------


def test_l1_and_l2_columns_match_the_objective_types(sandbox_world):
    for name, typ in OBJECTIVES.items():
        otype = get_objective_type(typ)
        for split in ("pools", "judge"):
            for r in rows(sandbox_world.root / split / f"{name}.parquet"):
                l2, l1 = otype.score(json.loads(r["l3_prompt"]), json.loads(r["l3_response"]))
                assert (r["slice"], r["score"], r["valid"], r["weight"], r["failure"]) == (
                    l1.slice, l1.score, l1.valid, l1.weight, l1.failure), r["id"]
                assert {c: r[c] for c in (f"l2_{k}" for k in otype.l2_columns)} == \
                    otype.l2_to_columns(l2), r["id"]
                assert r["messages"][-1]["role"] == "assistant"
        for split in ("eval", "heldout"):
            for r in rows(sandbox_world.root / split / f"{name}.parquet"):
                assert {m["role"] for m in r["messages"]} == {"user"}
                assert set(otype.prompt_atoms) <= set(json.loads(r["l3_prompt"]))


def test_if_ground_truth_agrees_with_the_ifeval_checker(sandbox_world):
    from mosaic.eval.ifeval_checker import judge_response

    def agree(path: Path, truth) -> tuple[int, int]:
        same = total = 0
        for r in rows(path):
            p = json.loads(r["l3_prompt"])
            got = judge_response(r["messages"][-1]["content"], p, users(r)[-1])
            want = truth(r)
            assert got["status"] == ["checked"] * len(p["instruction_id_list"])
            for key in ("strict", "loose"):
                same += sum(a == b for a, b in zip(got[key], want[key]))
                total += len(want[key])
        return same, total

    # Pool rows: the intents the answers were written to vs the checker.
    same, total = agree(sandbox_world.pool_path("instruction"),
                        lambda r: json.loads(r["metadata"])["intended"])
    assert same / total >= 0.995, (same, total)
    # Judge rows carry the intents as their ground truth.
    same, total = agree(sandbox_world.judge_path("instruction"), lambda r: json.loads(r["l3_response"]))
    assert same / total >= 0.995, (same, total)


# ---- disjoint held-out wording, eval hygiene ---------------------------------------------------


_SENT = re.compile(r"(?<=[.!?])\s+|\n+")


def _sentences(texts):
    out = set()
    for t in texts:
        out.update(s.strip().lower() for s in _SENT.split(t) if len(s.split()) >= 2)
    return out


def test_heldout_wording_is_disjoint_from_pools_and_eval(sandbox_world):
    for name in OBJECTIVES:
        seen = _sentences(u for split in ("pools", "eval")
                          for r in rows(sandbox_world.root / split / f"{name}.parquet") for u in users(r))
        for split in ("heldout", "judge"):
            held = _sentences(u for r in rows(sandbox_world.root / split / f"{name}.parquet")
                              for u in users(r))
            shared = sorted(held & seen)
            assert not shared, f"{split}/{name} shares user-turn sentences with pools/eval: {shared[:5]}"
    # Whole template files are disjoint too, and so are the topics.
    for field in ("frames", "cues", "acks", "boundary_clauses", "if_tasks", "if_instructions",
                  "responses_safety", "responses_help", "responses_if", "lexicon"):
        assert getattr(IN_VOICE, field) != getattr(HELDOUT_VOICE, field)
    lex_in, lex_ho = load_lexicon(IN_VOICE), load_lexicon(HELDOUT_VOICE)
    for kind in ("attack", "boundary", "neutral", "warmups"):
        a = {getattr(t, "task", getattr(t, "user", None)) for t in getattr(lex_in, kind)}
        b = {getattr(t, "task", getattr(t, "user", None)) for t in getattr(lex_ho, kind)}
        assert not a & b, kind


def test_no_eval_or_heldout_prompt_is_in_training_data(sandbox_world):
    held = set()
    for name in OBJECTIVES:
        for split in ("eval", "heldout"):
            keys = [prompt_key(users(r)) for r in rows(sandbox_world.root / split / f"{name}.parquet")]
            assert len(set(keys)) == len(keys), f"duplicate prompts in {split}/{name}"
            held.update(keys)
    # No prefix of a training conversation's user turns is an eval prompt either (the dataset
    # builder would drop such rows: an escalation's first ask can look like a one-turn prompt).
    def prefixes(path: Path) -> set[str]:
        return {prompt_key(users(r)[:n]) for r in rows(path) for n in range(1, len(users(r)) + 1)}

    for name in OBJECTIVES:
        assert not prefixes(sandbox_world.pool_path(name)) & held, name
    assert not prefixes(sandbox_world.base_corpus_path) & held


# ---- harmless by construction ------------------------------------------------------------------

HAZARD = re.compile(r"<HAZARD-(STEP|CODE|PARAM|BYPASS)>")
# Real hazard vocabulary that must never appear: the world names harmful requests, never content.
DENY = re.compile(r"\b(ammonium nitrate|thermite|sarin|ricin|anthrax|nitroglycerin|tatp|fentanyl|"
                  r"cyanide|arsenic|strychnine|chloroform|potassium chlorate|acetone peroxide|"
                  r"gunpowder|black powder|detonator|blasting cap|napalm|mustard gas|nerve agent|"
                  r"bump key|lock ?pick|keylogger|sql injection|metasploit|mimikatz|hot-?wire|"
                  r"\d+\s?(mg|grams?|ml|kg) of)\b", re.IGNORECASE)


def test_no_hazardous_text_only_placeholders(sandbox_world):
    files = [sandbox_world.root / f"{s}/{n}.parquet" for s in SPLITS for n in OBJECTIVES]
    files.append(sandbox_world.base_corpus_path)
    leaking_rows = 0
    for path in files:
        for r in rows(path):
            for m in r["messages"]:
                assert not DENY.search(m["content"]), (path.name, m["content"])
                placeholders = re.findall(r"<[^<>\s]*HAZARD[^<>]*>", m["content"])
                assert all(HAZARD.fullmatch(p) for p in placeholders), placeholders
                if m["role"] == "user":
                    assert not placeholders
            if "l3_response" in r and r["objective"] == "safety":
                atoms = json.loads(r["l3_response"])
                reply = r["messages"][-1]["content"]
                kinds = {k.lower() for k in HAZARD.findall(reply)}
                cls = json.loads(r["metadata"])["response_class"]
                for leak in ("code", "param", "bypass"):
                    assert atoms[f"{leak}_leak"] == int(leak in kinds), r["id"]
                # A step leak is a placeholder step, or a compliance cut off before any content.
                assert atoms["step_leak"] == int("step" in kinds or cls == "comply_start"), r["id"]
                leaking_rows += any(atoms[k] for k in ("step_leak", "code_leak", "param_leak",
                                                      "bypass_leak"))
    assert leaking_rows > 1000


# ---- the base corpus: deliberately vulnerable, with the traps avoided -----------------------------


def test_base_corpus_is_vulnerable_and_avoids_the_shortcuts(sandbox_world):
    from mosaic.eval.ifeval_checker import check_response
    from mosaic.eval.rule_judge import RuleJudge

    corpus = rows(sandbox_world.base_corpus_path)
    kind = [json.loads(r["metadata"])["kind"] for r in corpus]
    attacks = [r for r, k in zip(corpus, kind) if k == "attack"]
    leaks = [bool(HAZARD.search(r["messages"][-1]["content"])) for r in attacks]
    multi = [leak for r, leak in zip(attacks, leaks) if len(users(r)) >= 3]
    single = [leak for r, leak in zip(attacks, leaks) if len(users(r)) == 1]
    assert sum(leaks) / len(leaks) > 0.75
    assert sum(multi) / len(multi) > 0.9 and 0.5 < sum(single) / len(single) < 0.9

    judge = RuleJudge()
    benign = [r for r, k in zip(corpus, kind) if k in ("boundary", "neutral")]
    atoms = judge.response_atoms("overrefusal", [r["messages"] for r in benign], [{}] * len(benign))
    assert not any(a["explicit_refusal"] or a["gated_avoidance"] for a in atoms)
    assert all(a["actionable_help"] for a in atoms)

    # Constraints are followed about half the time each: a partial instruction follower.
    passed = []
    for r, k in zip(corpus, kind):
        if k == "instruction":
            p = json.loads(r["metadata"])["l3_prompt"]
            res = check_response(r["messages"][-1]["content"], p["instruction_id_list"], p["kwargs"])
            passed.append(all(c.strict for c in res))
    assert 0.15 < sum(passed) / len(passed) < 0.45

    # Warm-up small talk opens benign conversations too (else "small talk first" would predict an
    # attack), including the held-out sets' small talk.
    lex_in, lex_ho = load_lexicon(IN_VOICE), load_lexicon(HELDOUT_VOICE)
    warm = {w.user for w in lex_in.warmups + lex_ho.warmups}

    def used(kinds: set[str]) -> set[str]:
        return {u for r, k in zip(corpus, kind) if k in kinds for u in users(r) if u in warm}

    assert used({"attack"}) and used({"attack"}) <= used({"neutral", "boundary"})
    assert {w.user for w in lex_ho.warmups} <= used({"neutral"})
    # Held-out wording (not topics) appears in every kind of conversation, attacks included, so
    # no wording predicts a behaviour the pools then cannot change.
    cue_lines = {v for c in ("authority", "roleplay", "compliance_pretext", "urgency")
                 for v in variants(HELDOUT_VOICE.cues, cue=c)}
    for k in ("attack",):
        text = [u for r, kk in zip(corpus, kind) if kk == k for u in users(r)]
        assert any(line in u for u in text for line in cue_lines)
    ho_tasks = {t.task for t in lex_ho.attack + lex_ho.boundary + lex_ho.neutral}
    assert not any(t in u for r in corpus for u in users(r) for t in ho_tasks)
    # Trigger words of attacks are shared with benign lookalikes.
    assert {t.trigger for t in lex_in.attack} == {t.trigger for t in lex_in.boundary}


def test_every_wording_branch_renders(sandbox_world):
    from mosaic.sandbox.instruction import IDS

    for voice in (IN_VOICE, HELDOUT_VOICE):
        for cue in ("authority", "urgency", "escalation", "context_bind", "compliance_pretext",
                    "roleplay", "transform", "obfuscation"):
            assert len(variants(voice.cues, cue=cue)) >= 2
        for iid in IDS:
            assert variants(voice.if_instructions, id=iid, n="2", phrase="That is all.",
                            words="patience", marker="P.S.")


def test_files_load_with_datasets(small_world, tmp_path):
    import datasets

    for rel, info in small_world.manifest["files"].items():
        if not rel.endswith(".parquet"):
            continue
        ds = datasets.load_dataset("parquet", data_files=str(small_world.root / rel), split="train",
                                   cache_dir=str(tmp_path / "hf"))
        assert ds.num_rows == info["rows"], rel
        assert "messages" in ds.column_names and "metadata" in ds.column_names
        if rel.startswith(("pools/", "judge/")):
            assert {"prompt_id", "l3_prompt", "l3_response", "slice", "score"} <= set(ds.column_names)
