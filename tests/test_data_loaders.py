"""Pool and eval-set loaders: round trips, `datasets` compatibility, annotation, and errors that
name the file, row and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mosaic.data import (DataFormatError, json_column, load_eval_set, load_pool, needs_annotation,
                         rows_needing_annotation, write_table)
from mosaic.eval import get_objective_type
from mosaic.eval.annotate import annotate_pool

JB = get_objective_type("jailbreak")
IFT = get_objective_type("ifeval")


def jb_atoms(i: int) -> tuple[dict[str, int], dict[str, int]]:
    prompt = {a: (i >> k) & 1 for k, a in enumerate(JB.prompt_atoms) if a != "turns"}
    prompt["turns"] = 1 + i % 6
    response = {a: int((i * 7 + k) % 5 == 0) for k, a in enumerate(JB.response_atoms)}
    return prompt, response


def conversation(i: int) -> list[dict[str, str]]:
    p, _ = jb_atoms(i)
    msgs = []
    for t in range(p["turns"]):
        msgs += [{"role": "user", "content": f"request {i} turn {t}"},
                 {"role": "assistant", "content": f"reply {i}.{t}"}]
    return msgs


def jb_pool_frame(n: int = 12, annotated: bool = True) -> pd.DataFrame:
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"r{i}", "prompt_id": f"p{i // 2}", "objective": "safety",
                               "messages": conversation(i),
                               "metadata": json.dumps({"template": "t1", "seed": i})}
        if annotated:
            p, r = jb_atoms(i)
            l2, l1 = JB.score(p, r)
            row.update(l3_prompt=json.dumps(p), l3_response=json.dumps(r), **l1.model_dump(),
                       **JB.l2_to_columns(l2))
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(params=["parquet", "jsonl"])
def suffix(request) -> str:
    return request.param


# ---- round trips -----------------------------------------------------------------------------


def test_pool_round_trip(tmp_path, suffix):
    df = jb_pool_frame()
    path = tmp_path / f"safety.{suffix}"
    write_table(path, df)
    loaded = load_pool(path, "jailbreak")
    assert list(loaded.columns) == list(df.columns)
    assert loaded["id"].tolist() == df["id"].tolist()
    assert loaded["messages"].tolist() == df["messages"].tolist()
    assert loaded["score"].dtype == "float64" and loaded["valid"].dtype == bool
    assert loaded["l2_leak_types"].tolist() == df["l2_leak_types"].tolist()
    assert json_column(loaded, "l3_prompt") == [json.loads(x) for x in df["l3_prompt"]]
    assert json_column(loaded, "absent") == [None] * len(df)
    assert not needs_annotation(loaded, "jailbreak")
    assert loaded.attrs["source"] == str(path)
    # Vectorised focus filters work on the loaded (Arrow-backed) columns.
    mask = JB.focus_mask(loaded, "leak_types", ["step_leak"])
    assert mask.tolist() == ["step_leak" in x for x in df["l2_leak_types"]]
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writer left nothing behind


def test_files_load_with_the_datasets_library(tmp_path):
    import datasets

    df = jb_pool_frame()
    write_table(tmp_path / "pool.parquet", df)
    write_table(tmp_path / "pool.jsonl", df)
    cache = str(tmp_path / "hf-cache")
    for builder, name in (("parquet", "pool.parquet"), ("json", "pool.jsonl")):
        ds = datasets.load_dataset(builder, data_files=str(tmp_path / name), split="train",
                                   cache_dir=cache)
        assert ds.num_rows == len(df)
        assert ds[3]["messages"] == df["messages"][3]
        assert ds[3]["score"] == df["score"][3]


def test_eval_set_loads_user_turns_and_checks_prompt_atoms(tmp_path):
    rows = [{"id": f"e{i}", "objective": "instruction",
             "messages": [{"role": "user", "content": f"Write {i} lines, no commas."}],
             "l3_prompt": json.dumps({"instruction_id_list": ["punctuation:no_comma"],
                                      "kwargs": [{}]}),
             "metadata": "{}"} for i in range(5)]
    write_table(tmp_path / "instruction.parquet", pd.DataFrame(rows))
    loaded = load_eval_set(tmp_path / "instruction.parquet", "ifeval")
    assert loaded["messages"].tolist()[0] == rows[0]["messages"]
    rows[2]["l3_prompt"] = json.dumps({"kwargs": [{}]})
    write_table(tmp_path / "bad.parquet", pd.DataFrame(rows))
    with pytest.raises(DataFormatError, match=r"bad\.parquet, row 2, field 'l3_prompt\.instruction_id_list'"):
        load_eval_set(tmp_path / "bad.parquet", "ifeval")


def test_jsonl_may_hold_json_columns_as_objects_and_date_like_ids_stay_strings(tmp_path):
    path = tmp_path / "pool.jsonl"
    p, r = jb_atoms(1)
    lines = [{"id": "2024-01-01", "messages": conversation(1), "l3_prompt": p, "l3_response": r,
              "metadata": {"source": "x"}},
             {"id": "2024-01-02", "messages": conversation(2), "l3_prompt": json.dumps(jb_atoms(2)[0]),
              "l3_response": json.dumps(jb_atoms(2)[1])}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    loaded = load_pool(path, "jailbreak")
    assert loaded["id"].tolist() == ["2024-01-01", "2024-01-02"]
    assert json.loads(loaded["l3_prompt"][0]) == p
    assert json_column(loaded, "metadata")[0] == {"source": "x"}
    # Columns the file lacks get their documented defaults.
    assert loaded["prompt_id"].tolist() == loaded["id"].tolist()
    assert loaded["objective"].tolist() == ["pool", "pool"]


# ---- annotation ------------------------------------------------------------------------------


class ScriptedJudge:
    """A judge plug-in whose answers are scripted by the request text (like a mock LLM)."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    @staticmethod
    def _index(conv) -> int:
        return int(conv[0]["content"].split()[1])

    def prompt_atoms(self, objective_type, conversations):
        assert all(c[-1]["role"] == "user" for c in conversations)  # prompt channel only
        self.calls.append(("prompt", len(conversations)))
        return [jb_atoms(self._index(c))[0] for c in conversations]

    def response_atoms(self, objective_type, conversations, prompt_atoms):
        assert objective_type == "jailbreak" and len(prompt_atoms) == len(conversations)
        self.calls.append(("response", len(conversations)))
        return [jb_atoms(self._index(c))[1] for c in conversations]


