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

Inside a Ray task the candidate's own stages run on the local engine: the task is the unit of
parallelism, and Ray Data pipelines nested in tasks would wait for CPUs the tasks hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mosaic.config import MosaicConfig
from mosaic.io import atomic_write_json, read_record
from mosaic.schemas import (SCHEMA_VERSION, ArchiveDecision, Author, DataAction, EvalReport,
                            ParetoArchive, RoundResult, Strict)

log = logging.getLogger(__name__)

CANDIDATES_FILE = "candidates.json"
RULE = ("largest archive hypervolume after adding the candidate; ties: larger sum of eval "
        "scores, then the first proposed; rejected candidates are never kept")


class Candidate(Strict):
    """One proposed action for the round, as raw JSON text (checked like any proposal)."""

    action: str
    author: Author = "planner"


class CandidateOutcome(Strict):
    index: int
    author: Author
    round_dir: str
    result: RoundResult
    decision: ArchiveDecision | None = None  # what adding this candidate alone would do
    kept: bool = False


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
                   ) -> CandidateRound:
    """Run every candidate's round (Ray tasks on `runtime.engine: ray`, else in turn), keep the
    best by the archive's rule, and write `<round_dir>/candidates.json`. `archive` is the run's
    archive before this round (None: a fresh one over the config's objectives); it is not
    changed: the caller adds the kept point as for any round."""
    from mosaic.tools.archive import add_point, new_archive, point_from_reports

    if not candidates:
        raise ValueError("no candidates to run")
    say = progress or (lambda msg: log.info("%s", msg))
    round_dir = Path(round_dir)
    dirs = [candidate_dir(round_dir, j) for j in range(len(candidates))]
    prev = previous_action.model_dump(mode="json") if previous_action is not None else None
    engine = config.runtime.engine
    results: list[RoundResult]
    if engine == "ray":
        results = _on_ray(config, candidates, dirs, round_index, prev, seed, heldout, say)
    else:
        results = []
        for j, (c, d) in enumerate(zip(candidates, dirs)):
            say(f"round {round_index}: candidate {j + 1} of {len(candidates)}")
            results.append(RoundResult.model_validate(_run_one(
                config.model_dump(mode="json"), c.action, str(d), round_index, prev, seed,
                heldout, None)))

    store = archive or new_archive(list(config.objectives))
    outcomes: list[CandidateOutcome] = []
    best: tuple[float, float, int] | None = None
    kept: int | None = None
    for j, (c, d, result) in enumerate(zip(candidates, dirs, results)):
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
                                         result=result, decision=decision))
    if kept is not None:
        outcomes[kept] = outcomes[kept].model_copy(update={"kept": True})
    out = CandidateRound(round=round_index, engine=engine, kept=kept, candidates=outcomes)
    atomic_write_json(round_dir / CANDIDATES_FILE, out)
    say(f"round {round_index}: kept candidate {kept + 1} of {len(candidates)}" if kept is not None
        else f"round {round_index}: the check rejected every candidate")
    return out


def _on_ray(config: MosaicConfig, candidates: Sequence[Candidate], dirs: list[Path],
            round_index: int, prev: dict[str, Any] | None, seed: int | None, heldout: bool,
            say: Callable[[str], None]) -> list[RoundResult]:
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
    refs = [task.remote(config_json, c.action, str(d), round_index, prev, seed, heldout, threads)
            for c, d in zip(candidates, dirs)]
    say(f"round {round_index}: {len(refs)} candidates as Ray tasks")
    index = {ref: j for j, ref in enumerate(refs)}
    results: list[RoundResult | None] = [None] * len(refs)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        j = index[ready[0]]
        results[j] = RoundResult.model_validate(ray.get(ready[0]))
        say(f"round {round_index}: candidate {j + 1} of {len(refs)} finished "
            f"({results[j].status})")
    return [r for r in results if r is not None]


__all__ = ["CANDIDATES_FILE", "Candidate", "CandidateOutcome", "CandidateRound", "action_hash",
           "candidate_dir", "run_candidates"]
