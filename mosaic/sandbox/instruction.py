"""Sandbox `instruction` data (type ifeval): IFEval-style constraints and answers that meet all,
some or none of them.

Constraints are the verifiable kinds a model of a few million parameters can plausibly learn
(case, commas, end phrase, quotes, postscript, title, bullets, highlights, paragraphs,
placeholders, keywords from small fixed sets). Each answer is written to an intent per
constraint: "pass" (strict), "loose" (fails strict, passes IFEval's loose mode: a first line
or a last line that loose mode drops) or "fail" (fails both). Violations are placed on middle
lines so no loose variant can undo them. Answers are short, because the evaluated model writes
about 48 tokens a turn. The intents are the judge set's ground truth; pool rows carry the
programmatic checker's verdicts (mosaic.eval.ifeval_checker), which tests pin to the intents.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from mosaic.sandbox.common import Prompt, Response, prompt_slice
from mosaic.sandbox.text import HelpTopic, Lexicon, Voice, pick

LOWER = "change_case:english_lowercase"
CAPITAL = "change_case:english_capital"
NO_COMMA = "punctuation:no_comma"
END = "startend:end_checker"
QUOTE = "startend:quotation"
PS = "detectable_content:postscript"
PLACEHOLDERS = "detectable_content:number_placeholders"
TITLE = "detectable_format:title"
BULLETS = "detectable_format:number_bullet_lists"
HIGHLIGHTS = "detectable_format:number_highlighted_sections"
EXISTENCE = "keywords:existence"
FORBIDDEN = "keywords:forbidden_words"
PARAGRAPHS = "length_constraints:number_paragraphs"

IDS = (LOWER, CAPITAL, NO_COMMA, END, QUOTE, PS, PLACEHOLDERS, TITLE, BULLETS, HIGHLIGHTS,
       EXISTENCE, FORBIDDEN, PARAGRAPHS)
CONFLICTS = (frozenset({LOWER, CAPITAL}), frozenset({END, QUOTE}))
# Constraints a first line can break on its own (the "loose" defect is a preamble line).
PREAMBLE_LOOSE = (LOWER, CAPITAL, NO_COMMA, QUOTE)
LEVELS = tuple(f"complexity_{k}" for k in range(1, 6))


def _kwargs(rng: random.Random, lex: Lexicon, iid: str) -> dict[str, Any]:
    s = lex.if_sets
    if iid == END:
        return {"end_phrase": rng.choice(s.end_phrases)}
    if iid == PS:
        return {"postscript_marker": rng.choice(s.postscript_markers)}
    if iid == BULLETS:
        return {"num_bullets": rng.choice((2, 3))}  # bullets are the topic's three key phrases
    if iid == HIGHLIGHTS:
        return {"num_highlights": rng.choice((1, 2, 3))}
    if iid == EXISTENCE:
        return {"keywords": rng.sample(s.keywords, rng.choice((1, 2)))}
    if iid == FORBIDDEN:
        return {"forbidden_words": rng.sample(s.forbidden_words, 2)}
    if iid == PARAGRAPHS:
        return {"num_paragraphs": rng.choice((2, 3))}
    if iid == PLACEHOLDERS:
        return {"num_placeholders": rng.choice((1, 2))}
    return {}


@lru_cache(maxsize=None)
def _level(ids: tuple[str, ...]) -> str:
    return prompt_slice("ifeval", {"instruction_id_list": list(ids), "kwargs": [{} for _ in ids]})


def plan(rng: random.Random, k: int) -> list[str]:
    """Instruction ids whose inst_complexity is k (M constraints over K groups)."""
    sizes = {1: (1,), 2: (2,), 3: (2, 3), 4: (3, 4), 5: (3, 4)}[k]
    for _ in range(20_000):
        ids = rng.sample(IDS, rng.choice(sizes))
        if any(c <= set(ids) for c in CONFLICTS):
            continue
        if CAPITAL in ids and len(ids) > 2:
            continue  # all-caps answers stay short (see make_prompt)
        if _level(tuple(sorted(ids))) == f"complexity_{k}":
            return ids
    raise RuntimeError(f"no constraint set of complexity {k}")


def _words(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def make_prompt(rng: random.Random, lex: Lexicon, voice: Voice, level: str) -> Prompt:
    k = LEVELS.index(level) + 1
    ids = plan(rng, k)
    kwargs = [_kwargs(rng, lex, i) for i in ids]
    if CAPITAL in ids:
        # Capitals cost two to three tokens a word with the sandbox's small BPE vocabulary; keep
        # all-caps answers short enough for the model's ~48-token turns and 320-token window.
        for kw in kwargs:
            for name in ("num_bullets", "num_highlights", "num_paragraphs", "num_placeholders"):
                if name in kw:
                    kw[name] = min(kw[name], 2)
            if "keywords" in kw:
                kw["keywords"] = kw["keywords"][:1]
    topic = rng.choice(lex.neutral)
    sentences = [pick(rng, voice.if_tasks, task=topic.task)]
    for iid, kw in zip(ids, kwargs):
        n = kw.get("num_bullets", kw.get("num_highlights", kw.get("num_paragraphs",
                                                                  kw.get("num_placeholders", ""))))
        words = kw.get("keywords") or kw.get("forbidden_words") or []
        sentences.append(pick(rng, voice.if_instructions, id=iid, n=str(n),
                              phrase=kw.get("end_phrase", ""), words=_words(words) if words else "",
                              marker=kw.get("postscript_marker", "")))
    atoms = {"instruction_id_list": ids, "kwargs": kwargs}
    meta = {"topic": topic.id, "turns": 1, "slice": level}
    return Prompt((" ".join(sentences),), (), atoms, meta, topic)


# ---- answers --------------------------------------------------------------------------------


def _part(rng: random.Random, voice: Voice, part: str, **v: str) -> str:
    variables = {"kw": "", "w": "", "n": "", "marker": "", "hs": ""}
    variables.update(v)
    return pick(rng, voice.responses_if, part=part, **variables)


def make_response(rng: random.Random, voice: Voice, prompt: Prompt, intents: Sequence[str],
                  cls: str) -> Response:
    """Write an answer to `prompt` meeting each constraint as its intent says.

    Short on purpose (the evaluated model writes ~48 tokens a turn): line A is the topic's first
    step with keywords and highlights, lines B the bullets and any planted violation, line C a
    short close with placeholders; a title, postscript and end phrase wrap them when asked.
    """
    ids: list[str] = list(prompt.atoms["instruction_id_list"])
    kw = dict(zip(ids, prompt.atoms["kwargs"]))
    want = dict(zip(ids, intents))
    topic: HelpTopic = prompt.topic
    loose_pre = [i for i in ids if want[i] == "loose" and i in PREAMBLE_LOOSE]
    if len([i for i in ids if want[i] == "loose"]) > 1 or any(
            want[i] == "loose" and i not in (*PREAMBLE_LOOSE, END) for i in ids):
        raise ValueError(f"at most one loose intent, on {PREAMBLE_LOOSE + (END,)}: {want}")

    def ok(iid: str) -> bool:
        return want.get(iid) in ("pass", "loose")

    a = [topic.steps[0]]
    if EXISTENCE in want:
        words = kw[EXISTENCE]["keywords"]
        for word in (words if ok(EXISTENCE) else words[:-1]):
            a.append(_part(rng, voice, "keyword", kw=word))
    if HIGHLIGHTS in want:
        n = kw[HIGHLIGHTS]["num_highlights"] - (0 if ok(HIGHLIGHTS) else 1)
        if n:
            marked = [f"*{k}*" for k in topic.keys[:n]]
            hs = marked[0] if n == 1 else ", ".join(marked[:-1]) + " and " + marked[-1]
            a.append(_part(rng, voice, "highlight", hs=hs))
    # Violations sit on middle lines (B), where no loose variant can drop them.
    b: list[str] = []
    if BULLETS in want:
        n = kw[BULLETS]["num_bullets"]
        if not ok(BULLETS):
            n = n + 1 if n < len(topic.keys) and rng.random() < 0.5 else n - 1
        b += [f"* {k[0].upper()}{k[1:]}" for k in topic.keys[:n]]
    extra = []
    if NO_COMMA in want and not ok(NO_COMMA):
        extra.append(_part(rng, voice, "comma"))
    if FORBIDDEN in want and not ok(FORBIDDEN):
        extra.append(_part(rng, voice, "forbidden", w=rng.choice(kw[FORBIDDEN]["forbidden_words"])))
    p = None
    if PARAGRAPHS in want:
        p = kw[PARAGRAPHS]["num_paragraphs"] - (0 if ok(PARAGRAPHS) else 1)
        if p == 3 and not b and not extra:
            extra.append(topic.steps[1])  # the middle paragraph needs a body
    if extra:
        b.append(" ".join(extra))
    c = [_part(rng, voice, "closing")]
    if PLACEHOLDERS in want:
        n = kw[PLACEHOLDERS]["num_placeholders"] - (0 if ok(PLACEHOLDERS) else 1)
        if n:
            c.append(_part(rng, voice, "placeholders", n=str(n)))

    blocks = [[" ".join(a)], b, [" ".join(c)]]
    if p is not None:
        # Fewer paragraphs than asked when failing: dropping a line can only lower the count.
        groups = {1: [blocks[0] + blocks[1] + blocks[2]], 2: [blocks[0], blocks[1] + blocks[2]],
                  3: blocks}[p]
        lines: list[str] = []
        for gi, grp in enumerate(groups):
            if gi:
                lines.append("***")
            lines += grp
    else:
        lines = blocks[0] + blocks[1] + blocks[2]
    if TITLE in want and ok(TITLE):
        lines.insert(0, f"<<{topic.title}>>")
    if PS in want and ok(PS):
        lines.append(_part(rng, voice, "postscript", marker=kw[PS]["postscript_marker"]))
    if END in want and ok(END):
        lines.append(kw[END]["end_phrase"])
        if want[END] == "loose":
            lines.append(_part(rng, voice, "trailer"))
    pre = _part(rng, voice, "preamble") if loose_pre else None
    defect = loose_pre[0] if loose_pre else None

    def transform(line: str, is_pre: bool) -> str:
        if ok(NO_COMMA) and not (is_pre and defect == NO_COMMA):
            line = line.replace(", ", " ").replace(",", "")
        if ok(LOWER) and not (is_pre and defect == LOWER):
            line = line.lower()
        if ok(CAPITAL) and not (is_pre and defect == CAPITAL):
            line = line.upper()
        return line

    lines = [transform(x, False) for x in lines]
    if ok(QUOTE) and defect != QUOTE and pre is not None:
        # The preamble (breaking some other constraint) sits inside the quotes.
        lines.insert(0, transform(pre, True))
        pre = None
    if ok(QUOTE):
        lines[0], lines[-1] = '"' + lines[0], lines[-1] + '"'
    if pre is not None:
        lines.insert(0, transform(pre, True))
    text = "\n".join(lines)
    atoms = {"status": ["checked"] * len(ids),
             "strict": [want[i] == "pass" for i in ids],
             "loose": [want[i] in ("pass", "loose") for i in ids]}
    return Response(text, atoms, cls)


def intents(rng: random.Random, ids: Sequence[str], p_pass: float, p_loose: float,
            at_least_one_fail: bool = False) -> list[str]:
    out = []
    loose_used = False
    for iid in ids:
        if iid in (*PREAMBLE_LOOSE, END) and not loose_used and rng.random() < p_loose:
            out.append("loose")
            loose_used = True
        else:
            out.append("pass" if rng.random() < p_pass else "fail")
    if at_least_one_fail and "fail" not in out:
        out[rng.randrange(len(out))] = "fail"
    return out


def pool_intents(rng: random.Random, ids: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Three answers per pool prompt: one that follows everything (sometimes only loosely), one
    that mostly does, one that breaks something (enough good answers for an IF-heavy round at a
    quality threshold; see safety.pool_classes)."""
    best = intents(rng, ids, 1.0, 0.0)
    if rng.random() < 0.3:
        cand = [i for i, iid in enumerate(ids) if iid in (*PREAMBLE_LOOSE, END)]
        if cand:
            best[rng.choice(cand)] = "loose"
    return [("follows", best),
            ("mostly_follows", intents(rng, ids, 0.92, 0.15)),
            ("breaks", intents(rng, ids, 0.4, 0.0, at_least_one_fail=True))]