def test_unannotated_pool_is_annotated_by_judge_and_formulas(tmp_path, suffix):
    path = tmp_path / f"raw.{suffix}"
    write_table(path, jb_pool_frame(annotated=False)[["id", "messages", "metadata"]])
    raw = load_pool(path, "jailbreak", objective="safety")
    assert needs_annotation(raw) and needs_annotation(raw, "jailbreak")
    judge = ScriptedJudge()
    done = annotate_pool(raw, "jailbreak", judge, batch_size=5).frame
    assert judge.calls == [("prompt", 5), ("response", 5), ("prompt", 5), ("response", 5),
                           ("prompt", 2), ("response", 2)]
    assert not needs_annotation(done, "jailbreak")
    expected = jb_pool_frame()
    for col in ("slice", "score", "valid", "weight", "failure", "l2_pc_pattern", "l2_pressure"):
        assert done[col].tolist() == expected[col].tolist(), col
    assert done["l2_leak_types"].tolist() == expected["l2_leak_types"].tolist()
    assert needs_annotation(raw)  # the input frame is left as it was
    out = tmp_path / f"annotated.{suffix}"
    write_table(out, done)
    assert not needs_annotation(load_pool(out, "jailbreak"), "jailbreak")


def test_judge_is_asked_only_for_missing_atoms():
    df = jb_pool_frame()
    df = df.drop(columns=["l3_response", "slice", "score", "valid", "weight", "failure"])
    judge = ScriptedJudge()
    done = annotate_pool(df, "jailbreak", judge).frame
    assert judge.calls == [("response", len(df))]
    assert done["score"].tolist() == jb_pool_frame()["score"].tolist()
    # Rows already complete are left alone; only the row with a hole is redone.
    partial = jb_pool_frame()
    partial.loc[3, "score"] = None
    assert rows_needing_annotation(partial, "jailbreak").tolist() == [i == 3 for i in range(len(partial))]
    judge = ScriptedJudge()
    assert annotate_pool(partial, "jailbreak", judge).frame["score"][3] == jb_pool_frame()["score"][3]
    assert judge.calls == []  # its atoms were present


