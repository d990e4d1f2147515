"""Fit and measure the embedding judge's heads on labelled real text (`mosaic train-judge`).

Data: one JSONL file per head and split (`<head>.train.jsonl`, `<head>.test.jsonl`) with
`prompt`, `response` (reply heads), `label` 0/1, `source` and `group`; rows of one group (a
request with its replies) are on one side of the split. The regularisation strength of each
head is chosen by grouped 5-fold cross-validation inside the train split only; the test split
is touched once, to report. Besides the pooled test figures the card holds per-source figures,
leave-one-source-out figures (train on the other sources, test on one: how the head carries to
text it has never seen the like of) and the rule judge's figures on the same test rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mosaic.eval.embedding_judge import (CARD_FILE, ENCODER_PACKAGE, HEADS_FILE, Head, Heads,
                                         SentenceEncoder, TextEmbedder, features, opening)
from mosaic.eval.rule_judge import (AtomAgreement, atom_agreement, jailbreak_response_atoms,
                                    overrefusal_prompt_atoms, overrefusal_response_atoms)
from mosaic.io import atomic_write_text
from mosaic.resources import RESOURCES_DIR

CARD_SCHEMA_VERSION = 1
SHIPPED_DATA = RESOURCES_DIR / "real_text" / "judge"
# head -> (what it reads, the channel its atom is on)
HEAD_FEATURES = {"harmful_intent": "prompt", "explicit_refusal": "response", "complied": "pair"}
C_GRID = (0.25, 1.0, 4.0, 16.0, 64.0, 256.0)
MAX_CHARS = 200  # the data's replies are cut to this (scripts/build_real_text.py)
TARGETS = {"harmful_intent": 0.85, "explicit_refusal": 0.90}  # held-out accuracy the issue asks


def load_labels(folder: str | Path = SHIPPED_DATA) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """head -> split -> rows, checked: a missing field or a label other than 0/1 names the file
    and line."""
    folder = Path(folder)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for head, kind in HEAD_FEATURES.items():
        for split in ("train", "test"):
            path = folder / f"{head}.{split}.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; the labelled data has one file per head and "
                                        f"split ({', '.join(HEAD_FEATURES)} x train/test)")
            rows = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e})") from None
                need = ["prompt", "label", "source", "group"] + ([] if kind == "prompt" else ["response"])
                missing = [f for f in need if not isinstance(row.get(f), (str, int)) or row.get(f) == ""]
                if missing:
                    raise ValueError(f"{path}:{i}: missing or empty {', '.join(missing)}")
                if row["label"] not in (0, 1) or isinstance(row["label"], bool):
                    raise ValueError(f"{path}:{i}: label must be 0 or 1, got {row['label']!r}")
                rows.append(row)
            out.setdefault(head, {})[split] = rows
    return out


def data_fingerprint(folder: str | Path = SHIPPED_DATA) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(Path(folder).glob("*.jsonl"))}


class HeadInputs:
    """Embeds rows for a head (request, reply opening or both), each text once per process."""

    def __init__(self, embed: TextEmbedder, max_chars: int = MAX_CHARS) -> None:
        self.embed = embed
        self.max_chars = max_chars

    def __call__(self, head: str, rows: Sequence[dict[str, Any]]) -> np.ndarray:
        kind = HEAD_FEATURES[head]
        p = self.embed([r["prompt"] for r in rows]) if kind != "response" else None
        r = (self.embed([opening(r["response"], self.max_chars) for r in rows])
             if kind != "prompt" else None)
        return features(kind, p, r)


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    model = LogisticRegression(C=c, class_weight="balanced", max_iter=10000, tol=1e-8)
    # One BLAS thread: these problems are small, and spinning BLAS threads made each fit ten
    # times slower on a busy 2-core machine.
    with threadpool_limits(1):
        model.fit(x, y)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0])


def _round(w: np.ndarray, b: float) -> tuple[np.ndarray, float]:
    # 6 significant digits: the file is stable across machines whose float sums differ in the
    # last bits, and no decision moves.
    return np.array([float(f"{v:.6g}") for v in w]), float(f"{b:.6g}")


def choose_c(x: np.ndarray, y: np.ndarray, groups: Sequence[str],
             c_grid: Sequence[float] = C_GRID) -> tuple[float, dict[str, float]]:
    """The C with the best mean balanced accuracy over grouped 5-fold CV (ties: the smaller C,
    the stronger regularisation)."""
    from sklearn.model_selection import GroupKFold

    folds = list(GroupKFold(n_splits=5).split(x, y, groups))
    scores = {}
    for c in c_grid:
        accs = []
        for tr, va in folds:
            w, b = _fit(x[tr], y[tr], c)
            pred = (x[va] @ w + b >= 0).astype(int)
            recalls = [np.mean(pred[y[va] == k] == k) for k in (0, 1) if np.any(y[va] == k)]
            accs.append(float(np.mean(recalls)))
        scores[str(c)] = float(np.mean(accs))
    best = max(c_grid, key=lambda c: (round(scores[str(c)], 6), -c))
    return best, scores


def fit_heads(data: dict[str, dict[str, list[dict[str, Any]]]], inputs: HeadInputs,
              encoder: dict[str, Any], progress: Callable[[str], None] = lambda _: None,
              c_grid: Sequence[float] = C_GRID) -> tuple[Heads, dict[str, Any]]:
    heads, cv = {}, {}
    for head in HEAD_FEATURES:
        progress(f"fitting {head}")
        rows = data[head]["train"]
        x, y = inputs(head, rows), np.array([r["label"] for r in rows])
        c, scores = choose_c(x, y, [f"{r['source']}|{r['group']}" for r in rows], c_grid)
        w, b = _round(*_fit(x, y, c))
        heads[head] = Head(head, HEAD_FEATURES[head], w, b, 0.5)
        cv[head] = {"C": c, "cv_balanced_accuracy": scores}
    text = Heads(heads, MAX_CHARS, encoder, "").to_json()
    return Heads(heads, MAX_CHARS, encoder, hashlib.sha256(text.encode()).hexdigest()), cv


def agreement(head: Head, x: np.ndarray, rows: Sequence[dict[str, Any]]) -> AtomAgreement:
    channel = "prompt" if HEAD_FEATURES[head.name] == "prompt" else "response"
    return atom_agreement(channel, head.name, [r["label"] for r in rows], head.decide(x).tolist())


def rule_decisions(head: str, rows: Sequence[dict[str, Any]], max_chars: int = MAX_CHARS) -> list[int]:
    """What the rule judge says on the same rows (the gap the embedding judge closes)."""
    if head == "harmful_intent":
        return [overrefusal_prompt_atoms([r["prompt"]])["harmful_intent"] for r in rows]
    replies = [opening(r["response"], max_chars) for r in rows]
    if head == "explicit_refusal":
        return [overrefusal_response_atoms(x, [r["prompt"]])["explicit_refusal"] for x, r in zip(replies, rows)]
    return [jailbreak_response_atoms(x, [r["prompt"]])["step_leak"] for x, r in zip(replies, rows)]


def measure(heads: Heads, data: dict[str, dict[str, list[dict[str, Any]]]], inputs: HeadInputs,
            split: str = "test") -> dict[str, dict[str, Any]]:
    """Per head: the pooled figures on `split`, per-source figures, and the rule judge's."""
    out: dict[str, dict[str, Any]] = {}
    for name, head in heads.heads.items():
        rows = data[name][split]
        x = inputs(name, rows)
        pred = head.decide(x)
        sources = sorted({r["source"] for r in rows})
        channel = "prompt" if HEAD_FEATURES[name] == "prompt" else "response"
        out[name] = {
            "all": agreement(head, x, rows).as_dict(),
            "by_source": {s: atom_agreement(channel, name, [r["label"] for r in rows if r["source"] == s],
                                            [int(p) for p, r in zip(pred, rows) if r["source"] == s]).as_dict()
                          for s in sources},
            "rule_judge": atom_agreement(channel, name, [r["label"] for r in rows],
                                         rule_decisions(name, rows, heads.max_chars)).as_dict(),
        }
    return out


