"""IFEval-format prompt files (JSONL: prompt, instruction_id_list, kwargs) and checker coverage."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mosaic.eval.ifeval_checker import SUPPORTED_IDS, KwargsError, resolve_args


class IFEvalDataError(ValueError):
    """A malformed IFEval-format file; the message names the file, line and field."""


@dataclass(frozen=True)
class IFEvalPrompt:
    id: str | None  # the row's `id` (or IFEval's `key`), as a string; None when it has neither
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]
    line: int  # 1-based line in the source file, for error messages downstream


def _fail(path: Path, line: int, field: str, problem: str) -> IFEvalDataError:
    return IFEvalDataError(f"{path}:{line}: field {field!r}: {problem}")


def _parse_row(path: Path, line: int, row: Any) -> IFEvalPrompt:
    if not isinstance(row, dict):
        raise IFEvalDataError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
    for field in ("prompt", "instruction_id_list", "kwargs"):
        if field not in row:
            raise _fail(path, line, field, "missing")
    if not isinstance(row["prompt"], str):
        raise _fail(path, line, "prompt", f"expected a string, got {type(row['prompt']).__name__}")
    ids = row["instruction_id_list"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _fail(path, line, "instruction_id_list", f"expected a list of strings, got {ids!r}")
    kwargs = row["kwargs"]
    if not isinstance(kwargs, list):
        raise _fail(path, line, "kwargs", f"expected a list of objects, got {kwargs!r}")
    if len(kwargs) != len(ids):
        raise _fail(path, line, "kwargs", f"has {len(kwargs)} entries for {len(ids)} instruction "
                                          "ids; they pair one to one")
    for j, (iid, kw) in enumerate(zip(ids, kwargs)):
        if not isinstance(kw, dict):
            raise _fail(path, line, f"kwargs[{j}]", f"expected an object, got {kw!r}")
        if iid in SUPPORTED_IDS:
            try:
                resolve_args(iid, kw, row["prompt"])
            except KwargsError as e:
                raise _fail(path, line, f"kwargs[{j}].{e.field}",
                            f"{e.problem} (instruction {iid})") from None
    row_id = row.get("id", row.get("key"))
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        raise _fail(path, line, "id", f"expected a string or integer, got {row_id!r}")
    return IFEvalPrompt(id=None if row_id is None else str(row_id), prompt=row["prompt"],
                        instruction_id_list=tuple(ids), kwargs=tuple(kwargs), line=line)


def load_ifeval_prompts(path: str | Path) -> list[IFEvalPrompt]:
    """Read and validate every row; the first problem raises IFEvalDataError (file, line, field).

    Unknown instruction ids are not an error here (the checker reports them as unsupported);
    kwargs of known ids are validated as the checker would read them. Other keys (e.g. an
    IFEval response file's `response`) are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IFEval prompt file not found: {path}")
    prompts: list[IFEvalPrompt] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise IFEvalDataError(f"{path}:{line_no}: not UTF-8 text (invalid byte at "
                                      f"column {e.start + 1}); IFEval files are UTF-8 JSONL") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise IFEvalDataError(f"{path}:{line_no}: not valid JSON: {e.msg} "
                                      f"(column {e.colno})") from None
            prompt = _parse_row(path, line_no, row)
            if prompt.id is not None:
                if prompt.id in seen:
                    raise _fail(path, line_no, "id", f"{prompt.id!r} already used on line "
                                                     f"{seen[prompt.id]}")
                seen[prompt.id] = line_no
            prompts.append(prompt)
    if not prompts:
        raise IFEvalDataError(f"{path}: no rows")
    return prompts


# ---- coverage ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoverageRow:
    instruction_id: str
    count: int
    underspecified: int
    supported: bool

    @property
    def checkable(self) -> int:
        return self.count - self.underspecified if self.supported else 0


@dataclass(frozen=True)
class CoverageReport:
    source: str
    n_prompts: int
    rows: tuple[CoverageRow, ...]  # one per instruction id present, sorted by id
    absent_supported_ids: tuple[str, ...]  # checker ids the file never uses

    @property
    def n_constraints(self) -> int:
        return sum(r.count for r in self.rows)

    @property
    def n_underspecified(self) -> int:
        return sum(r.underspecified for r in self.rows)

    @property
    def n_checkable(self) -> int:
        return sum(r.checkable for r in self.rows)

    @property
    def unsupported_ids(self) -> tuple[str, ...]:
        return tuple(r.instruction_id for r in self.rows if not r.supported)


def coverage(prompts: Iterable[IFEvalPrompt], source: str = "") -> CoverageReport:
    """Per instruction id: how often it occurs, how many occurrences are underspecified, and
    whether the checker supports it. Needs no responses: it only reads the arguments."""
    count: Counter[str] = Counter()
    under: Counter[str] = Counter()
    n = 0
    for p in prompts:
        n += 1
        for iid, kw in zip(p.instruction_id_list, p.kwargs):
            count[iid] += 1
            if iid in SUPPORTED_IDS and not resolve_args(iid, kw, p.prompt).complete:
                under[iid] += 1
    rows = tuple(CoverageRow(iid, count[iid], under[iid], iid in SUPPORTED_IDS)
                 for iid in sorted(count))
    absent = tuple(i for i in SUPPORTED_IDS if i not in count)
    return CoverageReport(source, n, rows, absent)


def file_coverage(path: str | Path) -> CoverageReport:
    return coverage(load_ifeval_prompts(path), source=str(path))
