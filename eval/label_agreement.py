"""How far a judge agrees with a team's own labels, on one atom, before the team trusts it.

The labelled file is JSONL or CSV with `prompt` (the user's request), an optional `response`
(the assistant's reply; needed for a response atom such as `explicit_refusal`) and `label`
(0 or 1: does the atom hold?). The judge labels each row as it would in a run (a prompt atom from
the request alone, a response atom from the request and the reply); rows it could not label are
counted apart, never scored as a miss or a hit. Atoms with more values than 0/1 (e.g.
`rejection_votes`) count as 1 when non-zero.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mosaic.data import JSONL_SUFFIXES, DataFormatError
from mosaic.eval.base import ObjectiveType, get_objective_type, objective_type_names
from mosaic.eval.judge import Judge, JudgeError
from mosaic.eval.rule_judge import AtomAgreement, atom_agreement

Channel = Literal["prompt", "response"]


@dataclass(frozen=True)
class LabelledRow:
    prompt: str
    response: str | None
    label: int


def read_labels(path: str | Path) -> list[LabelledRow]:
    """The rows of a labelled JSONL or CSV file; a bad row names the file, row and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labelled file not found: {path}")
    suffix = path.suffix.lower()
    raw: list[tuple[int, dict]] = []  # (line, row)
    if suffix in JSONL_SUFFIXES:
        with path.open("rb") as f:
            for line_no, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataFormatError(path, f"not a JSON line ({e})", row=len(raw),
                                          line=line_no) from None
                if not isinstance(obj, dict):
                    raise DataFormatError(path, "expected a JSON object per line", row=len(raw),
                                          line=line_no)
                raw.append((line_no, obj))
    elif suffix == ".csv":
        try:
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                line = 2
                for record in reader:
                    raw.append((line, dict(record)))
                    line = reader.line_num + 1
        except UnicodeDecodeError as e:
            raise DataFormatError(path, f"not UTF-8 text (invalid byte at offset {e.start})") from None
    else:
        raise DataFormatError(path, f"expected a .jsonl or .csv file, got {suffix!r}")
    if not raw:
        raise DataFormatError(path, "no rows")
    out = []
    for i, (line, r) in enumerate(raw):
        prompt = r.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataFormatError(path, "expected the user's request (a non-empty string)", row=i,
                                  line=line, field="prompt")
        response = r.get("response")
        if response in ("", None):
            response = None
        elif not isinstance(response, str):
            raise DataFormatError(path, f"expected a string, got {type(response).__name__}",
                                  row=i, line=line, field="response")
        label = r.get("label")
        if isinstance(label, str):
            label = {"0": 0, "1": 1, "true": 1, "false": 0}.get(label.strip().lower(), label)
        if isinstance(label, bool):
            label = int(label)
        if label not in (0, 1) or isinstance(label, float) and not label.is_integer():
            raise DataFormatError(path, f"expected 0 or 1, got {r.get('label')!r}", row=i,
                                  line=line, field="label")
        out.append(LabelledRow(prompt, response, int(label)))
    return out


def atom_types(atom: str) -> list[str]:
    """Objective types that have `atom` (as a prompt or response atom)."""
    out = []
    for name in objective_type_names():
        t = get_objective_type(name)
        if atom in t.prompt_atoms or atom in t.response_atoms:
            out.append(name)
    return out


def atom_channel(objective_type: str, atom: str) -> Channel:
    t = get_objective_type(objective_type)
    if t.prompt_atoms_from_data and atom in t.prompt_atoms:
        raise ValueError(f"{objective_type!r} atom {atom!r} comes from the data, not a judge")
    if atom in t.prompt_atoms:
        return "prompt"
    if atom in t.response_atoms:
        if type(t).code_response_atoms is not ObjectiveType.code_response_atoms:
            raise ValueError(f"{objective_type!r} response atoms are computed by code (the "
                             f"IFEval checker), not by a judge")
        return "response"
    raise ValueError(f"objective type {objective_type!r} has no atom {atom!r}; its atoms: "
                     f"{[*t.prompt_atoms, *t.response_atoms]}")


@dataclass
class LabelAgreement:
    """A judge against labels on one atom: `eval.rule_judge.atom_agreement` over the rows it
    labelled (the same metric as every other agreement figure), and the rows it did not."""

    judge: str
    objective_type: str
    atom: str
    channel: Channel
    agreement: AtomAgreement | None = None  # None when the judge labelled no row
    not_judged: list[tuple[int, str]] = field(default_factory=list)  # (row, why)

    def metrics(self) -> dict[str, Any]:
        """n, accuracy, precision, recall, F1 and the confusion counts (None: no row labelled)."""
        ag = self.agreement
        return {m: (getattr(ag, m) if ag is not None else (0 if m == "n" else None))
                for m in _METRICS}

    def as_dict(self) -> dict[str, Any]:
        return {"judge": self.judge, "objective_type": self.objective_type, "atom": self.atom,
                "channel": self.channel, **self.metrics(), "not_judged": len(self.not_judged)}


_METRICS = ("n", "accuracy", "precision", "recall", "f1", "tp", "fp", "fn", "tn")


def label_agreement(judge: Judge, objective_type: str, atom: str,
                    rows: Sequence[LabelledRow], *, source: str = "<labels>") -> LabelAgreement:
    """Ask `judge` for `atom` on every labelled row and count agreement with the labels."""
    channel = atom_channel(objective_type, atom)
    result = LabelAgreement(judge=judge.name, objective_type=objective_type, atom=atom,
                            channel=channel)
    if channel == "response":
        missing = next((i for i, r in enumerate(rows) if r.response is None), None)
        if missing is not None:
            raise DataFormatError(source, f"{atom!r} is a response atom: every row needs the "
                                          f"reply it labels", row=missing, field="response")
        convs = [[{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.response}]
                 for r in rows]
        call = lambda: judge.response_atoms(objective_type, convs, [{} for _ in rows])  # noqa: E731
    else:
        convs = [[{"role": "user", "content": r.prompt}] for r in rows]
        call = lambda: judge.prompt_atoms(objective_type, convs)  # noqa: E731
    try:
        predicted = list(call())
    except JudgeError as e:
        predicted = list(e.partial)
        result.not_judged = [(f.index, "; ".join(f.errors)) for f in e.failures]
    if len(predicted) != len(rows):
        raise ValueError(f"judge {judge.name!r} returned {len(predicted)} labels for {len(rows)} rows")
    failed = {i for i, _ in result.not_judged}
    truth, pred = [], []
    for i, (row, atoms) in enumerate(zip(rows, predicted)):
        if i in failed:
            continue
        if atoms is None or atom not in atoms:
            result.not_judged.append((i, f"the judge gave no {atom!r}"))
            continue
        truth.append(row.label)
        pred.append(int(bool(atoms[atom])))
    if truth:
        result.agreement = atom_agreement(channel, atom, truth, pred)
    return result
