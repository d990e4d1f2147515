"""Training pools and eval sets on disk (docs/data-format.md): validated loaders, atomic writers.

Files are read with pyarrow and checked column-wise, once, at load; a malformed file raises a
`DataFormatError` naming the file, the row (and for JSONL the line) and the field. Nested columns
(`messages`, list-valued L2 columns) stay Arrow-backed in the returned DataFrame, so a pool of
millions of rows is not unpacked into Python objects unless a caller asks for the values.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from mosaic.io import atomic_write_with
from mosaic.schemas import Role

if TYPE_CHECKING:
    from mosaic.eval.base import ObjectiveType

ROLES: tuple[str, ...] = get_args(Role)  # the one list of roles (mosaic.schemas.Role)
JSON_COLUMNS = ("l3_prompt", "l3_response", "metadata")
L1_COLUMNS = ("slice", "score", "valid", "weight", "failure")
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# The Arrow type of a conversation in every file MOSAIC reads or writes.
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_STRING_COLUMNS = ("id", "prompt_id", "objective", "slice", *JSON_COLUMNS)

Kind = Literal["pool", "eval"]


class DataFormatError(ValueError):
    """A data file does not match docs/data-format.md; says which file, row and field."""

    def __init__(self, path: str | Path, message: str, *, row: int | None = None,
                 field: str | None = None, line: int | None = None) -> None:
        self.path, self.row, self.field, self.line = str(path), row, field, line
        self.message = message
        where = str(path)
        if row is not None:
            where += f", row {row}" + (f" (line {line})" if line is not None else "")
        elif line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


# ---- reading ---------------------------------------------------------------------------------


def _jsonl_line_of(path: Path, row: int) -> int | None:
    """1-based line of the `row`-th non-blank line (only computed when reporting an error)."""
    seen = -1
    with path.open("rb") as f:
        for line_no, text in enumerate(f, start=1):
            if text.strip():
                seen += 1
                if seen == row:
                    return line_no
    return None


def _decoded_lines(path: Path):
    """(1-based line number, text) of a JSONL file; a line that is not UTF-8 is a
    DataFormatError naming the file and line, not a UnicodeDecodeError traceback."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, f"not UTF-8 text (invalid byte at column {e.start + 1}); "
                                            f"JSONL files are UTF-8", line=line_no) from None
            yield line_no, text


def _first_keys(path: Path) -> list[str]:
    for _, text in _decoded_lines(path):
        if text.strip():
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                return []
            return list(obj) if isinstance(obj, dict) else []
    return []


def _read_jsonl_fast(path: Path) -> pa.Table | None:
    """pyarrow's JSON reader with the documented column types pinned (it would otherwise turn an
    id like "2024-01-01" into a timestamp). None when the file needs the precise slow path."""
    keys = _first_keys(path)
    pinned = [pa.field(k, pa.string()) for k in _STRING_COLUMNS if k in keys]
    if "messages" in keys:
        pinned.append(pa.field("messages", MESSAGE_TYPE))
    options = pj.ParseOptions(explicit_schema=pa.schema(pinned), unexpected_field_behavior="infer")
    try:
        table = pj.read_json(str(path), read_options=pj.ReadOptions(block_size=1 << 26),
                             parse_options=options)
        # pyarrow's JSON reader copies invalid UTF-8 into string columns unchecked; a full
        # validation finds it, and the slow path then names the line.
        table.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    # A column absent from the first row would otherwise be silently pinned to all-null.
    if sorted(table.column_names) != sorted(keys):
        return None
    return table.select(keys)


_PY_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "id": ((str,), "a string"),
    "prompt_id": ((str,), "a string"),
    "objective": ((str,), "a string"),
    "slice": ((str,), "a string"),
    "score": ((int, float), "a number"),
    "weight": ((int, float), "a number"),
    "valid": ((bool,), "true or false"),
    "failure": ((bool,), "true or false"),
}


def message_problem(value: Any) -> str | None:
    """What is wrong with one conversation value ({role, content} objects), or None."""
    if not isinstance(value, list):
        return f"expected a list of {{role, content}} objects, got {type(value).__name__}"
    for k, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            return f"message {k} must be an object with exactly role and content, got {m!r}"[:300]
        if m["role"] not in ROLES:
            return f"message {k} has unknown role {m['role']!r}; expected one of {list(ROLES)}"
        if not isinstance(m["content"], str):
            return f"message {k} content must be a string, got {type(m['content']).__name__}"
    return None


