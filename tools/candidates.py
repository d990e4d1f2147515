"""Independent candidate rounds: several proposed actions for one round, each checked, built,
trained and evaluated in its own folder, then the best one by the archive's rule kept.

Candidates are independent by construction (same base model, same round seed, separate
folders), so on `runtime.engine: ray` each one's build -> train -> evaluate runs as a Ray task
and a cluster runs them side by side; on `local` they run one after another in this process.
Both give the same `CandidateRound`: every stage is deterministic given its inputs.

The rule that keeps one is the archive's own: the candidate whose point, added to the current
archive, leaves the largest hypervolume (ties: the larger sum of eval scores, then the first
proposed). A candidate the check rejects is never kept. Every candidate is recorded, kept or
not, in `<round_dir>/candidates.json` (its action, verdict, scores and archive decision), and
its folder stays for the audit: `<round_dir>/candidates/<j>/` has the usual round layout
(`tools/run_round.py`).

Two kinds of candidate are recorded without being run (no folder): one the caller's own check
already refused (`Candidate.refused`: the loop checks under a person's tighter limits), and an
exact duplicate -- the same action as an earlier candidate apart from its rationale, which
would build the same training set and train the same adapter (`duplicate_of`).

Safe to repeat: a candidate's stages reuse their outputs through their completion markers, so
calling `run_candidates` again on the same folder (a resumed loop re-runs the node in flight)
retrains nothing that finished. `keep_candidate` then places the kept candidate's files in the
round folder itself (hard links), so the round reads as any round does (round.json, the audit's
checks, the planner's reports).

Inside a Ray task the candidate's own stages run on the local engine: the task is the unit of
parallelism, and Ray Data pipelines nested in tasks would wait for CPUs the tasks hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from mosaic.config import MosaicConfig
from mosaic.io import atomic_write_json, read_record
from mosaic.schemas import (SCHEMA_VERSION, ActionVerdict, ArchiveDecision, Author, DataAction,
                            EvalReport, ParetoArchive, Problem, RoundResult, Strict)

log = logging.getLogger(__name__)

CANDIDATES_FILE = "candidates.json"
RULE = ("largest archive hypervolume after adding the candidate; ties: larger sum of eval "
        "scores, then the first proposed; rejected candidates are never kept")


class Candidate(Strict):
    """One proposed action for the round, as raw JSON text (checked like any proposal)."""

    action: str
    author: Author = "planner"
    # The caller's own check refused it (e.g. the loop's, under a person's tighter limits):
    # recorded with this verdict, never built.
    refused: ActionVerdict | None = None


class CandidateOutcome(Strict):
    index: int
    author: Author
    round_dir: str
    result: RoundResult
    decision: ArchiveDecision | None = None  # what adding this candidate alone would do
    kept: bool = False
    # The earlier candidate this one repeats (the same action apart from its rationale): not
    # run; its result is a rejection saying so.
    duplicate_of: int | None = None

    @property
    def status(self) -> Literal["done", "rejected", "duplicate"]:
        if self.duplicate_of is not None:
            return "duplicate"
        return "done" if self.result.status == "done" else "rejected"


class CandidateRound(Strict):
    """What a round of candidates did: every candidate's outcome and the one kept."""

    schema_version: int = SCHEMA_VERSION
    round: int
    engine: Literal["local", "ray"]
    rule: str = RULE
    kept: int | None = None  # index of the kept candidate; None when every one was rejected
    candidates: list[CandidateOutcome] = Field(default_factory=list)

    @property
    def kept_outcome(self) -> CandidateOutcome | None:
        return self.candidates[self.kept] if self.kept is not None else None


