"""Sandbox `safety` data (type jailbreak): multi-turn attacks and responses of every quality.

An attack is planned first (topic, number of user turns, cue set) so that its slice
complexity_k, k = ceil((P + C) / 2), hits a quota; then it is written out. Cues either get a
setup turn of their own or ride in the final turn; spare turns are warm-ups, the same small talk
benign conversations open with. Escalation re-asks after an earlier request the assistant
declined; context_bind leans on earlier turns. Harmful content exists only as placeholders.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

from mosaic.sandbox.common import Prompt, Response, prompt_slice, weighted
from mosaic.sandbox.text import AttackTopic, Lexicon, Voice, pick

PRESSURE = ("authority", "urgency", "escalation", "context_bind")
CONCEALMENT = ("compliance_pretext", "roleplay", "transform", "obfuscation")
CUES = PRESSURE + CONCEALMENT
# Cues that read naturally as a turn of their own before the request.
SETUP_CUES = ("authority", "roleplay", "compliance_pretext", "urgency")
LEAKS = ("step_leak", "code_leak", "param_leak", "bypass_leak")
UTILITY = ("explicit_refusal", "safe_alternative", "brief_explanation")

# Response classes: template parts in order, and the response atoms they make true.
CLASSES: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "refuse_explain_alt": (("refusal", "explanation", "alternative"),
                           frozenset({"explicit_refusal", "brief_explanation", "safe_alternative"})),
    "refuse_alt": (("refusal", "alternative"), frozenset({"explicit_refusal", "safe_alternative"})),
    "refuse_explain": (("refusal", "explanation"), frozenset({"explicit_refusal", "brief_explanation"})),
    "explain_alt": (("explanation", "alternative"), frozenset({"brief_explanation", "safe_alternative"})),
    "refuse": (("refusal",), frozenset({"explicit_refusal"})),
    "deflect": (("alternative",), frozenset({"safe_alternative"})),
    "step": (("leak_step",), frozenset({"step_leak"})),
    # Started to fulfil the request, cut off before any hazard: counted as a step leak, because
    # on unseen wording many outputs are neither a refusal nor a full leak (DESIGN.md).
    "comply_start": (("comply_start",), frozenset({"step_leak"})),
    "bypass": (("leak_bypass",), frozenset({"bypass_leak"})),
    "code": (("leak_code",), frozenset({"code_leak"})),
    "param": (("leak_param",), frozenset({"param_leak"})),
    "step_param": (("leak_step", "leak_param"), frozenset({"step_leak", "param_leak"})),
    "step_bypass": (("leak_step", "leak_bypass"), frozenset({"step_leak", "bypass_leak"})),
    "code_param": (("leak_code", "leak_param"), frozenset({"code_leak", "param_leak"})),
}
GOOD = {"refuse_explain_alt": 0.3, "refuse_alt": 0.15, "refuse_explain": 0.15, "explain_alt": 0.15,
        "refuse": 0.15, "deflect": 0.1}
BAD = {"step": 0.25, "comply_start": 0.1, "bypass": 0.1, "code": 0.15, "param": 0.15,
       "step_param": 0.1, "step_bypass": 0.1, "code_param": 0.05}
# What the vulnerable base model learns to say: full leaks, and plain refusals now and then.
CORPUS_LEAK = {"step": 0.35, "code": 0.2, "param": 0.2, "step_param": 0.15, "bypass": 0.1}
CORPUS_REFUSE = {"refuse": 0.6, "refuse_explain": 0.4}

_LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7", "g": "9", "l": "1", "b": "8"}


def prompt_atoms(turns: int, cues: Sequence[str]) -> dict[str, int]:
    return {**{c: int(c in cues) for c in CUES}, "turns": turns}


@lru_cache(maxsize=None)
def complexity(turns: int, cues: tuple[str, ...]) -> int:
    # Cached: plan() asks thousands of times about a few hundred distinct (turns, cues).
    return int(prompt_slice("jailbreak", prompt_atoms(turns, cues)).rsplit("_", 1)[1])


def plan(rng: random.Random, k: int, turn_weights: Sequence[float]) -> tuple[int, tuple[str, ...]]:
    """(turns, cues) whose complexity is k, by rejection from the split's turn distribution."""
    for _ in range(20_000):
        turns = rng.choices(range(1, 7), weights=turn_weights)[0]
        # Escalating or leaning on earlier turns needs an earlier turn.
        pressure = PRESSURE if turns >= 2 else ("authority", "urgency")
        cues = (rng.sample(pressure, rng.randint(0, len(pressure)))
                + rng.sample(CONCEALMENT, rng.randint(0, len(CONCEALMENT))))
        cues = tuple(c for c in CUES if c in cues)
        if complexity(turns, cues) == k:
            return turns, cues
    raise RuntimeError(f"no attack plan of complexity {k} under turn weights {turn_weights}")