def test_bad_judge_output_is_reported():
    class Short(ScriptedJudge):
        def response_atoms(self, objective_type, conversations, prompt_atoms):
            return super().response_atoms(objective_type, conversations, prompt_atoms)[:-1]

    class Partial(ScriptedJudge):
        def response_atoms(self, objective_type, conversations, prompt_atoms):
            out = super().response_atoms(objective_type, conversations, prompt_atoms)
            del out[1]["code_leak"]
            return out

    raw = jb_pool_frame(annotated=False)
    # A judge that breaks its contract is a bug: it raises.
    with pytest.raises(ValueError, match="returned 11 response annotations for 12"):
        annotate_pool(raw, "jailbreak", Short())
    # Labels that lack atoms are that row's failure: listed with the reason, L1 left empty.
    result = annotate_pool(raw, "jailbreak", Partial())
    (failed,) = result.failures
    assert (failed.row, failed.id, failed.reason) == (1, "r1", "missing_atoms")
    assert "lack ['code_leak']" in failed.error
    assert result.frame["score"].isna().tolist() == [i == 1 for i in range(len(raw))]


# ---- malformed files -------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[Any], blank_after: int | None = None) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after + 1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def good_rows(n: int = 3) -> list[dict[str, Any]]:
    return json.loads(jb_pool_frame(n).to_json(orient="records"))


def test_bad_json_line_names_row_and_line(tmp_path):
    rows = good_rows()
    rows[1] = '{"id": "r1", "messages": [}'
    path = write_jsonl(tmp_path / "p.jsonl", rows, blank_after=0)
    with pytest.raises(DataFormatError, match=r"p\.jsonl, row 1 \(line 3\): not valid JSON"):
        load_pool(path, "jailbreak")


@pytest.mark.parametrize("field, value, message", [
    ("score", "high", r"row 2 \(line 3\), field 'score': expected a number"),
    ("valid", 1, r"row 2 \(line 3\), field 'valid': expected true or false"),
    ("id", 7, r"row 2 \(line 3\), field 'id': expected a string"),
    ("messages", "hello", r"row 2 \(line 3\), field 'messages': expected a list"),
    ("messages", [{"role": "user"}], r"row 2 \(line 3\), field 'messages.content': message 0 has no content"),
    ("messages", [{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a"}],
     r"field 'messages'.*exactly"),
    ("messages", [{"role": "bot", "content": "x"}],
     r"row 2 \(line 3\), field 'messages.role': message 0 has unknown role 'bot'"),
    ("l3_prompt", [1, 2], r"field 'l3_prompt': expected a JSON object"),
])
def test_wrong_types_in_jsonl(tmp_path, field, value, message):
    rows = good_rows()
    rows[2][field] = value
    with pytest.raises(DataFormatError, match=message):
        load_pool(write_jsonl(tmp_path / "p.jsonl", rows), "jailbreak")


@pytest.mark.parametrize("field, value, message", [
    ("score", float("nan"), r"row 2 \(line 3\), field 'score': expected a finite number in "
                            r"\[1, 5\] \(or null for an unscored row\), got nan"),
    ("weight", float("inf"), r"row 2 \(line 3\), field 'weight': expected a finite number.*got inf"),
])
def test_nan_and_infinite_scores_are_rejected_not_read_as_missing(tmp_path, field, value, message):
    # json.dumps writes NaN / Infinity literals, which both JSON readers accept.
    rows = good_rows()
    rows[2][field] = value
    with pytest.raises(DataFormatError, match=message):
        load_pool(write_jsonl(tmp_path / "p.jsonl", rows), "jailbreak")
    table = pa.Table.from_pandas(jb_pool_frame(4), preserve_index=False)
    column = table[field].to_pylist()
    column[1] = value
    pq.write_table(table.set_column(table.schema.get_field_index(field), field,
                                    pa.array(column, pa.float64(), from_pandas=False)),
                   tmp_path / "p.parquet")
    with pytest.raises(DataFormatError, match=rf"p\.parquet, row 1, field '{field}': expected a finite"):
        load_pool(tmp_path / "p.parquet", "jailbreak")
    # A null score is an unscored row, as before (the row then needs annotation).
    rows = good_rows()
    for key in ("slice", "score", "valid", "weight", "failure"):
        rows[2][key] = None
    assert rows_needing_annotation(load_pool(write_jsonl(tmp_path / "p.jsonl", rows),
                                             "jailbreak")).tolist() == [False, False, True]


@pytest.mark.parametrize("bad_row", [0, 2])
def test_a_jsonl_file_that_is_not_utf8_names_the_line(tmp_path, bad_row):
    lines = [json.dumps(r, ensure_ascii=False) for r in good_rows()]
    lines[bad_row] = lines[bad_row].replace("request", "r\xe9quest")
    path = tmp_path / "p.jsonl"
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    with pytest.raises(DataFormatError, match=rf"p\.jsonl, line {bad_row + 1}: not UTF-8 text"):
        load_pool(path, "jailbreak")


def parquet_with(tmp_path: Path, change) -> Path:
    df = jb_pool_frame(4)
    df = change(df) if change else df
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


def _set(col, i, value):
    def change(df):
        df[col] = df[col].astype(object)
        df.at[i, col] = value
        return df
    return change


@pytest.mark.parametrize("change, message", [
    (lambda df: df.drop(columns=["messages"]), r"missing column\(s\) \['messages'\]"),
    (lambda df: df.assign(id=range(4)), r"field 'id': expected string values, the column holds int64"),
    (_set("id", 3, "r0"), r"row 3, field 'id': 'r0' already used by row 0"),
    (_set("messages", 1, [{"role": "bot", "content": "x"}]),
     r"row 1, field 'messages.role': message 0 has unknown role 'bot'"),
    (_set("messages", 2, [{"role": "user", "content": "x"}]),
     r"row 2, field 'messages': a pool row must end with the assistant response"),
    (_set("messages", 2, [{"role": "assistant", "content": "x"}]),
     r"row 2, field 'messages': the conversation has no user message"),
    (_set("messages", 1, []), r"row 1, field 'messages': empty conversation"),
    (_set("messages", 3, [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]),
     r"row 3, field 'messages.content': message 0 has no content"),
    (_set("l3_prompt", 2, "{not json"), r"row 2, field 'l3_prompt': not valid JSON"),
    (_set("l3_prompt", 1, json.dumps({"authority": 1})), r"row 1, field 'l3_prompt.urgency': missing atom"),
    (_set("score", 1, 7.0), r"row 1, field 'score': expected a number in \[1, 5\], got 7"),
    (_set("slice", 0, "complexity_9"), r"row 0, field 'slice': unknown slice 'complexity_9'"),
    (_set("valid", 2, None), r"row 2, field 'valid': missing value in a scored row"),
    (lambda df: df.drop(columns=["weight"]),
     r"missing column\(s\) \['weight'\] \(L1 columns come together\)"),
    (lambda df: df.drop(columns=["l2_safety"]), r"L2 columns come together; missing \['l2_safety'\]"),
])
def test_malformed_parquet_pools(tmp_path, change, message):
    path = parquet_with(tmp_path, change)
    with pytest.raises(DataFormatError, match=rf"pool\.parquet, .*{message}|pool\.parquet: {message}"):
        load_pool(path, "jailbreak")


def test_eval_set_must_not_contain_answers(tmp_path):
    rows = [{"id": "e0", "messages": [{"role": "user", "content": "q"}]},
            {"id": "e1", "messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a"},
                                      {"role": "user", "content": "q2"}]}]
    path = write_jsonl(tmp_path / "eval.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"row 1 \(line 2\), field 'messages': eval sets hold "
                                              r"the user turns only.*message 1"):
        load_eval_set(path)