def _read_jsonl_slow(path: Path) -> pa.Table:
    """Line by line: exact line numbers for every error, and JSON-valued columns given as
    objects (not strings) are accepted and re-serialised."""
    columns: dict[str, list[Any]] = {}
    lines: list[int] = []
    for line_no, text in _decoded_lines(path):
        if not text.strip():
            continue
        row = len(lines)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"not valid JSON: {e.msg} (column {e.colno})",
                                  row=row, line=line_no) from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, f"expected a JSON object per line, got "
                                        f"{type(obj).__name__}", row=row, line=line_no)
        for key in obj:
            if key not in columns:
                columns[key] = [None] * row
        for key, values in columns.items():
            value = obj.get(key)
            if value is not None:
                if key in JSON_COLUMNS:
                    if isinstance(value, dict):
                        value = json.dumps(value, ensure_ascii=False)
                    elif not isinstance(value, str):
                        raise DataFormatError(path, "expected a JSON object (or a string "
                                                    f"holding one), got {type(value).__name__}",
                                              row=row, line=line_no, field=key)
                elif key == "messages":
                    problem = message_problem(value)
                    if problem:
                        raise DataFormatError(path, problem, row=row, line=line_no, field=key)
                elif key in _PY_TYPES:
                    types, expected = _PY_TYPES[key]
                    if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                        raise DataFormatError(path, f"expected {expected}, got {value!r}",
                                              row=row, line=line_no, field=key)
            values.append(value)
        lines.append(line_no)
    if not lines:
        raise DataFormatError(path, "no rows")
    arrays = {}
    for key, values in columns.items():
        try:
            if key == "messages":
                arrays[key] = pa.array(values)  # validated structurally later, with row numbers
            elif key in _STRING_COLUMNS:
                arrays[key] = pa.array(values, type=pa.string())
            else:
                arrays[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            first = type(next((v for v in values if v is not None), None)).__name__
            bad = next((i for i, v in enumerate(values)
                        if v is not None and type(v).__name__ != first), None)
            raise DataFormatError(path, f"values of mixed types (first {first}): {e}",
                                  row=bad, field=key,
                                  line=lines[bad] if bad is not None else None) from None
    return pa.table(arrays)


def read_table(path: str | Path) -> pa.Table:
    """A parquet or JSONL file as an Arrow table, unvalidated (see `load_pool`/`load_eval_set`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataFormatError(path, f"not a readable parquet file: {e}") from None
        try:
            table.validate(full=True)  # e.g. invalid UTF-8 in a string column
        except pa.ArrowInvalid as e:
            raise DataFormatError(path, f"invalid data in the parquet file: {e}") from None
        return table
    if suffix in JSONL_SUFFIXES:
        table = _read_jsonl_fast(path)
        return table if table is not None else _read_jsonl_slow(path)
    raise DataFormatError(path, f"unsupported file type {suffix!r}; use "
                                f"{', '.join(PARQUET_SUFFIXES + JSONL_SUFFIXES)}")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a parquet or JSONL file as dicts (training sets, the base corpus): conversation
    columns are checked per row by their readers (`message_problem`)."""
    return read_table(path).to_pylist()


# ---- validation ------------------------------------------------------------------------------


class _Checker:
    """Column-wise checks of one table; errors carry file, row (and JSONL line) and field."""

    def __init__(self, path: Path, table: pa.Table) -> None:
        # One contiguous chunk per column up front, instead of re-combining for every check.
        self.path, self.table = path, table.combine_chunks()
        self.is_jsonl = path.suffix.lower() in JSONL_SUFFIXES

    def fail(self, message: str, *, row: int | None = None, field: str | None = None) -> DataFormatError:
        line = _jsonl_line_of(self.path, row) if (self.is_jsonl and row is not None) else None
        return DataFormatError(self.path, message, row=row, field=field, line=line)

    def column(self, name: str) -> pa.Array:
        col = self.table[name]
        if col.num_chunks == 1:
            return col.chunk(0)
        return col.combine_chunks()

    def first(self, mask: np.ndarray | pa.Array) -> int:
        if isinstance(mask, pa.Array):
            mask = pc.fill_null(mask, False)
        arr = mask.to_numpy(zero_copy_only=False) if isinstance(mask, pa.Array) else mask
        return int(np.flatnonzero(arr)[0])

    def require(self, names: Sequence[str], why: str) -> None:
        missing = [n for n in names if n not in self.table.column_names]
        if missing:
            raise self.fail(f"missing column(s) {missing} ({why}); columns present: "
                            f"{self.table.column_names}")

    def string(self, name: str, *, nullable: bool) -> None:
        col = self.column(name)
        if pa.types.is_null(col.type):
            col = pa.nulls(len(col), pa.string())
        elif pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type):
            col = col.cast(pa.string())
        elif not pa.types.is_string(col.type):
            row = self.first(col.is_valid()) if col.null_count < len(col) else None
            got = col[row].as_py() if row is not None else None
            raise self.fail(f"expected string values, the column holds {col.type} (e.g. {got!r})",
                            row=row, field=name)
        if not nullable and col.null_count:
            raise self.fail("missing value", row=self.first(col.is_null()), field=name)
        self.replace(name, col)

    def number(self, name: str, lo: float, hi: float) -> None:
        col = self.column(name)
        if pa.types.is_null(col.type):
            col = pa.nulls(len(col), pa.float64())
        elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            col = col.cast(pa.float64())
        else:
            raise self.fail(f"expected numbers, the column holds {col.type}", field=name,
                            row=self.first(col.is_valid()) if col.null_count < len(col) else None)
        values = col.to_numpy(zero_copy_only=False)  # nulls (unscored rows) become NaN here
        present = col.is_valid().to_numpy(zero_copy_only=False)
        # A NaN or infinite value is not a missing one: it would pass every range check
        # silently (NaN compares false) and poison sums downstream.
        nonfinite = present & ~np.isfinite(values)
        if nonfinite.any():
            row = self.first(nonfinite)
            raise self.fail(f"expected a finite number in [{lo:g}, {hi:g}] (or null for an "
                             f"unscored row), got {float(values[row])!r}", row=row, field=name)
        bad = present & ~((values >= lo) & (values <= hi))
        if bad.any():
            row = self.first(bad)
            raise self.fail(f"expected a number in [{lo:g}, {hi:g}], got {float(values[row]):g}",
                            row=row, field=name)
        self.replace(name, col)

    def boolean(self, name: str) -> None:
        col = self.column(name)
        if pa.types.is_null(col.type):
            col = pa.nulls(len(col), pa.bool_())
        elif not pa.types.is_boolean(col.type):
            raise self.fail(f"expected true/false values, the column holds {col.type}", field=name,
                            row=self.first(col.is_valid()) if col.null_count < len(col) else None)
        self.replace(name, col)

    def replace(self, name: str, col: pa.Array) -> None:
        i = self.table.column_names.index(name)
        self.table = self.table.set_column(i, name, col)

    def unique(self, name: str) -> None:
        dup = self.table[name].to_pandas().duplicated().to_numpy()
        if dup.any():
            row = self.first(dup)
            value = self.table[name][row].as_py()
            earlier = self.first(self.table[name].to_pandas().eq(value).to_numpy())
            raise self.fail(f"{value!r} already used by row {earlier}", row=row, field=name)

    def messages(self, kind: Kind) -> None:
        col = self.column("messages")
        typ = col.type
        is_list = pa.types.is_list(typ) or pa.types.is_large_list(typ)
        if not is_list or not pa.types.is_struct(typ.value_type):
            raise self.fail(f"expected a list of {{role, content}} objects per row, the column "
                            f"holds {typ}", field="messages")
        fields = {typ.value_type.field(i).name for i in range(typ.value_type.num_fields)}
        if fields != {"role", "content"}:
            extra, missing = sorted(fields - {"role", "content"}), sorted({"role", "content"} - fields)
            raise self.fail(f"each message must be exactly {{role, content}}; "
                            f"missing {missing}, unexpected {extra}", field="messages")
        if col.null_count:
            raise self.fail("missing conversation", row=self.first(col.is_null()), field="messages")
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if (lengths == 0).any():
            raise self.fail("empty conversation", row=self.first(lengths == 0), field="messages")
        parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
        # StructArray.flatten (unlike .field) honours the struct's own offset and null bitmap.
        flat = col.flatten()
        parts = dict(zip([typ.value_type.field(i).name for i in range(2)], flat.flatten()))
        for part in ("role", "content"):
            values = parts[part]
            if pa.types.is_large_string(values.type) or pa.types.is_null(values.type):
                values = values.cast(pa.string())
            if not pa.types.is_string(values.type):
                raise self.fail(f"message {part} must be a string, the column holds {values.type}",
                                field=f"messages.{part}")
            if values.null_count:
                j = self.first(values.is_null())
                raise self.fail(f"message {j - self._start(parents, j)} has no {part}",
                                row=int(parents[j]), field=f"messages.{part}")
            parts[part] = values
        role = parts["role"]

        def is_role(name: str) -> np.ndarray:
            return pc.equal(role, name).to_numpy(zero_copy_only=False)

        bad = ~pc.is_in(role, value_set=pa.array(ROLES)).to_numpy(zero_copy_only=False)
        if bad.any():
            j = self.first(bad)
            raise self.fail(f"message {j - self._start(parents, j)} has unknown role "
                            f"{role[j].as_py()!r}; expected one of {list(ROLES)}",
                            row=int(parents[j]), field="messages.role")
        n = len(col)
        users = np.bincount(parents, weights=is_role("user"), minlength=n)
        if (users == 0).any():
            raise self.fail("the conversation has no user message", row=self.first(users == 0),
                            field="messages")
        assistant = is_role("assistant")
        if kind == "pool":
            last = np.cumsum(lengths) - 1
            not_assistant = ~assistant[last]
            if not_assistant.any():
                row = self.first(not_assistant)
                raise self.fail("a pool row must end with the assistant response being scored; "
                                f"this one ends with a {role[int(last[row])].as_py()!r} message",
                                row=row, field="messages")
        elif assistant.any():
            j = self.first(assistant)
            raise self.fail("eval sets hold the user turns only (the model answers each); "
                            f"message {j - self._start(parents, j)} is an assistant message",
                            row=int(parents[j]), field="messages")
        if typ.value_type != MESSAGE_TYPE.value_type:
            # Field order or large types differ: rebuild in the documented layout.
            fixed = pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                pa.StructArray.from_arrays([parts["role"], parts["content"]],
                                           names=["role", "content"]))
            self.replace("messages", fixed)

    @staticmethod
    def _start(parents: np.ndarray, j: int) -> int:
        return int(np.searchsorted(parents, parents[j]))

    def json_objects(self, name: str, required: Sequence[str], owner: str) -> None:
        """Every non-null value must be a JSON object holding the `required` keys (non-null).

        Only distinct values are parsed: atoms repeat a lot, so a pool of millions of rows
        holds a few thousand distinct L3 strings."""
        col = self.column(name)
        if col.null_count == len(col):
            return
        texts = pc.unique(col.drop_null()).to_pylist()
        need = f"{owner} needs {list(required)}"
        problems: dict[str, tuple[str, str]] = {}  # text -> (field, message)
        parsed = _parse_objects_fast(texts)
        if parsed is not None:
            for key in required:
                if key in parsed.column_names:
                    missing = parsed[key].is_null().to_numpy(zero_copy_only=False)
                else:
                    missing = np.ones(len(texts), dtype=bool)
                for j in np.flatnonzero(missing):
                    problems.setdefault(texts[j], (f"{name}.{key}", f"missing atom {key!r} ({need})"))
        else:
            for text in texts:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    problems[text] = (name, f"not valid JSON: {e.msg} (column {e.colno})")
                    continue
                if not isinstance(obj, dict):
                    problems[text] = (name, f"expected a JSON object, got {type(obj).__name__}")
                    continue
                key = next((k for k in required if obj.get(k) is None), None)
                if key is not None:
                    problems[text] = (f"{name}.{key}", f"missing atom {key!r} ({need})")
        if problems:
            row = self.first(pc.is_in(col, value_set=pa.array(list(problems), pa.string())))
            field, message = problems[col[row].as_py()]
            raise self.fail(message, row=row, field=field)