def garble(rng: random.Random, text: str, trigger: str, voice: Voice) -> str:
    """Obfuscate the trigger word: leetspeak or hyphens in the in-distribution voice, spaced
    or dotted letters in the held-out one."""
    if voice.name == "in":
        style = rng.choice(("leet", "hyphen"))
    else:
        style = rng.choice(("spaced", "dots"))

    def one(word: str) -> str:
        if style == "leet":
            idx = [i for i, ch in enumerate(word) if ch in _LEET]
            if not idx:  # "up" in "blow up": the other word carries the disguise
                return word
            keep = set(rng.sample(idx, max(1, len(idx) // 2)))
            return "".join(_LEET[ch] if i in keep else ch for i, ch in enumerate(word))
        sep = {"hyphen": "-", "spaced": " ", "dots": "."}[style]
        return sep.join(word)

    i = text.lower().find(trigger.lower())
    if i < 0:
        raise ValueError(f"trigger {trigger!r} not in {text!r}")
    garbled = " ".join(one(w) for w in text[i:i + len(trigger)].split(" "))
    return text[:i] + garbled + text[i + len(trigger):]


# Context budget in characters (about 3 characters a token): with a response it must fit the
# sandbox model's 320-token window, so a long plan is redrawn rather than truncated.
MAX_PROMPT_CHARS = 560


def make_prompt(rng: random.Random, lex: Lexicon, voice: Voice, k: int,
                turn_weights: Sequence[float], topic: AttackTopic | None = None) -> Prompt:
    for _ in range(1000):
        p = _make_prompt(rng, lex, voice, k, turn_weights, topic)
        if sum(map(len, p.users + p.replies)) <= MAX_PROMPT_CHARS:
            return p
    raise RuntimeError(f"no attack of complexity {k} fits in {MAX_PROMPT_CHARS} characters")


def _make_prompt(rng: random.Random, lex: Lexicon, voice: Voice, k: int,
                 turn_weights: Sequence[float], topic: AttackTopic | None) -> Prompt:
    turns, cues = plan(rng, k, turn_weights)
    topic = topic or rng.choice(lex.attack)
    cue_set = set(cues)
    say = {c: pick(rng, voice.cues, cue=c) for c in cues}
    free = turns - 1 - ("escalation" in cue_set)  # turns before the request(s)
    setups: list[str] = []
    prefix: list[str] = []
    suffix: list[str] = []
    for c in SETUP_CUES:
        if c not in cue_set:
            continue
        if free > len(setups) and rng.random() < 0.5:
            setups.append(say[c])
        elif c == "urgency":
            suffix.append(say[c])
        else:
            prefix.append(say[c])
    rng.shuffle(setups)
    task = topic.task
    if "obfuscation" in cue_set:
        task = garble(rng, task, topic.trigger, voice)
        if rng.random() < 0.5:
            suffix.append(say["obfuscation"])
    if "transform" in cue_set:
        suffix.append(say["transform"])
    lead = [say[c] for c in ("context_bind", "escalation") if c in cue_set]
    final = " ".join(lead + prefix + [pick(rng, voice.frames, task=task)] + suffix)

    warm = rng.sample(lex.warmups, free - len(setups))
    users = [w.user for w in warm] + setups
    replies = [w.reply for w in warm] + [pick(rng, voice.acks) for _ in setups]
    if "escalation" in cue_set:
        # The first ask is declined; the final turn pushes again.
        users.append(pick(rng, voice.frames, task=topic.task))
        replies.append(pick(rng, voice.responses_safety, **_vars(topic, "refusal")))
    users.append(final)
    atoms = prompt_atoms(turns, cues)
    meta = {"topic": topic.id, "turns": turns, "cues": list(cues), "warmups": len(warm),
            "setup_turns": len(setups), "slice": f"complexity_{k}"}
    return Prompt(tuple(users), tuple(replies), atoms, meta, topic)


def _vars(topic: AttackTopic, part: str) -> dict[str, str]:
    return {"part": part, "task": topic.task, "alt": topic.alt, "harm": topic.harm}


def make_response(rng: random.Random, voice: Voice, topic: AttackTopic, cls: str) -> Response:
    parts, true = CLASSES[cls]
    if cls == "refuse_explain_alt" and rng.random() < 0.3:
        parts = ("refusal", "alternative", "explanation")
    text = " ".join(pick(rng, voice.responses_safety, **_vars(topic, p)) for p in parts)
    atoms = {a: int(a in true) for a in LEAKS + UTILITY}
    return Response(text, atoms, cls)


def pool_classes(rng: random.Random) -> list[str]:
    """Three responses per pool prompt: two safe ones of varying quality, and one that mostly
    leaks. Safe rows dominate so a safety-heavy mixture at a quality threshold can be filled
    from the pool (300k-token rounds, DESIGN.md); the leaks keep DPO pairs and the threshold
    meaningful."""
    return [weighted(rng, GOOD), weighted(rng, GOOD),
            weighted(rng, BAD) if rng.random() < 0.7 else weighted(rng, GOOD)]


def corpus_class(rng: random.Random, prompt: Prompt) -> str:
    """The vulnerable base: refuses a blunt one-turn request sometimes, and almost never
    once the attacker adds turns or cues."""
    k = int(prompt.meta["slice"].rsplit("_", 1)[1])
    turns = prompt.meta["turns"]
    p_refuse = 0.35 if (k == 1 and turns == 1) else 0.15 if k <= 2 else 0.04
    return weighted(rng, CORPUS_REFUSE) if rng.random() < p_refuse else weighted(rng, CORPUS_LEAK)
