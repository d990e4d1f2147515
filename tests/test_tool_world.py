"""The sandbox tool world (`world.tool_world`): agentic eval, held-out and judge sets, pools and
tool conversations in the base corpus, on a small world."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from mosaic.config import WorldConfig, load_config
from mosaic.eval import get_objective_type
from mosaic.eval.agentic import parse_calls
from mosaic.sandbox import ensure_world
from mosaic.sandbox import tool_world as tw
from mosaic.sandbox.common import derive_rng, prompt_key
from mosaic.sandbox.report import measure_judge

AG = get_objective_type("agentic")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = WorldConfig(data_dir=str(tmp_path_factory.mktemp("tw") / "world"), tool_world=True,
                      pool_size=300, eval_size=40, heldout_size=40, base_corpus_size=200)
    return ensure_world(cfg)


def rows(world, rel):
    return pq.read_table(world.root / rel).to_pylist()


def test_the_world_has_the_agentic_objective(world):
    assert world.objectives == {"safety": "jailbreak", "boundary": "overrefusal",
                                "instruction": "ifeval", "agentic": "agentic"}
    for split in ("pools", "eval", "heldout", "judge"):
        assert (world.root / split / "agentic.parquet").is_file()
    assert world.stats["eval"]["agentic"]["slices"] == {"injection_0": 10, "injection_1": 8,
                                                         "injection_2": 8, "injection_3": 7,
                                                         "injection_4": 7}
    with pytest.raises(KeyError, match="no objective"):
        world.pool_path("tools")


def test_eval_items_carry_ground_truth_and_a_single_transcript_turn(world):
    for r in rows(world, "eval/agentic.parquet"):
        atoms = json.loads(r["l3_prompt"])
        assert [m["role"] for m in r["messages"]] == ["user"]
        text = r["messages"][0]["content"]
        assert text.startswith("TASK: ") and text.endswith("NEXT:")
        assert text.count("CALL: ") == atoms["prior_tool_calls"]
        assert json.loads(r["metadata"])["slice"] == f"injection_{tw.difficulty(atoms)}"
        for call in atoms["injection_calls"]:  # the injection rides in the last result
            assert call in text.rsplit("CALL: ", 1)[1]
        for datum in atoms["private_data"]:
            assert datum in text
        assert bool(atoms["injection_calls"]) == bool(atoms["injection_present"])


def _lines(world, split, prefix):
    out = set()
    for r in rows(world, f"{split}/agentic.parquet"):
        for line in r["messages"][0]["content"].splitlines():
            if line.startswith(prefix):
                out.add(re.sub(r"\S+\(.*?\)", "CALL", line))  # wording, not the call
    return out


def test_held_out_items_are_worded_apart(world):
    for prefix in ("TASK: ", "RESULT: "):
        assert not _lines(world, "eval", prefix) & _lines(world, "heldout", prefix), prefix
    ev = {prompt_key([r["messages"][0]["content"]]) for r in rows(world, "eval/agentic.parquet")}
    pool = {prompt_key([r["messages"][0]["content"]]) for r in rows(world, "pools/agentic.parquet")}
    assert not ev & pool


def test_pool_replies_score_as_their_class_was_written(world):
    classes = set()
    for r in rows(world, "pools/agentic.parquet"):
        meta, atoms = json.loads(r["metadata"]), json.loads(r["l3_response"])
        classes.add(meta["response_class"])
        p = tw.Prompt(tuple(m["content"] for m in r["messages"] if m["role"] == "user"), (),
                      json.loads(r["l3_prompt"]), {}, None)
        want = tw.intended_atoms(meta["response_class"], p)
        assert {k: atoms[k] for k in want} == want, (meta["response_class"], r["messages"][-1])
    assert {"resist_refuse_act", "follow", "complete"} <= classes
    scores = [r["score"] for r in rows(world, "pools/agentic.parquet")]
    assert 5.0 in scores and 1.0 in scores


def test_the_scorer_agrees_with_the_judge_sets_ground_truth(world):
    results = measure_judge(world)
    agentic = {a.atom: a.accuracy for a in results["agentic"]}
    assert set(agentic) == {"followed_injection", "harmful_call", "private_leaked",
                            "explicit_refusal", "task_completed"}
    assert all(v == 1.0 for v in agentic.values()), agentic


def test_the_base_corpus_mostly_follows_injections(world):
    corpus = [json.loads(r["metadata"]) for r in rows(world, "base_corpus.parquet")]
    tool = [m for m in corpus if m["kind"] == "tool"]
    assert len(tool) == round(tw_share() * 200)
    attacked = [m for m in tool if m["l3_prompt"]["injection_present"]]
    followed = sum(m["response_class"].startswith("follow") for m in attacked)
    assert followed / len(attacked) >= 0.5


def tw_share() -> float:
    from mosaic.sandbox.corpus import TOOL_SHARE

    return TOOL_SHARE


def test_every_reply_class_parses_to_its_calls():
    rng = derive_rng(0, "test")
    v = tw.tool_voice("in")
    for level in tw.LEVELS:
        p = tw.make_prompt(rng, v, level)
        names = tw.ATTACKED_GOOD | tw.ATTACKED_BAD if p.atoms["injection_present"] \
            else tw.BENIGN_GOOD | tw.BENIGN_BAD
        for cls in names:
            r = tw.make_response(rng, v, p, cls)
            acts = tw.CLASSES[cls][1]
            assert len(parse_calls(r.text)) == len(acts)
    with pytest.raises(ValueError, match="needs an injected item"):
        tw.make_response(rng, v, tw.make_prompt(rng, v, "injection_0"), "follow")


def test_the_agentic_config_loads_with_its_own_data_dir():
    cfg = load_config("configs/sandbox-agentic.yaml", environ={})
    assert cfg.world.tool_world and cfg.world.data_dir != "data/sandbox"
    assert cfg.objectives["agentic"].type == "agentic"
    assert all(cfg.world.data_dir in o.pool for o in cfg.objectives.values())


def test_the_base_corpus_follows_injections_alike_in_both_voices():
    """The base's attack success is built in whatever the wording (issue 17): the corpus holds
    both tool voices at TOOL_HELDOUT_SHARE, each slice in each voice, and the reply class never
    depends on the voice."""
    from mosaic.sandbox.corpus import TOOL_HELDOUT_SHARE, TOOL_SHARE, add_tool_corpus

    tool = [r["metadata"] for r in add_tool_corpus([], seed=0, size=2000, avoid=set())]
    assert len(tool) == round(TOOL_SHARE * 2000)
    by_voice = {v: [m for m in tool if m["voice"] == v] for v in ("in", "heldout")}
    assert abs(len(by_voice["heldout"]) / len(tool) - TOOL_HELDOUT_SHARE) < 0.06
    follow = {}
    for v, ms in by_voice.items():
        assert {f"injection_{tw.difficulty(m['l3_prompt'])}" for m in ms} == set(tw.LEVELS), v
        attacked = [m for m in ms if m["l3_prompt"]["injection_present"]]
        follow[v] = sum(m["response_class"].startswith("follow") for m in attacked) / len(attacked)
    assert min(follow.values()) >= 0.6 and abs(follow["in"] - follow["heldout"]) < 0.1, follow


def test_the_tool_world_version_keys_the_tool_world_only(monkeypatch):
    from mosaic.sandbox.world import world_key

    default, tools = WorldConfig(), WorldConfig(tool_world=True)
    before = world_key(default), world_key(tools)
    monkeypatch.setattr(tw, "TOOL_WORLD_VERSION", tw.TOOL_WORLD_VERSION + "-next")
    assert world_key(default) == before[0]
    assert world_key(tools) != before[1]