def action_hash(action: DataAction) -> str:
    """The same hash the loop's archive node gives an action."""
    text = json.dumps(action.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def data_hash(raw_action: str) -> str | None:
    """What makes two candidates the same: the action as parsed, its rationale left out (it
    changes neither the training set nor the adapter). None when the text is not an action
    (the check rejects it)."""
    try:
        action = DataAction.model_validate_json(raw_action)
    except (ValidationError, ValueError):
        return None
    text = json.dumps(action.model_dump(mode="json", exclude={"rationale"}), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def candidate_dir(round_dir: str | Path, index: int) -> Path:
    return Path(round_dir) / "candidates" / str(index)


def _run_one(config_json: dict[str, Any], action: str, round_dir: str, round_index: int,
             previous_action: dict[str, Any] | None, seed: int | None, heldout: bool,
             threads: int | None) -> dict[str, Any]:
    """One candidate's round (a Ray task's body; also the local path's, without the JSON)."""
    from mosaic.tools.run_round import run_round

    config = MosaicConfig.model_validate(config_json)
    runtime = config.runtime.model_copy(update={
        "engine": "local", "threads": config.runtime.threads or threads})
    config = config.model_copy(update={"runtime": runtime})
    prev = DataAction.model_validate(previous_action) if previous_action is not None else None
    result = run_round(config, action, round_dir, round_index=round_index, previous_action=prev,
                       seed=seed, heldout=heldout)
    return result.model_dump(mode="json")


def run_candidates(config: MosaicConfig, candidates: Sequence[Candidate], round_dir: str | Path,
                   *, round_index: int, archive: ParetoArchive | None = None,
                   previous_action: DataAction | None = None, seed: int | None = None,
                   heldout: bool = True, progress: Callable[[str], None] | None = None,
                   on_candidate: Callable[[int, RoundResult], None] | None = None,
                   ) -> CandidateRound:
    """Run every candidate's round (Ray tasks on `runtime.engine: ray`, else in turn), keep the
    best by the archive's rule, and write `<round_dir>/candidates.json`. `archive` is the run's
    archive before this round (None: a fresh one over the config's objectives); it is not
    changed: the caller adds the kept point as for any round. `on_candidate(j, result)` is
    called as each candidate that ran finishes (its files written)."""
    from mosaic.tools.archive import add_point, new_archive, point_from_reports

    if not candidates:
        raise ValueError("no candidates to run")
    say = progress or (lambda msg: log.info("%s", msg))
    done = on_candidate or (lambda j, r: None)
    round_dir = Path(round_dir)
    dirs = [candidate_dir(round_dir, j) for j in range(len(candidates))]
    prev = previous_action.model_dump(mode="json") if previous_action is not None else None
    engine = config.runtime.engine

    # Not run: refused by the caller's check, or a repeat of an earlier candidate.
    results: dict[int, RoundResult] = {}
    duplicates: dict[int, int] = {}
    first_of: dict[str, int] = {}
    for j, c in enumerate(candidates):
        if c.refused is not None:
            results[j] = RoundResult(round=round_index, status="rejected", verdict=c.refused)
            continue
        key = data_hash(c.action)
        if key is not None and key in first_of:
            duplicates[j] = first_of[key]
            results[j] = RoundResult(round=round_index, status="rejected", verdict=ActionVerdict(
                status="invalid", problems=[Problem(
                    code="duplicate_candidate", path="$",
                    message=f"the same action as candidate {first_of[key] + 1} apart from its "
                            f"rationale: not trained twice")]))
        elif key is not None:
            first_of[key] = j
    to_run = [j for j in range(len(candidates)) if j not in results]
    if duplicates:
        say(f"round {round_index}: dropped {len(duplicates)} duplicate candidate(s): "
            + ", ".join(f"{j + 1} repeats {i + 1}" for j, i in duplicates.items()))
    if to_run and engine == "ray":
        results.update(_on_ray(config, candidates, dirs, to_run, round_index, prev, seed,
                               heldout, say, done))
    else:
        for j in to_run:
            say(f"round {round_index}: candidate {j + 1} of {len(candidates)}")
            results[j] = RoundResult.model_validate(_run_one(
                config.model_dump(mode="json"), candidates[j].action, str(dirs[j]), round_index,
                prev, seed, heldout, None))
            done(j, results[j])

    store = archive or new_archive(list(config.objectives))
    outcomes: list[CandidateOutcome] = []
    best: tuple[float, float, int] | None = None
    kept: int | None = None
    for j, (c, d) in enumerate(zip(candidates, dirs)):
        result = results[j]
        decision = None
        if result.status == "done" and result.action is not None:
            ev = read_record(d / "eval" / "eval_report.json", EvalReport)
            ho_file = d / "heldout" / "eval_report.json"
            ho = read_record(ho_file, EvalReport) if ho_file.is_file() else None
            point = point_from_reports(round_index, ev, ho, action_hash=action_hash(result.action),
                                       adapter=str(d / "adapter"), author=c.author)
            decision = add_point(store, point)[1]
            key = (decision.hypervolume_after, sum(point.eval.values()), -j)
            if best is None or key > best:
                best, kept = key, j
        outcomes.append(CandidateOutcome(index=j, author=c.author, round_dir=str(d),
                                         result=result, decision=decision,
                                         duplicate_of=duplicates.get(j)))
    if kept is not None:
        outcomes[kept] = outcomes[kept].model_copy(update={"kept": True})
    out = CandidateRound(round=round_index, engine=engine, kept=kept, candidates=outcomes)
    atomic_write_json(round_dir / CANDIDATES_FILE, out)
    say(f"round {round_index}: kept candidate {kept + 1} of {len(candidates)}" if kept is not None
        else f"round {round_index}: the check rejected every candidate")
    return out


# What a candidate's folder holds that makes a round (round.json is the caller's to write).
KEPT_ENTRIES = ("action.json", "verdict.json", "dataset", "dataset.done.json", "adapter",
                "adapter.done.json", "eval", "heldout")


def keep_candidate(round_dir: str | Path, index: int) -> list[Path]:
    """Place candidate `index`'s files in the round folder itself, as hard links (a copy where
    links cannot be made), so the round reads like any other: its action, dataset, adapter and
    eval reports under `<round_dir>/`, their markers valid (they name files relative to
    themselves). Safe to repeat: what is already this candidate's file is left alone, anything
    else in its place is replaced. Returns the paths placed."""
    round_dir = Path(round_dir)
    source = candidate_dir(round_dir, index)
    placed: list[Path] = []
    for name in KEPT_ENTRIES:
        src = source / name
        dst = round_dir / name
        if not src.exists():
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            continue
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        if dst.is_dir() and src.is_dir():
            wanted = {p.relative_to(src) for p in files}
            for extra in [p for p in dst.rglob("*") if p.is_file()
                          and p.relative_to(dst) not in wanted]:
                extra.unlink()  # left by another candidate placed here before
        elif dst.is_dir() and not src.is_dir():
            shutil.rmtree(dst)
        elif dst.exists() and src.is_dir():
            dst.unlink()
        for f in files:
            target = dst / f.relative_to(src) if src.is_dir() else dst
            if target.is_file() and os.path.samefile(f, target):
                placed.append(target)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".keep-tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(f, tmp)
            except OSError:
                shutil.copy2(f, tmp)
            os.replace(tmp, target)
            placed.append(target)
    return placed


def _on_ray(config: MosaicConfig, candidates: Sequence[Candidate], dirs: list[Path],
            to_run: list[int], round_index: int, prev: dict[str, Any] | None, seed: int | None,
            heldout: bool, say: Callable[[str], None],
            done: Callable[[int, RoundResult], None]) -> dict[int, RoundResult]:
    from mosaic.engine import ensure_ray

    from mosaic.sandbox.base_model import ensure_base_model

    ray = ensure_ray(config.runtime)
    # Built (or converted) once here, before the tasks start: they would race to build it.
    ensure_base_model(config)
    settings = config.runtime.ray
    # A candidate that dies with its worker is run again; its folder's markers keep what
    # finished, so the rerun redoes only the unfinished stages.
    task = ray.remote(num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker,
                      max_retries=settings.max_retries)(_run_one)
    threads = max(1, int(settings.cpus_per_worker))
    config_json = config.model_dump(mode="json")
    refs = [task.remote(config_json, candidates[j].action, str(dirs[j]), round_index, prev, seed,
                        heldout, threads) for j in to_run]
    say(f"round {round_index}: {len(refs)} candidates as Ray tasks")
    index = {ref: j for j, ref in zip(to_run, refs)}
    results: dict[int, RoundResult] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        j = index[ready[0]]
        results[j] = RoundResult.model_validate(ray.get(ready[0]))
        say(f"round {round_index}: candidate {j + 1} of {len(candidates)} finished "
            f"({results[j].status})")
        done(j, results[j])
    return results


__all__ = ["CANDIDATES_FILE", "KEPT_ENTRIES", "Candidate", "CandidateOutcome", "CandidateRound",
           "action_hash", "candidate_dir", "data_hash", "keep_candidate", "run_candidates"]
