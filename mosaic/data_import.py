"""`mosaic import`: a team's own files become pool or eval files in the project's format.

Sources are JSONL, Parquet, CSV or a `datasets` folder written by `save_to_disk`. A column
mapping (flags or a YAML file) says where each row's conversation is: a chat `messages` column
(any role/content key names, role names mapped), or prompt/response columns (a prompt may be a
list of user turns). Rows are checked one by one and every bad row is reported with its file,
row (and line) and column; duplicates (same conversation after Unicode, case and whitespace
normalisation) are dropped, first occurrence kept; every written row records its provenance in
`metadata.source` (file, row, the licence the user gives). The output is validated against
docs/data-format.md and written atomically, with a `<stem>.provenance.json` summary beside it:
a failed import leaves nothing behind.
"""

from __future__ import annotations

import csv
import hashlib
import json
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from mosaic.data import (JSONL_SUFFIXES, MESSAGE_TYPE, PARQUET_SUFFIXES, ROLES, DataFormatError,
                         validate_table, write_table)
from mosaic.io import atomic_write_json
from mosaic.schemas import Role

IMPORT_VERSION = 1
CSV_SUFFIXES = (".csv",)
# Role names other chat formats use (ShareGPT, Gemini, ...), unless the mapping says otherwise.
ROLE_ALIASES: dict[str, Role] = {"human": "user", "gpt": "assistant", "model": "assistant",
                                 "bot": "assistant", "chatbot": "assistant", "ai": "assistant"}
MAX_SHOWN = 20  # bad rows listed in an error message (all of them go to the rejects file)