def _parse_objects_fast(texts: list[str]) -> pa.Table | None:
    """All values parsed in one pyarrow pass; None if any value needs the per-row path (invalid
    JSON, not an object, a value spread over lines, or types pyarrow cannot unify)."""
    if any("\n" in t or not t.strip() for t in texts):
        return None
    try:
        table = pj.read_json(io.BytesIO("\n".join(texts).encode("utf-8")),
                             read_options=pj.ReadOptions(block_size=1 << 26))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return table if table.num_rows == len(texts) else None


def _validate(path: Path, table: pa.Table, kind: Kind, otype: ObjectiveType | None,
              objective: str | None) -> pa.Table:
    c = _Checker(path, table)
    if table.num_rows == 0:
        raise c.fail("no rows")
    c.require(["id", "messages"], "see docs/data-format.md")
    names = table.column_names
    n = table.num_rows
    if kind == "pool" and "prompt_id" not in names:
        # Without it every row is its own prompt (no DPO pairs can be formed).
        c.table = c.table.append_column("prompt_id", c.table["id"])
    if "objective" not in c.table.column_names:
        c.table = c.table.append_column("objective", pa.array([objective or path.stem] * n, pa.string()))
    if "metadata" not in c.table.column_names:
        c.table = c.table.append_column("metadata", pa.array(["{}"] * n, pa.string()))
    for name in ("id", "prompt_id", "objective"):
        if name in c.table.column_names:
            c.string(name, nullable=False)
    c.unique("id")
    c.messages(kind)
    owner = f"objective type {otype.type_name!r}" if otype else ""
    for name in JSON_COLUMNS:
        if name in c.table.column_names:
            c.string(name, nullable=True)
            required: Sequence[str] = ()
            if otype is not None and name == "l3_prompt":
                required = otype.prompt_atoms
            elif otype is not None and name == "l3_response":
                required = otype.response_atoms
            c.json_objects(name, required, owner)
    # Eval sets are scored afresh each round, so any L1 columns they carry are not read.
    present = [x for x in L1_COLUMNS if x in c.table.column_names]
    if present and kind == "pool":
        c.require(L1_COLUMNS, "L1 columns come together")
        c.string("slice", nullable=True)
        c.number("score", 1, 5)
        c.number("weight", 0, math.inf)
        c.boolean("valid")
        c.boolean("failure")
        scored = c.column("score").is_valid().to_numpy(zero_copy_only=False)
        for name in ("slice", "valid", "weight", "failure"):
            hole = scored & c.column(name).is_null().to_numpy(zero_copy_only=False)
            if hole.any():
                raise c.fail("missing value in a scored row (L1 fields come together)",
                             row=c.first(hole), field=name)
        if otype is not None:
            slices = c.column("slice").to_numpy(zero_copy_only=False)
            bad = scored & ~np.isin(slices.astype(object), list(otype.slices))
            if bad.any():
                row = c.first(bad)
                raise c.fail(f"unknown slice {slices[row]!r}; {owner} has {list(otype.slices)}",
                             row=row, field="slice")
    if otype is not None and kind == "pool":
        l2_cols = [f"l2_{f}" for f in otype.l2_columns]
        got = [x for x in l2_cols if x in c.table.column_names]
        if got and len(got) != len(l2_cols):
            raise c.fail(f"L2 columns come together; missing {sorted(set(l2_cols) - set(got))}")
    return c.table


