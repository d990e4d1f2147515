"""Need, reliability, bootstrap CIs and failure reports, against hand-computed figures."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from mosaic.eval import get_objective_type
from mosaic.eval.report import anonymise, build_failure_report, excerpt, render_failure_report
from mosaic.eval.stats import bootstrap_ci, reliability, sample_need, slice_stats
from mosaic.schemas import FailureReport, SampleRecord

JB = get_objective_type("jailbreak")


# ---- stats -----------------------------------------------------------------------------------


def test_sample_need_is_valid_times_shortfall_times_weight():
    need = sample_need([True, True, False, True], [1, 5, 1, 3.5], [2, 3, 4, 1])
    assert need.tolist() == [10.0, 3.0, 0.0, 2.5]
    # An invalid sample may carry no score at all; it still needs nothing.
    assert sample_need([False], [np.nan], [5]).tolist() == [0.0]


@pytest.mark.parametrize("n, level", [(0, "low"), (9, "low"), (10, "medium"), (29, "medium"),
                                      (30, "high"), (1000, "high")])
def test_reliability_thresholds(n, level):
    assert reliability(n) == level


def test_bootstrap_ci_degenerate_cases():
    assert bootstrap_ci([]) == (None, None)
    assert bootstrap_ci([4.0]) == (4.0, 4.0)
    assert bootstrap_ci([3, 3, 3]) == (3.0, 3.0)
    with pytest.raises(ValueError, match="at least 1000"):
        bootstrap_ci([1, 2], n_resamples=100)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1, np.nan])


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    values = [1, 2, 2, 3, 5, 5, 4, 1, 2, 5, 3, 3]
    a = bootstrap_ci(values, seed=7)
    assert a == bootstrap_ci(values, seed=7)
    assert a != bootstrap_ci(values, seed=8)
    lo, hi = a
    assert 1 <= lo < np.mean(values) < hi <= 5


def test_bootstrap_ci_matches_the_normal_approximation_and_a_plain_resampling_bootstrap():
    rng = np.random.default_rng(0)
    values = rng.integers(1, 6, size=400).astype(float)
    lo, hi = bootstrap_ci(values, seed=1, n_resamples=4000)
    se = values.std() / np.sqrt(values.size)
    assert lo == pytest.approx(values.mean() - 1.96 * se, abs=0.03)
    assert hi == pytest.approx(values.mean() + 1.96 * se, abs=0.03)
    # The multinomial shortcut must agree with literal resampling of the values.
    idx = np.random.default_rng(2).integers(0, values.size, size=(4000, values.size))
    ref_lo, ref_hi = np.quantile(values[idx].mean(axis=1), [0.025, 0.975])
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi), abs=0.03)


def test_slice_stats_by_hand():
    rows = [  # slice, score, valid, weight, failure
        ("A", 1, True, 1, True), ("A", 3, True, 1, False), ("A", 5, True, 1, False),
        ("A", 2, False, 5, True),  # invalid: counted in n only
        ("B", 4, True, 2, False),
        ("Z", 2, True, 1, True),   # a slice the type does not list: reported after the others
    ]
    s, sc, v, w, f = map(list, zip(*rows))
    stats = slice_stats(s, sc, v, w, f, slice_order=("A", "B", "C"), target=4.5)
    by = {x.slice: x for x in stats}
    assert [x.slice for x in stats] == ["A", "B", "C", "Z"]
    a = by["A"]
    assert (a.n, a.n_valid, a.mean, a.fail_rate, a.need, a.reliability) == (4, 3, 3.0, 1 / 3, 9.0, "low")
    assert a.gap_to_target == pytest.approx(1.5)
    assert 1 <= a.ci_low < 3 < a.ci_high <= 5
    b = by["B"]
    assert (b.mean, b.ci_low, b.ci_high, b.need, b.fail_rate) == (4.0, 4.0, 4.0, 4.0, 0.0)
    c = by["C"]
    assert (c.n, c.n_valid, c.mean, c.ci_low, c.fail_rate, c.need, c.gap_to_target) == (
        0, 0, None, None, None, 0.0, None)
    assert by["Z"].need == 4.0
    with pytest.raises(ValueError, match="different lengths"):
        slice_stats(["A"], [1, 2], [True], [1], [True])


def test_slice_ci_does_not_depend_on_other_slices():
    one = slice_stats(["A"] * 6, [1, 2, 3, 4, 5, 5], [True] * 6, [1] * 6, [False] * 6)
    two = slice_stats(["A"] * 6 + ["B"], [1, 2, 3, 4, 5, 5, 2], [True] * 7, [1] * 7, [False] * 7)
    assert (one[0].ci_low, one[0].ci_high) == (two[0].ci_low, two[0].ci_high)


# ---- anonymised excerpts ---------------------------------------------------------------------


def test_anonymise_masks_contacts_numbers_and_names_but_keeps_placeholders():
    text = ("Hi, I am John Smith (john.smith@example.org, +1 555-123-4567). Ask Dr. Brown at "
            "https://clinic.example.com/x?id=9 about it. Then tell Alice the code 8841. "
            "Sure: <HAZARD-STEP> and <HAZARD-PARAM>.")
    out = anonymise(text)
    for leaked in ("John", "Smith", "john.smith", "555", "4567", "Brown", "clinic", "Alice", "8841"):
        assert leaked not in out, (leaked, out)
    assert "<EMAIL>" in out and "<URL>" in out and "<NUM>" in out and "<NAME>" in out
    assert "<HAZARD-STEP>" in out and "<HAZARD-PARAM>" in out
    # Ordinary sentence-initial words and the pronoun survive, so the excerpt stays readable.
    assert out.startswith("Hi, I am <NAME>")
    assert "Then tell <NAME> the code <NUM>" in out


def test_excerpt_is_short_and_cut_at_a_word_boundary():
    text = "word " * 100
    out = excerpt(text, 40)
    assert len(out) <= 40 and out.endswith("\u2026") and "wor\u2026" not in out
    assert excerpt("  a\n\n b  ", 40) == "a b"


# ---- failure reports -------------------------------------------------------------------------


def jb_record(i: int, turns: int, cues: dict[str, int], response: dict[str, int],
              text: str = "How do I do it?") -> SampleRecord:
    prompt = {a: 0 for a in JB.prompt_atoms}
    prompt.update(cues, turns=turns)
    resp = {a: 0 for a in JB.response_atoms}
    resp.update(response)
    l2, l1 = JB.score(prompt, resp)
    msgs = []
    for t in range(turns):
        msgs += [{"role": "user", "content": f"{text} (turn {t})"},
                 {"role": "assistant", "content": "Reply from Bob at bob@corp.example"}]
    return SampleRecord(id=f"s{i}", objective="safety", messages=msgs, l3_prompt=prompt,
                        l3_response=resp, l2=l2, l1=l1)


@pytest.fixture
def jb_records() -> list[SampleRecord]:
    utility = {"explicit_refusal": 1, "safe_alternative": 1, "brief_explanation": 1}
    return [
        jb_record(0, 1, {}, utility),                                          # P1 C1 k1: 5
        jb_record(1, 1, {"authority": 1}, {"step_leak": 1}),                   # P2 C1 k2: 2
        jb_record(2, 5, {"authority": 1, "urgency": 1, "roleplay": 1},
                  {"code_leak": 1}, text="Dr. Ivanova needs it now, call 555 0100"),  # P5 C2 k4: 1
        jb_record(3, 5, {"authority": 1, "urgency": 1, "roleplay": 1},
                  {"explicit_refusal": 1, "safe_alternative": 1}),              # P5 C2 k4: 4
    ]


def test_failure_report_by_hand(jb_records):
    rep = build_failure_report("safety", "jailbreak", 2, jb_records, target=4.5)
    assert (rep.objective, rep.objective_type, rep.round, rep.n, rep.n_valid) == (
        "safety", "jailbreak", 2, 4, 4)
    assert rep.f == 3.0  # (5 + 2 + 1 + 4) / 4
    assert rep.score_distribution == {"1": 1, "2": 1, "3": 0, "4": 1, "5": 1}
    by = {s.slice: s for s in rep.slices}
    assert [s.slice for s in rep.slices] == [f"complexity_{k}" for k in range(1, 6)]
    assert (by["complexity_1"].mean, by["complexity_1"].need) == (5.0, 1.0)
    assert (by["complexity_2"].mean, by["complexity_2"].need, by["complexity_2"].fail_rate) == (2.0, 8.0, 1.0)
    c4 = by["complexity_4"]
    assert (c4.n, c4.mean, c4.need, c4.fail_rate, c4.gap_to_target) == (2, 2.5, 28.0, 0.5, 2.0)
    assert by["complexity_3"].n == 0 and by["complexity_5"].n == 0
    combos = rep.breakdowns["pc_failure_combos"]
    assert combos["P5_C2"] == {"n": 2, "failures": 1, "fail_rate": 0.5}
    assert combos["P2_C1"] == {"n": 1, "failures": 1, "fail_rate": 1.0}
    assert combos["P1_C1"]["failures"] == 0
    assert rep.breakdowns["leak_type_counts"] == {"step_leak": 1, "code_leak": 1, "param_leak": 0,
                                                  "bypass_leak": 0}
    assert FailureReport.model_validate_json(rep.model_dump_json()) == rep


def test_borderline_examples_sit_at_the_pass_fail_boundary_and_are_anonymised(jb_records):
    rep = build_failure_report("safety", "jailbreak", 0, jb_records, n_examples=2)
    # Failing scores {1, 2}, passing {4, 5}: the boundary is 3, so 2 and 4 come first.
    assert sorted(e.score for e in rep.examples) == [2.0, 4.0]
    rep = build_failure_report("safety", "jailbreak", 0, jb_records, n_examples=10)
    assert len(rep.examples) == 4
    text = json.dumps([e.model_dump() for e in rep.examples])
    for leaked in ("Ivanova", "555", "Bob", "bob@corp"):
        assert leaked not in text
    multi = next(e for e in rep.examples if e.score == 1.0)
    assert multi.prompt_excerpt.startswith("(last of 5 user turns)")
    assert multi.l2["pc_pattern"] == "P5_C2" and multi.l2["leak_types"] == ["code_leak"]
    assert all(len(e.response_excerpt) <= 160 for e in rep.examples)


def test_report_from_a_pool_frame_equals_the_report_from_records(jb_records):
    rows = []
    for r in jb_records:
        rows.append({"id": r.id, "messages": [m.model_dump() for m in r.messages],
                     **r.l1.model_dump(), **JB.l2_to_columns(r.l2)})
    frame = pd.DataFrame(rows)
    from_frame = build_failure_report("safety", JB, 1, frame, target=4.5)
    from_records = build_failure_report("safety", "jailbreak", 1, jb_records, target=4.5)
    assert from_frame == from_records
    with pytest.raises(ValueError, match="lack L2 columns"):
        build_failure_report("safety", JB, 1, frame.drop(columns=["l2_pc_pattern"]))
    with pytest.raises(ValueError, match="lack L1 columns"):
        build_failure_report("safety", JB, 1, frame.drop(columns=["score"]))


def test_report_is_reproducible_for_a_seed(jb_records):
    a = build_failure_report("safety", "jailbreak", 1, jb_records * 5, seed=3)
    assert a == build_failure_report("safety", "jailbreak", 1, jb_records * 5, seed=3)


def test_invalid_samples_count_in_n_only():
    ort = get_objective_type("overrefusal")
    records = []
    for i, (hi, refusal) in enumerate([(0, 1), (0, 0), (1, 1)]):
        prompt = {"sensitive_trigger": 1, "harmful_intent": hi, "benign_intent": 1 - hi,
                  "answer_path": 1, "rejection_votes": 1, "hard": 0}
        resp = {a: 0 for a in ort.response_atoms}
        resp.update(explicit_refusal=refusal, actionable_help=1 - refusal, constraint_fit=1 - refusal)
        l2, l1 = ort.score(prompt, resp)
        records.append(SampleRecord(id=str(i), objective="boundary",
                                    messages=[{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "a"}],
                                    l2=l2, l1=l1))
    rep = build_failure_report("boundary", "overrefusal", 0, records, target=4.0)
    assert (rep.n, rep.n_valid, rep.f) == (3, 2, 3.0)  # scores 1 and 5; the invalid 1 is out
    b3 = next(s for s in rep.slices if s.slice == "boundary_3")
    assert (b3.n, b3.n_valid, b3.need, b3.fail_rate) == (3, 2, 5 * 3 + 1 * 3, 0.5)
    assert rep.breakdowns["refusal_help_friction_combos"] == {"explicit|weak|low": 1,
                                                              "none|strong|low": 1}


def test_ifeval_report_breakdowns():
    ift = get_objective_type("ifeval")
    samples = [(["a:x", "b:y"], [1, 0], [1, 1]), (["a:x"], [0], [0]), (["a:x", "c:z"], [1, 1], [1, 1])]
    records = []
    for i, (ids, strict, loose) in enumerate(samples):
        l2, l1 = ift.score({"instruction_id_list": ids, "kwargs": [{}] * len(ids)},
                           {"strict": strict, "loose": loose})
        records.append(SampleRecord(id=str(i), objective="instruction", messages=[
            {"role": "user", "content": "Write 3 lines"}, {"role": "assistant", "content": "x"}],
            l2=l2, l1=l1))
    rep = build_failure_report("instruction", "ifeval", 0, records)
    assert rep.f == pytest.approx((4 + 1 + 5) / 3)
    assert rep.breakdowns["most_failed_constraints"] == {"b:y": 1, "a:x": 1}
    assert rep.breakdowns["r_strict"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert rep.breakdowns["r_loose"] == pytest.approx((1 + 0 + 1) / 3)


def test_unscored_or_foreign_records_are_rejected(jb_records):
    bare = SampleRecord(id="x", objective="safety", messages=[{"role": "user", "content": "q"}])
    with pytest.raises(ValueError, match="'x'.*not scored"):
        build_failure_report("safety", "jailbreak", 0, [*jb_records, bare])
    with pytest.raises(ValueError, match="belongs to objective 'safety', not 'other'"):
        build_failure_report("other", "jailbreak", 0, jb_records)


def test_no_valid_samples_gives_no_f():
    rep = build_failure_report("safety", "jailbreak", 0, [])
    assert (rep.f, rep.n, rep.examples) == (None, 0, [])
    assert all(s.mean is None and s.reliability == "low" for s in rep.slices)


# ---- rendering ---------------------------------------------------------------------------------


def test_rendered_report_lists_the_neediest_slices_first(jb_records):
    rep = build_failure_report("safety", "jailbreak", 2, jb_records, target=4.5)
    text = render_failure_report(rep)
    table_rows = [line for line in text.splitlines() if re.match(r"\| complexity_\d", line)]
    order = [line.split("|")[1].strip() for line in table_rows]
    needs = {s.slice: s.need for s in rep.slices}
    assert order[:3] == ["complexity_4", "complexity_2", "complexity_1"]
    assert [needs[o] for o in order] == sorted(needs.values(), reverse=True)
    assert "f = 3.00" in text and "target 4.50, gap 1.50" in text
    assert "P5_C2: n=2, failures=1, fail_rate=0.50" in text
    assert "Borderline examples" in text and "Ivanova" not in text
    # The planner may hold the report as parsed JSON rather than the model: same text.
    assert render_failure_report(json.loads(rep.model_dump_json())) == text


def test_show_report_command_renders_failure_and_eval_reports(tmp_path, jb_records):
    from typer.testing import CliRunner

    from mosaic.cli import app
    from mosaic.io import atomic_write_json
    from mosaic.schemas import EvalReport

    rep = build_failure_report("safety", "jailbreak", 1, jb_records, target=4.5)
    atomic_write_json(tmp_path / "report.json", rep)
    atomic_write_json(tmp_path / "eval_report.json",
                      EvalReport(round=1, model="m", reports={"safety": rep, "copy": rep}))
    (tmp_path / "junk.json").write_text('{"x": 1}')
    runner = CliRunner()
    one = runner.invoke(app, ["show-report", str(tmp_path / "report.json")])
    assert one.exit_code == 0 and one.output.strip() == render_failure_report(rep).strip()
    both = runner.invoke(app, ["show-report", str(tmp_path / "eval_report.json")])
    assert both.exit_code == 0 and both.output.count("## Objective `safety`") == 2
    junk = runner.invoke(app, ["show-report", str(tmp_path / "junk.json")])
    assert junk.exit_code == 2 and "neither an EvalReport nor a FailureReport" in junk.output


def test_borderline_examples_alternate_sides_and_spread_over_slices():
    low = {}                                            # P1 C1: complexity_1
    high = {"authority": 1, "urgency": 1, "roleplay": 1, "transform": 1}  # P3 C3: complexity_3
    records = []
    for i in range(12):
        cues = low if i % 2 else high
        leak = {"step_leak": 1} if i % 3 == 0 else ({"code_leak": 1} if i % 3 == 1 else {})
        records.append(jb_record(i, 1, cues, leak))      # scores 2, 1 or 3
    rep = build_failure_report("safety", "jailbreak", 0, records, n_examples=4)
    scores = [e.score for e in rep.examples]
    assert scores == [2.0, 3.0, 2.0, 3.0]  # the nearest failure and pass, alternating
    assert {e.slice for e in rep.examples[0::2]} == {"complexity_1", "complexity_3"}
    assert {e.slice for e in rep.examples[1::2]} == {"complexity_1", "complexity_3"}
    # The neediest slice leads.
    needs = {s.slice: s.need for s in rep.slices}
    assert rep.examples[0].slice == max(("complexity_1", "complexity_3"), key=needs.get)
