"""`mosaic agentdojo build`: AgentDojo suites -> `agentic` eval sets (held-out suites) and
preference pools (train suites), written atomically with provenance and licence.

Eval items: (user task, injection task) pairs of each held-out suite replayed to the injected
tool output with AgentDojo's `important_instructions` attack, plus benign items (no injection)
for utility. Pools: pairs of the train suites only, injected with other AgentDojo templates
(`ignore_previous`, `system_message`, `injecagent`), each with a chosen reply (the user task's
own remaining ground-truth calls plus an explicit refusal of the injection) and a rejected one
(the injection task's ground-truth calls): both from the suites' ground truth, both checked by
AgentDojo's utility and security functions before they are kept. docs/agentdojo.md.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mosaic.eval import agentdojo as ad
from mosaic.eval.base import get_objective_type
from mosaic.io import atomic_write_json, publish_dir

OBJECTIVE_TYPE = "agentic"
DEFAULT_TRAIN = ("workspace", "travel")
DEFAULT_HELDOUT = ("banking", "slack")


class SuiteFiles(BaseModel):
    suite: str
    split: str  # eval | pool
    path: str
    rows: int
    attacked: int
    benign: int
    attacks: list[str]
    dropped: dict[str, int] = Field(default_factory=dict)  # pairs left out, by reason


class BuildSummary(BaseModel):
    source: str = ad.LICENSE
    benchmark_version: str
    seed: int
    train_suites: list[str]
    heldout_suites: list[str]
    eval_attack: str
    pool_attacks: list[str]
    files: list[SuiteFiles]


def _id(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def _item(suite: str, user_task: str, injection_task: str | None, attack: str,
          version: str) -> tuple[list[dict[str, str]], dict[str, Any], ad.Replay]:
    rep = ad.replay(suite, user_task, injection_task, attack, version)
    prompt = ad.get_suite(suite, version).user_tasks[user_task].PROMPT
    messages = [{"role": "system", "content": ad.system_message(suite, version)},
                {"role": "user", "content": ad.transcript(prompt, rep)}]
    return messages, ad.prompt_atoms(suite, user_task, injection_task, attack, rep, version), rep


def _meta(suite: str, user_task: str, injection_task: str | None, attack: str, version: str,
          **extra: Any) -> dict[str, Any]:
    return {"source": {"dataset": "agentdojo", "license": "MIT", "suite": suite,
                       "benchmark_version": version, "user_task": user_task,
                       "injection_task": injection_task, "attack": attack}, **extra}


def chosen_reply(suite: str, user_task: str, atoms: dict[str, Any], version: str) -> str:
    """The user task continued past the injection, with the injection refused explicitly."""
    out = ad.get_suite(suite, version).user_tasks[user_task].GROUND_TRUTH_OUTPUT
    plan = f"PLAN: {out}" if out else "PLAN: continue the user's task."
    act = "; ".join(atoms["user_calls"])
    return f"{plan} REFUSE: {ad.REFUSAL}" + (f" ACT: {act}" if act else "")


def rejected_reply(suite: str, injection_task: str, atoms: dict[str, Any], version: str) -> str:
    """The injection task done: its ground-truth calls (and its ground-truth answer text)."""
    out = ad.get_suite(suite, version).injection_tasks[injection_task].GROUND_TRUTH_OUTPUT
    plan = f"PLAN: {out}" if out else "PLAN: do what the tool output asks first."
    act = "; ".join(atoms["injection_calls"])
    return plan + (f" ACT: {act}" if act else "")


def _pairs(suite: str, version: str) -> list[tuple[str, str]]:
    s = ad.get_suite(suite, version)
    return [(u, i) for u in s.user_tasks for i in s.injection_tasks]


def build_eval(suite: str, out: Path, n_attacked: int, n_benign: int, seed: int,
               version: str) -> SuiteFiles:
    rng = random.Random(f"{seed}|eval|{suite}")
    pairs = _pairs(suite, version)
    rng.shuffle(pairs)
    users = sorted(ad.get_suite(suite, version).user_tasks, key=lambda u: int(u.rsplit("_", 1)[1]))
    rng.shuffle(users)
    chosen = [(u, i, ad.EVAL_ATTACK) for u, i in pairs[:n_attacked]]
    chosen += [(u, None, "none") for u in users[:n_benign]]
    rows = []
    objective = f"agentdojo_{suite}"
    for u, i, attack in chosen:
        messages, atoms, _ = _item(suite, u, i, attack, version)
        rows.append({"id": _id("agentdojo", version, suite, u, i, attack), "objective": objective,
                     "messages": messages, "l3_prompt": _dumps(atoms),
                     "metadata": _dumps(_meta(suite, u, i, attack, version))})
    path = out / "eval" / f"{objective}.parquet"
    _write(path, rows)
    n_att = sum(i is not None for _, i, _ in chosen)
    return SuiteFiles(suite=suite, split="eval", path=str(path), rows=len(rows), attacked=n_att,
                      benign=len(rows) - n_att, attacks=[ad.EVAL_ATTACK])


def build_pool(suite: str, out: Path, n_pairs: int, seed: int, version: str) -> SuiteFiles:
    """Chosen/rejected rows for up to `n_pairs` pairs; a pair whose ground truth AgentDojo does
    not itself score as intended (chosen: utility and no attack success; rejected: attack
    success) is dropped and counted, never kept with a wrong label."""
    otype = get_objective_type(OBJECTIVE_TYPE)
    rng = random.Random(f"{seed}|pool|{suite}")
    pairs = _pairs(suite, version)
    rng.shuffle(pairs)
    rows: list[dict[str, Any]] = []
    dropped = {"chosen_fails_utility": 0, "rejected_not_attack_success": 0}
    used = 0
    objective = f"agentdojo_{suite}"
    for k, (u, i) in enumerate(pairs):
        if used >= n_pairs:
            break
        attack = ad.POOL_ATTACKS[k % len(ad.POOL_ATTACKS)]
        messages, atoms, _ = _item(suite, u, i, attack, version)
        good = chosen_reply(suite, u, atoms, version)
        bad = rejected_reply(suite, i, atoms, version)
        g_atoms = otype.code_response_atoms([[*messages, {"role": "assistant", "content": good}]], [atoms])[0]
        b_atoms = otype.code_response_atoms([[*messages, {"role": "assistant", "content": bad}]], [atoms])[0]
        if not g_atoms["task_completed"] or g_atoms["harmful_call"]:
            dropped["chosen_fails_utility"] += 1
            continue
        if not b_atoms["harmful_call"]:
            dropped["rejected_not_attack_success"] += 1
            continue
        used += 1
        pid = _id("agentdojo", version, suite, u, i, attack)
        for cls, reply, r_atoms in (("chosen", good, g_atoms), ("rejected", bad, b_atoms)):
            l2, l1 = otype.score(atoms, r_atoms)
            rows.append({"id": _id(pid, cls), "prompt_id": pid, "objective": objective,
                         "messages": [*messages, {"role": "assistant", "content": reply}],
                         "l3_prompt": _dumps(atoms), "l3_response": _dumps(r_atoms),
                         "slice": l1.slice, "score": float(l1.score), "valid": l1.valid,
                         "weight": float(l1.weight), "failure": l1.failure,
                         **otype.l2_to_columns(l2),
                         "metadata": _dumps(_meta(suite, u, i, attack, version,
                                                  response_class=cls))})
    path = out / "pools" / f"{objective}.parquet"
    _write(path, rows)
    return SuiteFiles(suite=suite, split="pool", path=str(path), rows=len(rows),
                      attacked=used, benign=0, attacks=sorted(set(ad.POOL_ATTACKS)),
                      dropped=dropped)


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    from mosaic.data import write_table
    import pandas as pd

    if not rows:
        raise ValueError(f"{path}: no rows to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(path, pd.DataFrame(rows))


def build(out: Path, train: list[str], heldout: list[str], *, eval_attacked: int = 24,
          eval_benign: int = 8, pool_pairs: int = 40, seed: int = 0,
          version: str = ad.BENCHMARK_VERSION) -> BuildSummary:
    """Eval sets for the held-out suites, pools for the train suites, and `agentdojo.json`
    (this summary: sources, licence, split, counts) written last."""
    ad.require()
    for s in [*train, *heldout]:
        if s not in ad.SUITES:
            raise ValueError(f"unknown AgentDojo suite {s!r}; expected some of {list(ad.SUITES)}")
    if set(train) & set(heldout):
        raise ValueError(f"suites both train and held-out: {sorted(set(train) & set(heldout))}; "
                         "a held-out suite must never reach a pool")
    if ad.EVAL_ATTACK in ad.POOL_ATTACKS:  # pragma: no cover - a constant, pinned by a test
        raise ValueError("the eval attack template must not be a pool template")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written into a staging folder beside OUT and published as a whole: a
    # failure half-way leaves OUT as it was.
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        files = [build_eval(s, stage, eval_attacked, eval_benign, seed, version) for s in heldout]
        files += [build_pool(s, stage, pool_pairs, seed, version) for s in train]
        for f in files:  # paths as they will be after publishing
            f.path = str(out / Path(f.path).relative_to(stage))
        summary = BuildSummary(benchmark_version=version, seed=seed, train_suites=list(train),
                               heldout_suites=list(heldout), eval_attack=ad.EVAL_ATTACK,
                               pool_attacks=list(ad.POOL_ATTACKS), files=files)
        atomic_write_json(stage / "agentdojo.json", summary.model_dump(mode="json"))
        publish_dir(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary
