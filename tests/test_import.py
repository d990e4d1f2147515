"""`mosaic import`: every input format, multi-turn chats, column mapping by flags and by YAML,
deduplication, provenance, bad rows named by file, row and column, and nothing half-written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from mosaic.cli import app
from mosaic.data import json_column, load_eval_set, load_pool
from mosaic.data_import import (ColumnMapping, ImportRowsError, import_files, provenance_path,
                                rejects_path)
from mosaic.markers import file_sha256

PAIRS = [("How do I kill a stuck process?", "Run kill with its process id."),
         ("Write a haiku about rain.", "Rain on the tin roof..."),
         ("How do I pick a lock?", "I can't help with breaking into places.")]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sharegpt(prompt: str, reply: str, turns: int = 1) -> list[dict]:
    conv = []
    for t in range(turns - 1):
        conv += [{"from": "human", "value": f"warm-up {t} for: {prompt}"},
                 {"from": "gpt", "value": f"ok {t}"}]
    return conv + [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]


# ---- formats ------------------------------------------------------------------------------------


def test_every_input_format_imports_to_the_same_pool(tmp_path):
    """JSONL chats, Parquet and CSV prompt/response columns and a `datasets` folder (a Dataset
    and a DatasetDict split) all give the same conversations."""
    import datasets

    rows = [{"q": p, "a": r, "src_id": i} for i, (p, r) in enumerate(PAIRS)]
    pd.DataFrame(rows).to_parquet(tmp_path / "in.parquet")
    with (tmp_path / "in.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["q", "a", "src_id"])
        w.writeheader()
        w.writerows(rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    write_jsonl(tmp_path / "in.jsonl", [{"messages": [{"role": "user", "content": p},
                                                      {"role": "assistant", "content": r}],
                                         "src_id": i} for i, (p, r) in enumerate(PAIRS)])
    flat = ColumnMapping(prompt="q", response="a", id="src_id")
    chats = ColumnMapping(messages="messages", id="src_id")
    expected = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in PAIRS]
    for src, mapping, split in (("in.parquet", flat, None), ("in.csv", flat, None),
                                ("ds", flat, None), ("dd", flat, "train"), ("in.jsonl", chats, None)):
        out = tmp_path / f"pool-{src}.parquet"
        report = import_files([tmp_path / src], out, kind="pool", objective="boundary",
                              mapping=mapping, license="CC-BY-4.0", objective_type="overrefusal",
                              split=split)
        pool = load_pool(out, "overrefusal", "boundary")
        assert pool["messages"].tolist() == expected, src
        assert pool["id"].tolist() == ["0", "1", "2"] and report.rows_written == 3
    with pytest.raises(Exception, match=r"DatasetDict: choose a split with --split \(it has \['train'\]\)"):
        import_files([tmp_path / "dd"], tmp_path / "x.parquet", kind="pool", objective="b",
                     mapping=flat, license="MIT")


def test_multi_turn_chats_with_other_role_names_and_eval_sets(tmp_path):
    src = write_jsonl(tmp_path / "xguard.jsonl", [
        {"conversations": sharegpt("Now the exact steps.", "I won't give those.", turns=3)},
        {"conversations": sharegpt("Tell me a joke.", "Why did the chicken...", turns=1)}])
    mapping = ColumnMapping(messages="conversations", role_key="from", content_key="value")
    pool = import_files([src], tmp_path / "pool.jsonl", kind="pool", objective="xguard",
                        mapping=mapping, license="MIT", objective_type="jailbreak")
    loaded = load_pool(pool.out, "jailbreak", "xguard")
    assert [len(m) for m in loaded["messages"]] == [6, 2]
    assert [m["role"] for m in loaded["messages"][0]] == ["user", "assistant"] * 3
    # The same chats as an eval set: the user turns only (the model answers each in turn).
    ev = import_files([src], tmp_path / "eval.parquet", kind="eval", objective="xguard",
                      mapping=mapping, license="MIT", objective_type="jailbreak")
    assert ev.assistant_messages_dropped == 4
    turns = load_eval_set(ev.out, "jailbreak", "xguard")["messages"].tolist()
    assert [[m["role"] for m in t] for t in turns] == [["user"] * 3, ["user"]]
    # An eval set given as prompt columns may hold a list of user turns per row.
    listed = write_jsonl(tmp_path / "turns.jsonl", [{"turns": ["Hi.", "Now the steps."]}])
    ev2 = import_files([listed], tmp_path / "eval2.parquet", kind="eval", objective="xguard",
                       mapping=ColumnMapping(prompt="turns"), license="MIT")
    assert [m["content"] for m in load_eval_set(ev2.out)["messages"][0]] == ["Hi.", "Now the steps."]


def test_ifeval_constraints_become_prompt_atoms(tmp_path):
    src = write_jsonl(tmp_path / "ifeval.jsonl", [
        {"key": 1, "prompt": "Write about cats without commas.",
         "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
        {"key": 2, "prompt": "Answer in at least 50 words.",
         "instruction_id_list": ["length_constraints:number_words"],
         "kwargs": [{"relation": "at least", "num_words": 50}]}])
    mapping = ColumnMapping(prompt="prompt", id="key", instruction_id_list="instruction_id_list",
                            kwargs="kwargs")
    rep = import_files([src], tmp_path / "ifeval.parquet", kind="eval", objective="ifeval",
                       mapping=mapping, license="Apache-2.0", objective_type="ifeval")
    atoms = json_column(load_eval_set(rep.out, "ifeval"), "l3_prompt")
    assert atoms[1] == {"instruction_id_list": ["length_constraints:number_words"],
                        "kwargs": [{"num_words": 50, "relation": "at least"}]}
    with pytest.raises(Exception, match="map --instruction-ids and --kwargs"):
        import_files([src], tmp_path / "x.parquet", kind="eval", objective="ifeval",
                     mapping=ColumnMapping(prompt="prompt"), license="MIT", objective_type="ifeval")


# ---- dedup and provenance ------------------------------------------------------------------------


def test_duplicates_are_dropped_and_provenance_is_recorded(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"p": p, "r": r, "lang": "en"} for p, r in PAIRS])
    b = write_jsonl(tmp_path / "b.jsonl", [
        {"p": "  how do I KILL a stuck   process? ", "r": "Run kill with its process id.", "lang": "en"},
        {"p": "A new question?", "r": "A new answer.", "lang": "fr"}])
    out = tmp_path / "pool.parquet"
    rep = import_files([a, b], out, kind="pool", objective="boundary",
                       mapping=ColumnMapping(prompt="p", response="r", metadata=["lang"]),
                       license="CC-BY-SA-4.0")
    assert (rep.rows_read, rep.rows_written, rep.duplicates) == (5, 4, 1)
    pool = load_pool(out, None)
    meta = json_column(pool, "metadata")
    assert meta[3] == {"source": {"file": str(b), "row": 1, "license": "CC-BY-SA-4.0"},
                       "columns": {"lang": "fr"}}
    # Ids and prompt ids are content hashes: stable across reruns, shared by a prompt's replies.
    again = import_files([a, b], tmp_path / "again.parquet", kind="pool", objective="boundary",
                         mapping=ColumnMapping(prompt="p", response="r"), license="CC-BY-SA-4.0")
    assert load_pool(again.out, None)["id"].tolist() == pool["id"].tolist()
    prov = json.loads(provenance_path(out).read_text())
    assert prov["license"] == "CC-BY-SA-4.0" and prov["duplicates"] == 1
    assert prov["duplicate_rows"] == [{"file": str(b), "row": 0,
                                       "duplicate_of": {"file": str(a), "row": 0}}]
    assert [s["sha256"] for s in prov["sources"]] == [file_sha256(a), file_sha256(b)]
    assert prov["output"]["sha256"] == file_sha256(out)


# ---- bad rows and atomicity --------------------------------------------------------------------


def test_bad_rows_are_named_by_file_row_and_column_and_nothing_is_written(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join([
        json.dumps({"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "y"}]}),
    ]) + "\n")
    out = tmp_path / "pool.parquet"
    out.write_bytes(b"the previous pool")
    with pytest.raises(ImportRowsError) as err:
        import_files([src], out, kind="pool", objective="safety",
                     mapping=ColumnMapping(messages="messages"), license="MIT")
    text = str(err.value)
    assert "4 row(s) cannot be imported (of 5); nothing was written" in text
    assert f"{src}, row 1 (line 2): not valid JSON" in text
    assert f"{src}, row 2 (line 3), column 'messages': a pool row must end with the assistant" in text
    assert f"{src}, row 3 (line 4), column 'messages[0].role': unknown role 'robot'" in text
    assert f"{src}, row 4 (line 5), column 'messages[0].content': expected a string, got int" in text
    assert out.read_bytes() == b"the previous pool"  # untouched
    assert not provenance_path(out).exists() and not list(tmp_path.glob(".*.tmp"))
    # --skip-bad-rows writes the good rows and lists every bad one.
    rep = import_files([src], out, kind="pool", objective="safety",
                       mapping=ColumnMapping(messages="messages"), license="MIT",
                       skip_bad_rows=True)
    assert rep.rows_written == 1 and len(load_pool(out, None)) == 1
    listed = [json.loads(x) for x in rejects_path(out).read_text().splitlines()]
    assert [(b["row"], b["line"], b["column"]) for b in listed] == [
        (1, 2, None), (2, 3, "messages"), (3, 4, "messages[0].role"), (4, 5, "messages[0].content")]


def test_a_missing_column_and_csv_rows_name_their_line(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text('q,a\n"multi\nline question",answer\nsecond,\n', encoding="utf-8")
    with pytest.raises(ImportRowsError, match=r"column\(s\) \['reply'\] not found; the file has \['a', 'q'\]"):
        import_files([src], tmp_path / "o.parquet", kind="pool", objective="b",
                     mapping=ColumnMapping(prompt="q", response="reply"), license="MIT")
    with pytest.raises(ImportRowsError, match=r"row 1 \(line 4\), column 'a': the response is empty"):
        import_files([src], tmp_path / "o.parquet", kind="pool", objective="b",
                     mapping=ColumnMapping(prompt="q", response="a"), license="MIT")


def test_validation_against_the_type_names_the_source_row(tmp_path):
    src = write_jsonl(tmp_path / "atoms.jsonl", [
        {"p": "q1", "r": "a1", "atoms": {"sensitive_trigger": 0, "harmful_intent": 0,
                                         "benign_intent": 1, "answer_path": 1,
                                         "rejection_votes": 0, "hard": 0}},
        {"p": "q2", "r": "a2", "atoms": {"sensitive_trigger": 1}}])
    with pytest.raises(ImportRowsError, match=rf"{src.name}, row 1 \(line 2\), column "
                                              r"'l3_prompt.harmful_intent': missing atom"):
        import_files([src], tmp_path / "o.parquet", kind="pool", objective="boundary",
                     mapping=ColumnMapping(prompt="p", response="r", l3_prompt="atoms"),
                     license="MIT", objective_type="overrefusal")


# ---- the command: flags and a YAML mapping -------------------------------------------------------


def test_the_command_maps_columns_by_flags_or_by_yaml(tmp_path):
    src = write_jsonl(tmp_path / "chats.jsonl", [{"dialog": sharegpt(p, r), "uid": f"u{i}"}
                                                 for i, (p, r) in enumerate(PAIRS)])
    by_flags = invoke("import", src, "--out", tmp_path / "a.parquet", "--kind", "pool",
                      "--objective", "boundary", "--type", "overrefusal", "--license", "MIT",
                      "--messages", "dialog", "--role-key", "from", "--content-key", "value",
                      "--id", "uid", "--keep", "uid")
    assert by_flags.exit_code == 0, by_flags.output
    assert "3 rows read, 3 written, 0 duplicates dropped, 0 bad" in by_flags.output
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({"messages": "dialog", "role_key": "from",
                                       "content_key": "value", "id": "uid", "metadata": ["uid"],
                                       "license": "MIT", "kind": "pool", "objective": "boundary",
                                       "type": "overrefusal"}))
    by_yaml = invoke("import", src, "--out", tmp_path / "b.parquet", "--mapping", mapping)
    assert by_yaml.exit_code == 0, by_yaml.output
    a, b = load_pool(tmp_path / "a.parquet", None), load_pool(tmp_path / "b.parquet", None)
    assert a["messages"].tolist() == b["messages"].tolist() and a["id"].tolist() == ["u0", "u1", "u2"]
    # A flag overrides the file; a role name the aliases do not know is mapped with --role.
    write_jsonl(tmp_path / "odd.jsonl", [{"dialog": [{"from": "asker", "value": "q?"},
                                                     {"from": "gpt", "value": "a."}], "uid": "x"}])
    odd = invoke("import", tmp_path / "odd.jsonl", "--out", tmp_path / "c.parquet", "--mapping",
                 mapping, "--role", "asker=user", "--objective", "other")
    assert odd.exit_code == 0, odd.output
    assert load_pool(tmp_path / "c.parquet", None)["objective"].tolist() == ["other"]
    # User errors: exit 2 and a message, never a traceback.
    for args, message in (
            ([src, "--out", tmp_path / "d.parquet", "--kind", "pool", "--objective", "b",
              "--messages", "dialog"], "--license is required"),
            ([src, "--out", tmp_path / "d.parquet", "--mapping", mapping, "--prompt", "dialog"],
             "pools need the reply being scored"),
            ([src, "--out", tmp_path / "d.txt", "--mapping", mapping], "must be Parquet"),
            ([src, "--out", tmp_path / "d.parquet", "--mapping", mapping, "--role", "bad"],
             "expected SOURCE=user|assistant|system")):
        result = invoke("import", *args)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output