class _MappingFields(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: str | None = None  # a list of {role, content}-like objects
    role_key: str = "role"
    content_key: str = "content"
    roles: dict[str, Role] = {}  # source role name -> system / user / assistant
    prompt: str | None = None  # a string, or a list of strings (user turns)
    response: str | None = None  # the assistant reply (pools)
    system: str | None = None  # an optional system prompt
    id: str | None = None  # default: a hash of the conversation
    prompt_id: str | None = None  # default: a hash of the conversation before the reply
    instruction_id_list: str | None = None  # IFEval constraint ids (ifeval prompt atoms)
    kwargs: str | None = None  # IFEval constraint arguments, one object per id
    l3_prompt: str | None = None  # prompt atoms already labelled (an object or JSON text)
    l3_response: str | None = None  # response atoms already labelled (pools)
    metadata: list[str] = []  # source columns kept under metadata.columns


class ColumnMapping(_MappingFields):
    """Where a source row's parts are. Exactly one of `messages` and `prompt` is given."""

    @model_validator(mode="after")
    def _one_source(self) -> "ColumnMapping":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` (a chat column) and `prompt` (with "
                             "`response` for pools)")
        if self.messages is not None and (self.response or self.system):
            raise ValueError("`response` and `system` go with `prompt`; a `messages` column holds "
                             "the whole conversation")
        if (self.instruction_id_list is None) != (self.kwargs is None):
            raise ValueError("`instruction_id_list` and `kwargs` come together")
        if self.instruction_id_list is not None and self.l3_prompt is not None:
            raise ValueError("give either `instruction_id_list`/`kwargs` or `l3_prompt`, not both")
        return self

    def columns(self) -> list[str]:
        """Every source column the mapping reads."""
        named = [self.messages, self.prompt, self.response, self.system, self.id, self.prompt_id,
                 self.instruction_id_list, self.kwargs, self.l3_prompt, self.l3_response]
        return list(dict.fromkeys([c for c in named if c] + list(self.metadata)))


class MappingFile(_MappingFields):
    """A YAML mapping file: the column mapping (flags may complete it), and optionally the
    import's other settings."""

    license: str | None = None
    kind: Literal["pool", "eval"] | None = None
    objective: str | None = None
    type: str | None = None
    split: str | None = None


def read_mapping_file(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML mapping file (validated field by field; flags are merged later)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise DataFormatError(path, f"cannot read the mapping file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise DataFormatError(path, f"not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise DataFormatError(path, f"expected a mapping of column names, got {type(data).__name__}")
    try:
        MappingFile.model_validate(data)
    except ValidationError as e:
        raise DataFormatError(path, _mapping_problems(e)) from None
    return data


def _mapping_problems(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'mapping'}: {e['msg']}" for e in err.errors())


def make_mapping(settings: Mapping[str, Any], where: str = "the column mapping") -> ColumnMapping:
    fields = {k: v for k, v in settings.items() if k in ColumnMapping.model_fields and v is not None}
    try:
        return ColumnMapping.model_validate(fields)
    except ValidationError as e:
        raise DataFormatError(where, _mapping_problems(e)) from None


# ---- reading sources ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BadRow:
    file: str
    row: int | None  # 0-based data row; None for a problem with the whole file
    column: str | None
    message: str
    line: int | None = None  # 1-based line (JSONL, CSV)

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f", row {self.row}" + (f" (line {self.line})" if self.line else "")
        if self.column:
            where += f", column {self.column!r}"
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "row": self.row, "line": self.line, "column": self.column,
                "message": self.message}


class ImportRowsError(ValueError):
    """Rows (or a whole file) could not be imported; nothing was written."""

    def __init__(self, bad: Sequence[BadRow], total: int | None = None) -> None:
        self.bad = list(bad)
        shown = "\n".join(f"  - {b}" for b in self.bad[:MAX_SHOWN])
        more = len(self.bad) - MAX_SHOWN
        super().__init__(f"{len(self.bad)} row(s) cannot be imported"
                         + (f" (of {total})" if total else "") + "; nothing was written:\n" + shown
                         + (f"\n  ... and {more} more (--skip-bad-rows writes the good rows and "
                            f"lists every bad one)" if more > 0 else ""))


@dataclass
class Source:
    """One input file's rows (plain Python values), their line numbers and its columns."""

    path: Path
    rows: list[dict[str, Any] | None]  # None: a line that is not a JSON object (see `bad`)
    lines: list[int | None]
    columns: set[str]
    bad: list[BadRow] = field(default_factory=list)


def read_source(path: str | Path, split: str | None = None) -> Source:
    """Rows of a JSONL, Parquet or CSV file, or of a `datasets` save_to_disk folder."""
    path = Path(path)
    if path.is_dir():
        return _read_datasets(path, split)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataFormatError(path, f"not a readable parquet file: {e}") from None
        rows = table.to_pylist()
        return Source(path, rows, [None] * len(rows), set(table.column_names))
    if suffix in CSV_SUFFIXES:
        return _read_csv(path)
    raise DataFormatError(path, f"unsupported input {suffix!r}: use JSONL "
                                f"({', '.join(JSONL_SUFFIXES)}), Parquet "
                                f"({', '.join(PARQUET_SUFFIXES)}), CSV or a `datasets` folder")


def _read_jsonl(path: Path) -> Source:
    src = Source(path, [], [], set())
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            row = len(src.rows)
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                src.bad.append(BadRow(str(path), row, None, f"not UTF-8 text (invalid byte at "
                                                             f"column {e.start + 1})", line_no))
                obj = None
            except json.JSONDecodeError as e:
                src.bad.append(BadRow(str(path), row, None, f"not valid JSON: {e.msg} (column "
                                                             f"{e.colno})", line_no))
                obj = None
            if obj is not None and not isinstance(obj, dict):
                src.bad.append(BadRow(str(path), row, None, f"expected a JSON object per line, "
                                                             f"got {type(obj).__name__}", line_no))
                obj = None
            src.rows.append(obj)
            src.lines.append(line_no)
            if obj:
                src.columns.update(obj)
    return src


def _read_csv(path: Path) -> Source:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, lines = [], []
            start = 2  # the header is line 1
            for record in reader:
                rows.append(dict(record))
                lines.append(start)
                start = reader.line_num + 1
            columns = set(reader.fieldnames or [])
    except UnicodeDecodeError as e:
        raise DataFormatError(path, f"not UTF-8 text (invalid byte at offset {e.start}); save the "
                                    f"CSV as UTF-8") from None
    except csv.Error as e:
        raise DataFormatError(path, f"not a readable CSV file: {e}") from None
    return Source(path, rows, lines, columns)


def _read_datasets(path: Path, split: str | None) -> Source:
    if not ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
            or (path / "dataset_dict.json").is_file()):
        raise DataFormatError(path, "a folder is read as a `datasets` save_to_disk folder, and this "
                                    "one has none of dataset_info.json, state.json, "
                                    "dataset_dict.json")
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise DataFormatError(path, f"a DatasetDict: choose a split with --split (it has "
                                        f"{sorted(ds)})" if split is None else
                                  f"no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    rows = ds.to_list()
    return Source(path, rows, [None] * len(rows), set(ds.column_names))


# ---- converting rows ---------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Text as duplicates are compared: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _hash(parts: Any) -> str:
    blob = json.dumps(parts, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _json_value(value: Any) -> Any:
    """A list/object given as JSON text (CSV cells, string columns) as the value itself."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _plain(value: Any) -> Any:
    """A value JSON can hold (numpy arrays from datasets, dates, bytes become lists/strings)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class _RowError(Exception):
    def __init__(self, column: str | None, message: str) -> None:
        super().__init__(message)
        self.column, self.message = column, message


def _text(value: Any, column: str, what: str) -> str:
    if not isinstance(value, str):
        raise _RowError(column, f"expected {what} (a string), got "
                                f"{'nothing' if value is None else type(value).__name__}")
    if not value.strip():
        raise _RowError(column, f"{what} is empty")
    return value


def _conversation(row: Mapping[str, Any], m: ColumnMapping, kind: str) -> tuple[list[dict[str, str]], int]:
    """The row's messages in the project's format, and how many assistant messages an eval row
    dropped (eval sets hold user turns; the model answers each)."""
    if m.messages is not None:
        value = _json_value(row.get(m.messages))
        if not isinstance(value, list) or not value:
            raise _RowError(m.messages, "expected a non-empty list of messages, got "
                                        f"{'nothing' if value is None else type(value).__name__}")
        conv = []
        for k, msg in enumerate(value):
            if not isinstance(msg, Mapping):
                raise _RowError(m.messages, f"message {k} is {type(msg).__name__}, not an object")
            if m.role_key not in msg or m.content_key not in msg:
                raise _RowError(m.messages, f"message {k} lacks {m.role_key!r} or "
                                            f"{m.content_key!r} (keys: {sorted(msg)}); set "
                                            f"role_key / content_key")
            raw_role = str(msg[m.role_key])
            role = m.roles.get(raw_role) or (raw_role if raw_role in ROLES
                                             else ROLE_ALIASES.get(raw_role.lower()))
            if role is None:
                raise _RowError(f"{m.messages}[{k}].{m.role_key}",
                                f"unknown role {raw_role!r}; map it with roles (e.g. --role "
                                f"{raw_role}=user)")
            content = msg[m.content_key]
            if not isinstance(content, str):
                raise _RowError(f"{m.messages}[{k}].{m.content_key}",
                                f"expected a string, got {type(content).__name__}")
            conv.append({"role": role, "content": content})
    else:
        assert m.prompt is not None
        value = _json_value(row.get(m.prompt))
        turns = value if isinstance(value, list) else [value]
        if not turns:
            raise _RowError(m.prompt, "the prompt has no turns")
        conv = []
        if m.system is not None and row.get(m.system) not in (None, ""):
            conv.append({"role": "system", "content": _text(row.get(m.system), m.system,
                                                            "a system prompt")})
        for k, turn in enumerate(turns):
            conv.append({"role": "user", "content": _text(turn, m.prompt,
                                                          "the prompt" if len(turns) == 1
                                                          else f"user turn {k}")})
        if kind == "pool":
            if len(turns) > 1:
                raise _RowError(m.prompt, f"{len(turns)} user turns with no assistant replies "
                                          f"between them; give multi-turn pools as a messages "
                                          f"column")
            assert m.response is not None  # import_files checks the mapping first
            conv.append({"role": "assistant", "content": _text(row.get(m.response), m.response,
                                                               "the response")})
    dropped = 0
    if kind == "pool":
        if conv[-1]["role"] != "assistant":
            raise _RowError(m.messages or m.response, "a pool row must end with the assistant "
                                                      f"reply being scored; this one ends with a "
                                                      f"{conv[-1]['role']!r} message")
        if not any(x["role"] == "user" for x in conv):
            raise _RowError(m.messages, "the conversation has no user message")
    else:
        kept = []
        for k, x in enumerate(conv):
            if x["role"] == "assistant":
                dropped += 1
            elif x["role"] == "system" and kept:
                raise _RowError(m.messages, f"message {k} is a system message after the first "
                                            f"turn; eval sets allow one leading system prompt")
            else:
                kept.append(x)
        conv = kept
        if not any(x["role"] == "user" for x in conv):
            raise _RowError(m.messages or m.prompt, "the conversation has no user message")
    return conv, dropped


def _atoms_json(value: Any, column: str) -> str | None:
    value = _json_value(value)
    if value is None or value == "":
        return None
    if not isinstance(value, Mapping):
        raise _RowError(column, f"expected an object of atoms (or JSON text of one), got "
                                f"{type(value).__name__}")
    return json.dumps(_plain(value), ensure_ascii=False, sort_keys=True)


def _ifeval_atoms(row: Mapping[str, Any], m: ColumnMapping) -> str:
    assert m.instruction_id_list is not None and m.kwargs is not None
    ids = _json_value(_plain(row.get(m.instruction_id_list)))
    kwargs = _json_value(_plain(row.get(m.kwargs)))
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise _RowError(m.instruction_id_list, "expected a list of instruction ids (strings)")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise _RowError(m.kwargs, f"expected a list of {len(ids)} argument objects, one per "
                                  f"instruction id")
    kwargs = [{} if k is None else k for k in kwargs]
    if not all(isinstance(k, dict) for k in kwargs):
        raise _RowError(m.kwargs, "each instruction's arguments must be an object")
    return json.dumps({"instruction_id_list": ids, "kwargs": kwargs}, ensure_ascii=False,
                      sort_keys=True)


def _scalar_id(value: Any, column: str) -> str:
    if value is None or value == "":
        raise _RowError(column, "missing value")
    if isinstance(value, (dict, list)):
        raise _RowError(column, f"expected an id (a string or number), got {type(value).__name__}")
    return str(value)


# ---- the import ------------------------------------------------------------------------------


@dataclass
class ImportReport:
    out: Path
    provenance_file: Path
    kind: str
    objective: str
    rows_read: int
    rows_written: int
    duplicates: int
    bad_rows: list[BadRow]
    rejects_file: Path | None
    assistant_messages_dropped: int
    per_file: dict[str, dict[str, int]]


def provenance_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.provenance.json")


def rejects_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.rejected.jsonl")


def import_files(sources: Sequence[str | Path], out: str | Path, *, kind: Literal["pool", "eval"],
                 objective: str, mapping: ColumnMapping, license: str,
                 objective_type: str | None = None, split: str | None = None,
                 skip_bad_rows: bool = False) -> ImportReport:
    """Convert `sources` into one pool or eval file at `out` (see the module doc). Raises
    ImportRowsError listing every bad row (nothing written) unless `skip_bad_rows`, which writes
    the good rows and lists the bad ones in `<stem>.rejected.jsonl`."""
    out = Path(out)
    if out.suffix.lower() not in PARQUET_SUFFIXES + JSONL_SUFFIXES:
        raise DataFormatError(out, f"the output must be Parquet ({', '.join(PARQUET_SUFFIXES)}) or "
                                   f"JSONL ({', '.join(JSONL_SUFFIXES)})")
    if not license or not license.strip():
        raise ValueError("give the licence of the data (--license, e.g. 'CC-BY-4.0', 'MIT', "
                         "'proprietary'): every imported row records it")
    if kind == "pool" and mapping.prompt is not None and mapping.response is None:
        raise DataFormatError("the column mapping", "pools need the reply being scored: map "
                                                    "--response (or give a messages column)")
    if kind == "eval" and (mapping.response or mapping.l3_response):
        raise DataFormatError("the column mapping", "eval sets hold the user turns only (the "
                                                    "model answers them): drop response / "
                                                    "l3_response")
    if objective_type is not None:
        from mosaic.eval.base import get_objective_type

        otype = get_objective_type(objective_type)
        if otype.prompt_atoms_from_data and mapping.instruction_id_list is None \
                and mapping.l3_prompt is None:
            raise DataFormatError("the column mapping", f"{objective_type!r} rows carry their "
                                  f"constraints: map --instruction-ids and --kwargs (or "
                                  f"--l3-prompt)")

    bad: list[BadRow] = []
    records: list[dict[str, Any]] = []
    seen: dict[str, tuple[str, int]] = {}
    duplicates: list[dict[str, Any]] = []
    per_file: dict[str, dict[str, int]] = {}
    dropped_assistant = 0
    rows_read = 0
    for src_path in sources:
        src = read_source(src_path, split)
        name = str(src.path)
        stats = per_file.setdefault(name, {"read": 0, "written": 0, "duplicates": 0, "bad": 0})
        missing = [c for c in mapping.columns() if c not in src.columns]
        if missing:
            bad.append(BadRow(name, None, None, f"column(s) {missing} not found; the file has "
                                                f"{sorted(src.columns)}"))
            stats["bad"] += 1
            continue
        bad_before = len(bad)
        bad.extend(src.bad)
        stats["read"] = len(src.rows)
        rows_read += len(src.rows)
        for i, row in enumerate(src.rows):
            if row is None:
                continue  # already reported by the reader
            try:
                conv, dropped = _conversation(row, mapping, kind)
                record = _record(row, i, name, conv, mapping, kind, objective, license)
            except _RowError as e:
                bad.append(BadRow(name, i, e.column, e.message, src.lines[i]))
                continue
            key = _hash([[x["role"], normalise(x["content"])] for x in conv])
            if key in seen:
                first = seen[key]
                duplicates.append({"file": name, "row": i, "duplicate_of": {"file": first[0],
                                                                            "row": first[1]}})
                stats["duplicates"] += 1
                continue
            seen[key] = (name, i)
            dropped_assistant += dropped
            record["_where"] = (name, i, src.lines[i])
            records.append(record)
        stats["bad"] += len(bad) - bad_before
    if bad and (not skip_bad_rows or any(b.row is None for b in bad)):
        raise ImportRowsError(bad, rows_read)
    if not records:
        raise ImportRowsError([BadRow(", ".join(map(str, sources)), None, None,
                                      "no rows to write")], rows_read)
    ids: dict[str, int] = {}
    for j, r in enumerate(records):
        if r["id"] in ids:
            name, i, line = r["_where"]
            first = records[ids[r["id"]]]["_where"]
            bad.append(BadRow(name, i, mapping.id, f"id {r['id']!r} already used by "
                                                   f"{first[0]}, row {first[1]}", line))
        ids.setdefault(r["id"], j)
    if len(ids) != len(records):
        raise ImportRowsError(bad, rows_read)

    table = _table(records, kind)
    try:
        table = validate_table(out, table, kind, objective_type, objective)
    except DataFormatError as e:
        if e.row is None:
            raise
        name, i, line = records[e.row]["_where"]
        raise ImportRowsError([BadRow(name, i, e.field, e.message, line)], rows_read) from None
    for r in records:
        per_file[r["_where"][0]]["written"] += 1
    rejects = rejects_path(out)
    write_table(out, table)
    if bad:
        from mosaic.io import atomic_write_text

        atomic_write_text(rejects, "".join(json.dumps(b.as_dict(), ensure_ascii=False) + "\n"
                                           for b in bad))
    else:
        rejects.unlink(missing_ok=True)
    from mosaic.markers import file_sha256

    prov = provenance_path(out)
    atomic_write_json(prov, {
        "import_version": IMPORT_VERSION, "kind": kind, "objective": objective,
        "objective_type": objective_type, "license": license, "split": split,
        "mapping": mapping.model_dump(exclude_defaults=True),
        "sources": [{"file": str(Path(s)), "sha256": file_sha256(s) if Path(s).is_file() else None,
                     **per_file.get(str(Path(s)), {})} for s in sources],
        "rows_read": rows_read, "rows_written": len(records), "duplicates": len(duplicates),
        "duplicate_rows": duplicates[:1000], "bad_rows": len(bad),
        "assistant_messages_dropped": dropped_assistant,
        "output": {"file": str(out), "sha256": file_sha256(out)}})
    return ImportReport(out=out, provenance_file=prov, kind=kind, objective=objective,
                        rows_read=rows_read, rows_written=len(records),
                        duplicates=len(duplicates), bad_rows=bad,
                        rejects_file=rejects if bad else None,
                        assistant_messages_dropped=dropped_assistant, per_file=per_file)


def _record(row: Mapping[str, Any], i: int, file: str, conv: list[dict[str, str]],
            m: ColumnMapping, kind: str, objective: str, license: str) -> dict[str, Any]:
    exact = [[x["role"], x["content"]] for x in conv]
    rec: dict[str, Any] = {
        "id": _scalar_id(row.get(m.id), m.id) if m.id else f"{objective}-{_hash(exact)}",
        "objective": objective, "messages": conv,
    }
    if kind == "pool":
        prompt = exact[:-1]
        rec["prompt_id"] = (_scalar_id(row.get(m.prompt_id), m.prompt_id) if m.prompt_id
                            else f"{objective}-p{_hash(prompt)}")
    if m.instruction_id_list is not None:
        rec["l3_prompt"] = _ifeval_atoms(row, m)
    elif m.l3_prompt is not None:
        rec["l3_prompt"] = _atoms_json(row.get(m.l3_prompt), m.l3_prompt)
    if m.l3_response is not None:
        rec["l3_response"] = _atoms_json(row.get(m.l3_response), m.l3_response)
    meta: dict[str, Any] = {"source": {"file": file, "row": i, "license": license}}
    if m.metadata:
        meta["columns"] = {c: _plain(row.get(c)) for c in m.metadata}
    rec["metadata"] = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    return rec


def _table(records: list[dict[str, Any]], kind: str) -> pa.Table:
    cols: dict[str, pa.Array] = {
        "id": pa.array([r["id"] for r in records], pa.string()),
    }
    if kind == "pool":
        cols["prompt_id"] = pa.array([r["prompt_id"] for r in records], pa.string())
    cols["objective"] = pa.array([r["objective"] for r in records], pa.string())
    cols["messages"] = pa.array([r["messages"] for r in records], MESSAGE_TYPE)
    for name in ("l3_prompt", "l3_response"):
        if any(r.get(name) is not None for r in records):
            cols[name] = pa.array([r.get(name) for r in records], pa.string())
    cols["metadata"] = pa.array([r["metadata"] for r in records], pa.string())
    return pa.table(cols)