def test_vectorised_errors_in_jsonl_report_the_line(tmp_path):
    rows = good_rows(4)
    rows[3]["messages"] = [{"role": "user", "content": "only a question"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows, blank_after=1)
    with pytest.raises(DataFormatError, match=r"row 3 \(line 5\), field 'messages': a pool row must end"):
        load_pool(path, "jailbreak")


def test_unsupported_or_missing_files(tmp_path):
    (tmp_path / "p.csv").write_text("id\n1\n")
    with pytest.raises(DataFormatError, match="unsupported file type '.csv'"):
        load_pool(tmp_path / "p.csv", "jailbreak")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_pool(tmp_path / "nope.parquet", "jailbreak")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="not a readable parquet file"):
        load_pool(tmp_path / "junk.parquet", "jailbreak")
    with pytest.raises(ValueError, match="unsupported suffix"):
        write_table(tmp_path / "x.csv", jb_pool_frame(2))


def test_write_table_replaces_atomically(tmp_path):
    path = tmp_path / "p.parquet"
    write_table(path, jb_pool_frame(3))
    write_table(path, jb_pool_frame(5))
    assert len(load_pool(path, "jailbreak")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]


# ---- summaries and the CLI -------------------------------------------------------------------


def test_describe_and_arrow_table_loading(tmp_path):
    from mosaic.data import describe, load_pool_table

    df = jb_pool_frame()
    write_table(tmp_path / "pool.parquet", df)
    table = load_pool_table(tmp_path / "pool.parquet", "jailbreak")
    assert isinstance(table, pa.Table) and table.num_rows == len(df)
    assert table.schema.field("id").type == pa.string()
    info = describe(load_pool(tmp_path / "pool.parquet", "jailbreak"), "jailbreak")
    assert info["rows"] == 12 and info["prompts"] == 6 and info["rows_needing_annotation"] == 0
    assert info["slices"] == df["slice"].value_counts().sort_index().to_dict()
    assert sum(info["score_distribution"].values()) == 12
    assert info["mean_score_valid"] == pytest.approx(df["score"].mean())
    raw = describe(jb_pool_frame(annotated=False))
    assert raw["rows_needing_annotation"] == 12 and "slices" not in raw