def leave_one_source_out(data: dict[str, dict[str, list[dict[str, Any]]]], inputs: HeadInputs,
                         cv: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per head and source: fit on the other sources' train rows (same C), test on this source's
    test rows. Sources whose test rows hold one class only still show recall or specificity."""
    out: dict[str, dict[str, Any]] = {}
    for name in HEAD_FEATURES:
        train, test = data[name]["train"], data[name]["test"]
        channel = "prompt" if HEAD_FEATURES[name] == "prompt" else "response"
        xtr, xte = inputs(name, train), inputs(name, test)
        out[name] = {}
        for s in sorted({r["source"] for r in test}):
            keep = np.array([r["source"] != s for r in train])
            ytr = np.array([r["label"] for r in train])[keep]
            if len(set(ytr.tolist())) < 2:
                continue
            w, b = _fit(xtr[keep], ytr, cv[name]["C"])
            mine = [i for i, r in enumerate(test) if r["source"] == s]
            pred = (xte[mine] @ w + b >= 0).astype(int).tolist()
            out[name][s] = atom_agreement(channel, name, [test[i]["label"] for i in mine], pred).as_dict()
    return out


def _shown(folder: str | Path) -> str:
    """A data folder as the card records it: the shipped one relative to the package."""
    path = Path(folder).resolve()
    if path.is_relative_to(RESOURCES_DIR):
        return f"mosaic/resources/{path.relative_to(RESOURCES_DIR).as_posix()}"
    return str(folder)


def train_judge(data_dir: str | Path = SHIPPED_DATA, out_dir: str | Path | None = None, *,
                encoder: SentenceEncoder | None = None,
                progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Fit the heads on `data_dir`'s train split, measure them, and (with `out_dir`) write
    heads.json and card.json there. Returns the card."""
    data = load_labels(data_dir)
    progress("loading the encoder")
    enc = encoder or SentenceEncoder()
    inputs = HeadInputs(TextEmbedder(enc))
    progress("embedding the labelled text")
    for head in HEAD_FEATURES:  # embed everything once, up front
        for split in ("train", "test"):
            inputs(head, data[head][split])
    heads, cv = fit_heads(data, inputs, enc.identity(), progress)
    progress("measuring on the held-out split")
    card = {
        "schema_version": CARD_SCHEMA_VERSION,
        "heads_sha256": heads.sha256,
        "encoder": {**heads.encoder, "package": ENCODER_PACKAGE},
        "max_chars": heads.max_chars,
        "data": {"folder": _shown(data_dir), "files": data_fingerprint(data_dir),
                 "rows": {h: {s: len(data[h][s]) for s in ("train", "test")} for h in HEAD_FEATURES},
                 "positives": {h: {s: sum(r["label"] for r in data[h][s]) for s in ("train", "test")}
                               for h in HEAD_FEATURES}},
        "model_selection": cv,
        "test": measure(heads, data, inputs),
        "leave_one_source_out": leave_one_source_out(data, inputs, cv),
        "targets": TARGETS,
        "command": "mosaic train-judge",
    }
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / HEADS_FILE, heads.to_json())
        atomic_write_text(out / CARD_FILE, json.dumps(card, indent=1) + "\n")
    return card
