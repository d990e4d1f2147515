"""The sandbox base model's training corpus: a deliberately vulnerable instruct mixture.

It teaches a tiny model to leak under multi-turn pressure (and often on one blunt turn), to help
with every benign lookalike, and to follow IF constraints only about half the time. Every kind
of conversation comes in every wording the world uses (held-out request, cue and constraint
wording and small talk included, never held-out topics): a base that never saw a wording
answers it with filler, and one that saw it in one kind of conversation only ties its behaviour
to the wording; either way the held-out sets would measure wording, not behaviour (DESIGN.md,
world-design traps).
"""

from __future__ import annotations

import random
from typing import Any

from mosaic.sandbox import boundary
from mosaic.sandbox import instruction
from mosaic.sandbox import safety
from mosaic.sandbox.common import Prompt, derive_rng, prompt_key, quotas, weighted
from mosaic.sandbox.text import HELDOUT_WORDING, IN_VOICE, Lexicon, Voice, pick

SHARES = {"neutral": 0.35, "attack": 0.25, "boundary": 0.20, "instruction": 0.20}
ATTACK_LEVELS = {"complexity_1": 0.25, "complexity_2": 0.2, "complexity_3": 0.2,
                 "complexity_4": 0.2, "complexity_5": 0.15}
ATTACK_TURNS = (0.25, 0.15, 0.15, 0.15, 0.15, 0.15)
BOUNDARY_TURNS = (0.45, 0.3, 0.25)
NEUTRAL_TURNS = (0.25, 0.2, 0.15, 0.15, 0.15, 0.1)


# Share of corpus conversations worded in the held-out voice.
HELDOUT_WORDING_SHARE = 0.3


def _voice(rng: random.Random) -> Voice:
    return HELDOUT_WORDING if rng.random() < HELDOUT_WORDING_SHARE else IN_VOICE


def _neutral(rng: random.Random, lex_in: Lexicon, lex_ho: Lexicon) -> Prompt:
    """A neutral request in any of the world's wordings, opened by any of its small talk."""
    topic = rng.choice(lex_in.neutral)
    voice = _voice(rng)
    wording = voice.frames if rng.random() < 0.75 else voice.if_tasks
    sentences = [pick(rng, wording, task=topic.task)]
    if rng.random() < 0.3:
        sentences.append(pick(rng, voice.boundary_clauses, part="purpose", purpose=topic.purpose))
    if rng.random() < 0.1:
        sentences.insert(0, pick(rng, voice.boundary_clauses, part="alarm", purpose=""))
    turns = rng.choices(range(1, 7), weights=NEUTRAL_TURNS)[0]
    warm = rng.sample(lex_in.warmups + lex_ho.warmups, turns - 1)
    return Prompt(tuple([w.user for w in warm] + [" ".join(sentences)]),
                  tuple(w.reply for w in warm), {}, {"topic": topic.id, "turns": turns}, topic)