def test_check_data_command(tmp_path):
    from typer.testing import CliRunner

    from mosaic.cli import app

    write_table(tmp_path / "pool.jsonl", jb_pool_frame(4))
    ok = CliRunner().invoke(app, ["check-data", str(tmp_path / "pool.jsonl"), "--type", "jailbreak"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["rows"] == 4
    bad = CliRunner().invoke(app, ["check-data", str(tmp_path / "pool.jsonl"), "--eval"])
    assert bad.exit_code == 2 and "assistant message" in bad.output


def test_ifeval_pool_with_checker_atoms_loads_and_reports(tmp_path):
    """An `ifeval` pool whose atoms come from the real checker: heterogeneous kwargs and
    unchecked (null) verdicts survive the round trip, and the report reads the frame."""
    from mosaic.eval.ifeval_checker import judge_response
    from mosaic.eval.report import build_failure_report

    prompts = [
        ("Answer without commas.", ["punctuation:no_comma"], [{}]),
        ("Use all lowercase and at least 3 words.",
         ["change_case:english_lowercase", "length_constraints:number_words"],
         [{}, {"relation": "at least", "num_words": 3}]),
        ("Write in capitals, use 'sun'.", ["change_case:english_capital", "keywords:existence"],
         [{}, {"keywords": ["sun"]}]),
        ("Capitalise some words.", ["change_case:capital_word_frequency"], [{}]),  # underspecified
    ]
    responses = ["yes, no, maybe", "the sun is warm today", "THE SUN IS UP", "Fine."]
    rows = []
    for i, ((text, ids, kwargs), reply) in enumerate(zip(prompts, responses)):
        l3p = {"instruction_id_list": ids, "kwargs": kwargs}
        l3r = judge_response(reply, l3p, text)
        l2, l1 = IFT.score(l3p, l3r)
        rows.append({"id": f"i{i}", "prompt_id": f"i{i}", "objective": "instruction",
                     "messages": [{"role": "user", "content": text},
                                  {"role": "assistant", "content": reply}],
                     "l3_prompt": json.dumps(l3p), "l3_response": json.dumps(l3r), "metadata": "{}",
                     **l1.model_dump(), **IFT.l2_to_columns(l2)})
    path = tmp_path / "instruction.parquet"
    write_table(path, pd.DataFrame(rows))
    pool = load_pool(path, "ifeval")
    assert json.loads(pool["l3_response"][3])["status"] == ["underspecified"]
    assert pool["score"].tolist() == [1.0, 5.0, 5.0, 5.0]  # the comma reply fails its one constraint
    assert pool["valid"].tolist() == [True, True, True, False]
    assert pool["l2_failed_constraints"].tolist()[0] == ["punctuation:no_comma"]
    rep = build_failure_report("instruction", "ifeval", 0, pool)
    assert (rep.n, rep.n_valid, rep.f) == (4, 3, pytest.approx(11 / 3))
    assert rep.breakdowns["most_failed_constraints"] == {"punctuation:no_comma": 1}


def test_annotate_reports_unusable_atoms_and_progress():
    df = jb_pool_frame(6).drop(columns=["score"])
    df.loc[4, "l3_prompt"] = "{broken"
    df.attrs["source"] = "pools/safety.parquet"
    with pytest.raises(DataFormatError, match=r"pools/safety\.parquet, row 4, field 'l3_prompt'"):
        annotate_pool(df, "jailbreak", ScriptedJudge())
    df.loc[4, "l3_prompt"] = json.dumps({"turns": 2})  # parses, but lacks atoms
    with pytest.raises(DataFormatError, match=r"row 4, field 'l3_prompt/l3_response': cannot score"):
        annotate_pool(df, "jailbreak", ScriptedJudge())
    seen = []
    annotate_pool(jb_pool_frame(6, annotated=False), "jailbreak", ScriptedJudge(), batch_size=4,
                  progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 6), (6, 6)]