def _nested_as_arrow(t: pa.DataType) -> pd.ArrowDtype | None:
    # Nested cells stay in Arrow memory; pandas would otherwise build a dict per message.
    return pd.ArrowDtype(t) if pa.types.is_nested(t) else None


def _to_frame(table: pa.Table, path: Path) -> pd.DataFrame:
    df = _normalise(table).to_pandas(types_mapper=_nested_as_arrow)
    df.attrs["source"] = str(path)
    return df


def load_pool_table(path: str | Path, objective_type_name: str | None,
                    objective: str | None = None) -> pa.Table:
    """`load_pool` without the pandas conversion, for column-wise consumers (dataset building)."""
    path = Path(path)
    return _normalise(_validate(path, read_table(path), "pool", _otype(objective_type_name), objective))


def load_pool(path: str | Path, objective_type_name: str | None,
              objective: str | None = None) -> pd.DataFrame:
    """A training pool, validated. `objective` fills a missing `objective` column (default: the
    file's stem). Pools without L3/L1/L2 columns load; see `needs_annotation` and
    `mosaic.eval.annotate`."""
    path = Path(path)
    return _to_frame(load_pool_table(path, objective_type_name, objective), path)


def load_eval_set(path: str | Path, objective_type_name: str | None = None,
                  objective: str | None = None) -> pd.DataFrame:
    """An eval or held-out set (user turns only), validated."""
    path = Path(path)
    otype = _otype(objective_type_name)
    return _to_frame(_validate(path, read_table(path), "eval", otype, objective), path)


