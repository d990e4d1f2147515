"""The Pareto archive: every evaluated round, its non-dominated front and hypervolume.

All objectives are maximised (mean 1-5 scores). Hypervolume is moocore's (a maintained
implementation; it minimises, so scores and the reference point are negated), measured against
a configurable reference point, by default 1 on every objective (the lowest score), so it grows
with every improvement anywhere. Front members whose eval CIs overlap on every objective are
listed as `indistinct`: the data cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mosaic.io import atomic_write_json, read_record
from mosaic.schemas import ArchiveDecision, ArchivePoint, EvalReport, ParetoArchive

ARCHIVE_FILE = "archive.json"


def hypervolume(points: Sequence[Mapping[str, float]], objectives: Sequence[str],
                reference: Mapping[str, float]) -> float:
    """Hypervolume (maximisation) of `points` above `reference`."""
    import moocore

    if not points:
        return 0.0
    x = np.array([[p[o] for o in objectives] for p in points], dtype=float)
    ref = np.array([reference[o] for o in objectives], dtype=float)
    return float(moocore.hypervolume(-x, ref=-ref))


def dominates(a: Mapping[str, float], b: Mapping[str, float], objectives: Sequence[str]) -> bool:
    return (all(a[o] >= b[o] for o in objectives) and any(a[o] > b[o] for o in objectives))


def point_from_reports(round_index: int, eval_report: EvalReport,
                       heldout_report: EvalReport | None = None, *, action_hash: str | None = None,
                       adapter: str | None = None, author: str | None = None) -> ArchivePoint:
    def scores(rep: EvalReport) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
        f = {n: r.f for n, r in rep.reports.items() if r.f is not None}
        ci = {n: (r.f_ci_low, r.f_ci_high) for n, r in rep.reports.items()
              if r.f_ci_low is not None and r.f_ci_high is not None}
        return f, ci

    ev, ev_ci = scores(eval_report)
    ho, ho_ci = scores(heldout_report) if heldout_report is not None else (None, None)
    return ArchivePoint(round=round_index, eval=ev, eval_ci=ev_ci, heldout=ho, heldout_ci=ho_ci,
                        action_hash=action_hash, adapter=adapter, author=author)  # type: ignore[arg-type]


def _summarise(archive: ParetoArchive) -> ParetoArchive:
    objs = archive.objectives
    pts = [p for p in archive.points if all(o in p.eval for o in objs)]
    front = [p for p in pts if not any(dominates(q.eval, p.eval, objs) for q in pts if q is not p)]
    best = {o: max(pts, key=lambda p: (p.eval[o], -p.round)).round for o in objs} if pts else {}
    indistinct = []
    for i, a in enumerate(front):
        for b in front[i + 1:]:
            if all(o in a.eval_ci and o in b.eval_ci
                   and a.eval_ci[o][0] <= b.eval_ci[o][1] and b.eval_ci[o][0] <= a.eval_ci[o][1]
                   for o in objs):
                indistinct.append((a.round, b.round))
    return archive.model_copy(update={
        "front": sorted(p.round for p in front),
        "hypervolume": hypervolume([p.eval for p in front], objs, archive.reference),
        "best": best, "indistinct": indistinct})


def new_archive(objectives: Sequence[str], reference: Mapping[str, float] | None = None
                ) -> ParetoArchive:
    ref = {o: 1.0 for o in objectives} if reference is None else dict(reference)
    missing = [o for o in objectives if o not in ref]
    if missing:
        raise ValueError(f"the reference point has no value for {missing}")
    return ParetoArchive(objectives=list(objectives), reference=ref)


def add_point(archive: ParetoArchive, point: ArchivePoint) -> tuple[ParetoArchive, ArchiveDecision]:
    """The archive with `point` added (replacing an earlier point of the same round, so
    re-adding after a crash changes nothing), and what it did to the front."""
    objs = archive.objectives
    missing = [o for o in objs if o not in point.eval]
    if missing:
        raise ValueError(f"round {point.round}: no eval score for {missing}")
    others = [p for p in archive.points if p.round != point.round]
    before = _summarise(archive.model_copy(update={"points": others}))
    front_before = [p for p in others if p.round in before.front]
    after = _summarise(archive.model_copy(update={
        "points": sorted([*others, point], key=lambda p: p.round)}))
    decision = ArchiveDecision(
        round=point.round, on_front=point.round in after.front,
        dominated_by=sorted(p.round for p in others if dominates(p.eval, point.eval, objs)),
        displaced=sorted(p.round for p in front_before if dominates(point.eval, p.eval, objs)),
        hypervolume_before=before.hypervolume, hypervolume_after=after.hypervolume)
    return after, decision


def save_archive(archive: ParetoArchive, run_dir: str | Path) -> Path:
    path = Path(run_dir) / ARCHIVE_FILE
    atomic_write_json(path, archive)
    return path


def load_archive(run_dir: str | Path) -> ParetoArchive | None:
    path = Path(run_dir) / ARCHIVE_FILE
    return read_record(path, ParetoArchive) if path.is_file() else None