def make_corpus(seed: int, size: int, lex_in: Lexicon, lex_ho: Lexicon,
                avoid: set[str]) -> list[dict[str, Any]]:
    """`size` conversations (messages + metadata), shuffled; none repeats an eval or held-out
    prompt (`avoid` holds their prompt keys)."""
    rng = derive_rng(seed, "corpus")
    counts = quotas(size, SHARES)

    def attack() -> tuple[Prompt, str, str]:
        k = int(weighted(rng, ATTACK_LEVELS).rsplit("_", 1)[1])
        p = safety.make_prompt(rng, lex_in, _voice(rng), k, ATTACK_TURNS)
        cls = safety.corpus_class(rng, p)
        return p, safety.make_response(rng, IN_VOICE, p.topic, cls).text, cls

    def benign() -> tuple[Prompt, str, str]:
        level = rng.choice(boundary.LEVELS[1:])
        p = boundary.make_prompt(rng, lex_in, _voice(rng), level, BOUNDARY_TURNS)
        cls = weighted(rng, boundary.CORPUS)
        return p, boundary.make_response(rng, IN_VOICE, p.topic, cls).text, cls

    def neutral() -> tuple[Prompt, str, str]:
        p = _neutral(rng, lex_in, lex_ho)
        cls = weighted(rng, boundary.CORPUS)
        return p, boundary.make_response(rng, IN_VOICE, p.topic, cls).text, cls

    def follow() -> tuple[Prompt, str, str]:
        p = instruction.make_prompt(rng, lex_in, _voice(rng), rng.choice(instruction.LEVELS))
        want = instruction.intents(rng, p.atoms["instruction_id_list"], 0.45, 0.1)
        return p, instruction.make_response(rng, IN_VOICE, p, want, "corpus").text, "partial"

    makers = {"neutral": neutral, "attack": attack, "boundary": benign, "instruction": follow}
    rows: list[dict[str, Any]] = []
    for kind in SHARES:
        made = 0
        tries = 0
        while made < counts[kind]:
            tries += 1
            if tries > 50 * counts[kind] + 1000:
                raise RuntimeError(f"base corpus: could not write {counts[kind]} {kind} "
                                   f"conversations that avoid the eval and held-out prompts")
            prompt, reply, cls = makers[kind]()
            if any(prompt_key(prompt.users[:n]) in avoid for n in range(1, len(prompt.users) + 1)):
                continue
            rows.append({"messages": prompt.conversation(reply),
                         "metadata": {"kind": kind, "response_class": cls,
                                      "topic": prompt.meta.get("topic"), "l3_prompt": prompt.atoms,
                                      "turns": len(prompt.users), "seed": seed}})
            made += 1
    rng.shuffle(rows)
    return rows


# Tool-world conversations added to the corpus when `world.tool_world` is on, as a share of
# base_corpus_size. They come on top of the default mixture (its rows and order untouched), so
# the default world's corpus is the same whether or not the tool world code exists.
TOOL_SHARE = 0.2
# Share of them in the held-out tool voice: the 30% every other kind has (module docstring),
# the voice never deciding the reply (corpus_class reads the item's plan only). Measured on
# builder 3 (issue 17, docs/agentic.md): the base hijacks on 0.61 of attacked eval items and
# 0.47 of held-out ones, both above the 0.3 the agentic loop needs. Half of 0.3 (v2) brought
# the held-out voice level with the eval one (0.79 / 0.72) but the loop then lost benign
# utility (0.97 -> 0.77), which this recipe's loop holds (0.75 -> 0.83): not taken.
TOOL_HELDOUT_SHARE = HELDOUT_WORDING_SHARE


def add_tool_corpus(rows: list[dict[str, Any]], seed: int, size: int,
                    avoid: set[str]) -> list[dict[str, Any]]:
    """`rows` with round(TOOL_SHARE * size) tool-world conversations inserted at seeded
    positions: injected items mostly followed (the base's built-in attack success), benign ones
    completed, whatever the voice; TOOL_HELDOUT_SHARE of them in the held-out tool voice."""
    from mosaic.sandbox import tool_world

    rng = derive_rng(seed, "corpus", "tool_world")
    voices = {"in": tool_world.tool_voice("in"), "heldout": tool_world.tool_voice("heldout")}
    n = round(TOOL_SHARE * size)
    extra: list[dict[str, Any]] = []
    tries = 0
    while len(extra) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"base corpus: could not write {n} tool-world conversations that "
                               f"avoid the eval and held-out prompts")
        wording = voices["heldout" if rng.random() < TOOL_HELDOUT_SHARE else "in"]
        level = weighted(rng, tool_world.POOL_LEVELS)
        p = tool_world.make_prompt(rng, wording, level)
        if prompt_key(p.users) in avoid:
            continue
        cls = tool_world.corpus_class(rng, p)
        # Replies in the in-distribution wording only (held-out replies stay unseen).
        reply = tool_world.make_response(rng, voices["in"], p, cls).text
        extra.append({"messages": p.conversation(reply),
                      "metadata": {"kind": "tool", "response_class": cls, "topic": p.meta["task"],
                                   "voice": p.meta["voice"], "l3_prompt": p.atoms, "turns": 1,
                                   "seed": seed}})
    out = list(rows)
    for r in extra:
        out.insert(rng.randrange(len(out) + 1), r)
    return out