def _otype(name: str | ObjectiveType | None) -> ObjectiveType | None:
    if name is None or not isinstance(name, str):
        return name
    from mosaic.eval.base import get_objective_type

    return get_objective_type(name)


def json_column(df: pd.DataFrame, column: str) -> list[dict[str, Any] | None]:
    """Parse a JSON-string column (validated at load) into dicts, None where absent."""
    if column not in df.columns:
        return [None] * len(df)
    return [json.loads(v) if isinstance(v, str) else None for v in df[column].tolist()]


def describe(df: pd.DataFrame, objective_type: str | ObjectiveType | None = None) -> dict[str, Any]:
    """What a person checks first about a loaded file: rows, prompts, annotation, slices, scores."""
    out: dict[str, Any] = {
        "rows": len(df),
        "prompts": int(df["prompt_id"].nunique()) if "prompt_id" in df.columns else None,
        "rows_needing_annotation": int(rows_needing_annotation(df, objective_type).sum()),
    }
    if "score" in df.columns and "slice" in df.columns:
        scored = df[df["score"].notna()]
        out["slices"] = {str(k): int(v) for k, v in scored["slice"].value_counts().sort_index().items()}
        out["score_distribution"] = {f"{k:g}": int(v) for k, v
                                     in scored["score"].value_counts().sort_index().items()}
        valid = scored[scored["valid"].astype(bool)]
        out["valid_rows"] = len(valid)
        out["mean_score_valid"] = float(valid["score"].mean()) if len(valid) else None
    return out


# ---- writing ---------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def validate_table(path: str | Path, table: pa.Table, kind: Kind,
                   objective_type: str | ObjectiveType | None = None,
                   objective: str | None = None) -> pa.Table:
    """Check an in-memory table as `load_pool`/`load_eval_set` check a file (errors name `path`,
    the row and the field) and return it with the documented defaults filled in."""
    return _normalise(_validate(Path(path), table, kind, _otype(objective_type), objective))


def _normalise(table: pa.Table) -> pa.Table:
    """Give all-empty list columns a string item type, so pools written in pieces share a schema."""
    for i, field in enumerate(table.schema):
        if pa.types.is_list(field.type) and pa.types.is_null(field.type.value_type):
            table = table.set_column(i, field.name, table[field.name].cast(pa.list_(pa.string())))
        elif pa.types.is_large_string(field.type):
            table = table.set_column(i, field.name, table[field.name].cast(pa.string()))
    return table.replace_schema_metadata(None)


def write_table(path: str | Path, data: pd.DataFrame | pa.Table) -> None:
    """Atomically write a frame as parquet or JSONL, chosen by the file's suffix."""
    path = Path(path)
    table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    table = _normalise(table)
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        atomic_write_with(path, lambda tmp: pq.write_table(table, tmp))
    elif suffix in JSONL_SUFFIXES:
        def write_jsonl(tmp: Path) -> None:
            with tmp.open("w", encoding="utf-8") as f:
                for batch in table.to_batches(max_chunksize=10_000):
                    for row in batch.to_pylist():
                        f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")

        atomic_write_with(path, write_jsonl)
    else:
        raise ValueError(f"cannot write {path}: unsupported suffix {suffix!r}; use "
                         f"{', '.join(PARQUET_SUFFIXES + JSONL_SUFFIXES)}")


# ---- annotation ------------------------------------------------------------------------------


def _annotation_columns(otype: ObjectiveType | None) -> list[str]:
    cols = ["l3_prompt", "l3_response", *L1_COLUMNS]
    if otype is not None:
        cols += [f"l2_{f}" for f in otype.l2_columns]
    return cols


def rows_needing_annotation(df: pd.DataFrame,
                            objective_type: str | ObjectiveType | None = None) -> np.ndarray:
    """Rows lacking any of L3 (both channels), L1 or (with a type) the L2 columns."""
    otype = _otype(objective_type)
    mask = np.zeros(len(df), dtype=bool)
    cols = _annotation_columns(otype)
    if otype is None and not any(c.startswith("l2_") for c in df.columns):
        return ~mask  # no L2 at all: focus filters would have nothing to read
    for col in cols:
        if col not in df.columns:
            return ~mask
        mask |= df[col].isna().to_numpy(dtype=bool)
    return mask


def needs_annotation(df: pd.DataFrame, objective_type: str | ObjectiveType | None = None) -> bool:
    """True if a judge (and the objective type's formulas) must fill some rows first."""
    return bool(rows_needing_annotation(df, objective_type).any())
