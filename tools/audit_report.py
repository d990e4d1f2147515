"""A run explained round by round, from its audit log and its round folders (`mosaic audit`).

For every round: the failure summary the planner read (the eval report of the latest evaluated
round before it: f per objective with its CI, the worst slices with CI and reliability), each
proposal with its rationale and tool calls, the check's verdict and the feedback of every
revision, a refusal and its fallback, what executed and whose decision it was, the training
set's manifest (rows and tokens per objective and bucket, focus rows), the score changes per
objective and slice with CIs, and the Pareto archive's decision. Every log entry of the round is
kept too, as written, so events this module does not know (a person's edits in chat) still show.

This reads; it never re-checks (`tools/verify_run.py` does). A tampered or half-written run folder
still gives a report, with what could not be read listed in `warnings`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mosaic.audit import LOG_FILE, verify_log
from mosaic.audit_events import AuditEntry
from mosaic.io import read_record
from mosaic.markers import flatten
from mosaic.schemas import (ActionVerdict, ArchiveDecision, AuditEvent, AuditReport,
                            CandidateSummary, DataAction, DatasetManifest, EvalReport, ExecutedRecord, FailureReport,
                            ManifestSummary, ObjectiveFailures, ObjectiveUsage, Proposal,
                            ProposalRecord, RoundAudit, RoundDiff, ScoreChange, TrainResult,
                            ValueChange)

WORST_SLICES = 3


def read_events(run_dir: str | Path) -> tuple[list[AuditEvent], list[str]]:
    """Every audit-log entry that parses (with the writers' own records, `mosaic.audit_events`),
    and a warning for each that does not. An entry whose data does not fit its kind's record is
    still shown as written, with a warning."""
    path = Path(run_dir) / LOG_FILE
    events: list[AuditEvent] = []
    warnings: list[str] = []
    if not path.is_file():
        return events, [f"{LOG_FILE} is missing"]
    data = path.read_bytes()
    lines = data.split(b"\n")
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            entry = AuditEntry.model_validate_json(raw)
            events.append(AuditEvent.model_validate(
                entry.model_dump(include={"seq", "time", "event", "round", "author", "id",
                                          "data"})))
        except (ValueError, TypeError, AttributeError, ValidationError) as e:
            warnings.append(f"{LOG_FILE} line {i} cannot be read ({type(e).__name__}); "
                            f"left out")
            continue
        try:
            entry.payload()
        except ValidationError as e:
            err = e.errors()[0]
            warnings.append(f"{LOG_FILE} line {i}: its data does not fit the {entry.event!r} "
                            f"record ({'.'.join(str(p) for p in err['loc']) or '(data)'}: "
                            f"{err['msg']}); shown as written")
    return events, warnings


def _eval_report(round_dir: Path, split: str, warnings: list[str]) -> EvalReport | None:
    path = round_dir / split / "eval_report.json"
    if not path.is_file():
        return None
    try:
        return read_record(path, EvalReport)
    except (ValueError, OSError) as e:
        warnings.append(f"{round_dir.name}/{split}/eval_report.json cannot be read: "
                        f"{type(e).__name__}")
        return None


def _record(path: Path, model: Any, warnings: list[str], run_dir: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return read_record(path, model)
    except (ValueError, OSError) as e:
        warnings.append(f"{path.relative_to(run_dir)} cannot be read: {type(e).__name__}")
        return None


def _ci(lo: float | None, hi: float | None) -> tuple[float, float] | None:
    return None if lo is None or hi is None else (lo, hi)


def failure_summary(report: FailureReport, worst: int = WORST_SLICES) -> ObjectiveFailures:
    """f with its CI and the `worst` slices (lowest mean first; slices without samples last)."""
    ranked = sorted(report.slices, key=lambda s: (s.mean is None, s.mean if s.mean is not None
                                                  else 0.0, -s.need, s.slice))
    return ObjectiveFailures(objective=report.objective, f=report.f, f_ci_low=report.f_ci_low,
                             f_ci_high=report.f_ci_high, target=report.target, n=report.n,
                             n_valid=report.n_valid, worst_slices=ranked[:worst])


def score_changes(before: EvalReport | None, after: EvalReport | None,
                  split: str) -> list[ScoreChange]:
    """Per objective (f) and per slice (mean): before -> after with both CIs."""
    if before is None or after is None:
        return []
    out: list[ScoreChange] = []

    def change(objective: str, slice_: str | None, b: float | None, bci: Any, a: float | None,
               aci: Any) -> ScoreChange:
        separated = bool(bci and aci and (aci[0] > bci[1] or aci[1] < bci[0]))
        return ScoreChange(split=split, objective=objective, slice=slice_, before=b,
                           before_ci=bci, after=a, after_ci=aci,
                           delta=None if a is None or b is None else a - b, separated=separated)

    for name, rep in after.reports.items():
        old = before.reports.get(name)
        if old is None:
            continue
        out.append(change(name, None, old.f, _ci(old.f_ci_low, old.f_ci_high), rep.f,
                          _ci(rep.f_ci_low, rep.f_ci_high)))
        old_slices = {s.slice: s for s in old.slices}
        for s in rep.slices:
            o = old_slices.get(s.slice)
            if o is None:
                continue
            out.append(change(name, s.slice, o.mean, _ci(o.ci_low, o.ci_high), s.mean,
                              _ci(s.ci_low, s.ci_high)))
    return out


def manifest_summary(manifest: DatasetManifest) -> ManifestSummary:
    per: dict[str, ObjectiveUsage] = {}
    for b in manifest.buckets:
        u = per.setdefault(b.objective, ObjectiveUsage(rows=0, tokens=0, focus_rows=0))
        per[b.objective] = u.model_copy(update={"rows": u.rows + b.rows,
                                                "tokens": u.tokens + b.tokens_used,
                                                "focus_rows": u.focus_rows + b.focus_rows})
    for name, alloc in manifest.allocations.items():
        if name in per:
            per[name] = per[name].model_copy(update={"allocation": alloc})
    return ManifestSummary(method=manifest.method, budget=manifest.budget,
                           total_tokens=manifest.total_tokens, total_rows=manifest.total_rows,
                           output_hash=manifest.output_hash, objectives=per,
                           buckets=list(manifest.buckets), notes=list(manifest.notes))


def _manifest_from_event(data: dict[str, Any]) -> ManifestSummary | None:
    try:
        per = {n: ObjectiveUsage(**u) for n, u in (data.get("per_objective") or {}).items()}
        return ManifestSummary(budget=data["budget"],
                               total_tokens=data["total_tokens"], total_rows=data["total_rows"],
                               output_hash=data["output_hash"], objectives=per)
    except (KeyError, TypeError, ValidationError):
        return None


def _scores(rep: EvalReport | None) -> tuple[dict[str, float | None], dict[str, tuple[float, float]]]:
    if rep is None:
        return {}, {}
    ci = {n: c for n, r in rep.reports.items() if (c := _ci(r.f_ci_low, r.f_ci_high))}
    return rep.scores(), ci


def _round_dirs(run_dir: Path) -> list[int]:
    out = []
    for p in run_dir.glob("round_*"):
        suffix = p.name.removeprefix("round_")
        if p.is_dir() and suffix.isdigit():
            out.append(int(suffix))
    return out


def _proposals(k: int, events: list[AuditEvent], warnings: list[str]) -> list[ProposalRecord]:
    """Proposals in log order, each with the verdict on it and the revision feedback it got."""
    records: list[ProposalRecord] = []
    by_rev: dict[int, int] = {}
    for e in events:
        if e.event == "proposal":
            fields = {n: e.data[n] for n in Proposal.model_fields if n in e.data}
            try:
                proposal = Proposal.model_validate(fields)
            except ValidationError:
                warnings.append(f"round {k}: proposal seq {e.seq} does not parse as a Proposal")
                continue
            rev = e.data.get("revision", len(records))
            by_rev[rev] = len(records)
            cand = e.data.get("candidate")
            records.append(ProposalRecord(revision=rev, author=e.author, proposal=proposal,
                                          candidate=cand if isinstance(cand, int) else None))
        elif e.event == "verdict" and records:
            try:
                verdict = ActionVerdict.model_validate(e.data)
            except ValidationError:
                warnings.append(f"round {k}: verdict seq {e.seq} does not parse as a verdict")
                continue
            rev = _rev_from_id(e.id)
            i = by_rev.get(rev, len(records) - 1) if rev is not None else len(records) - 1
            records[i] = records[i].model_copy(update={"verdict": verdict})
        elif e.event == "revision" and records:
            # revision n answers proposal n - 1 (the state's revision counts checked proposals)
            rev = e.data.get("revision")
            i = by_rev.get(rev - 1, len(records) - 1) if isinstance(rev, int) else len(records) - 1
            records[i] = records[i].model_copy(update={"feedback": list(e.data.get("feedback")
                                                                        or [])})
    return records


def _candidates(k: int, events: list[AuditEvent], warnings: list[str]) -> list[CandidateSummary]:
    """The round's candidates (loop.candidates > 1) in proposal order, from their entries."""
    out = []
    for e in events:
        if e.event != "candidate":
            continue
        try:
            out.append(CandidateSummary.model_validate(
                {n: e.data[n] for n in CandidateSummary.model_fields if n in e.data}))
        except ValidationError:
            warnings.append(f"round {k}: candidate seq {e.seq} does not parse")
    return sorted(out, key=lambda c: c.index)


def _rev_from_id(event_id: str | None) -> int | None:
    if not event_id:
        return None
    tail = event_id.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None


def build_audit_report(run_dir: str | Path, *, worst_slices: int = WORST_SLICES) -> AuditReport:
    """The run in `run_dir` explained round by round (see the module docstring)."""
    from mosaic.run_store import saved_config
    from mosaic.tools.archive import load_archive

    run_dir = Path(run_dir)
    config = saved_config(run_dir)  # ConfigError when the folder is not a run folder
    events, warnings = read_events(run_dir)
    check = verify_log(run_dir)
    try:
        archive = load_archive(run_dir)
    except (ValueError, OSError) as e:
        archive = None
        warnings.append(f"archive.json cannot be read: {type(e).__name__}")

    by_round: dict[int, list[AuditEvent]] = {}
    run_events: list[AuditEvent] = []
    for e in events:
        if e.round is None:
            run_events.append(e)
        else:
            by_round.setdefault(e.round, []).append(e)
    numbers = sorted(set(by_round) | set(_round_dirs(run_dir)))
    reports: dict[int, EvalReport | None] = {}
    heldouts: dict[int, EvalReport | None] = {}
    for k in numbers:
        rd = run_dir / f"round_{k}"
        reports[k] = _eval_report(rd, "eval", warnings)
        heldouts[k] = _eval_report(rd, "heldout", warnings)

    rounds: list[RoundAudit] = []
    evaluated: list[int] = []  # rounds with an eval report, in order: what a planner could read
    for k in numbers:
        rd = run_dir / f"round_{k}"
        evs = by_round.get(k, [])
        kinds = {e.event for e in evs}
        first = {}
        for e in evs:
            first.setdefault(e.event, e)
        saw = evaluated[-1] if k > 0 and evaluated else None
        if k == 0:
            status = "baseline"
        elif "round_skipped" in kinds:
            status = "skipped"
        elif "archive" in kinds:
            status = "done"
        else:
            status = "incomplete"
        executed = None
        if "executed" in first:
            ev = first["executed"]
            try:
                executed = ExecutedRecord(
                    action=DataAction.model_validate(ev.data.get("action")),
                    action_hash=str(ev.data.get("action_hash", "")),
                    decided_by=str(ev.data.get("decided_by") or ev.author),
                    source=(first["fallback"].data.get("source") if "fallback" in first
                            and ev.data.get("decided_by") == "fallback" else None))
            except ValidationError:
                warnings.append(f"round {k}: the executed action (seq {ev.seq}) does not parse")
        manifest = None
        man = _record(rd / "dataset" / "manifest.json", DatasetManifest, warnings, run_dir)
        if man is not None:
            manifest = manifest_summary(man)
        elif "manifest" in first:
            manifest = _manifest_from_event(first["manifest"].data)
        decision = None
        front: list[int] = []
        if "archive" in first:
            data = first["archive"].data
            try:
                decision = ArchiveDecision.model_validate(
                    {n: data[n] for n in ArchiveDecision.model_fields if n in data})
            except ValidationError:
                warnings.append(f"round {k}: the archive decision does not parse")
            front = [int(r) for r in data.get("front") or []]
        elif k == 0 and archive is not None:
            front = [0] if 0 in archive.front else []
        scores, scores_ci = _scores(reports[k])
        h_scores, h_ci = _scores(heldouts[k])
        before_k = saw
        changes = (score_changes(reports.get(before_k), reports[k], "eval")
                   + score_changes(heldouts.get(before_k), heldouts[k], "heldout")
                   if before_k is not None else [])
        rounds.append(RoundAudit(
            round=k, status=status,
            decided_by=executed.decided_by if executed else ("system" if k == 0 else None),
            saw_round=saw,
            saw=([failure_summary(r, worst_slices) for r in reports[saw].reports.values()]
                 if saw is not None and reports.get(saw) is not None else []),
            proposals=_proposals(k, evs, warnings), candidates=_candidates(k, evs, warnings),
            refusal=first["refusal"].data if "refusal" in first else None,
            fallback=first["fallback"].data if "fallback" in first else None,
            skipped_reason=(first["round_skipped"].data.get("reason")
                            if "round_skipped" in first else None),
            executed=executed, manifest=manifest,
            train=_record(rd / "adapter" / "train_result.json", TrainResult, warnings, run_dir),
            scores=scores, scores_ci=scores_ci,
            heldout_scores=h_scores or None, heldout_ci=h_ci,
            slice_means=({n: {s.slice: s.mean for s in r.slices}
                          for n, r in reports[k].reports.items()} if reports[k] else {}),
            changes=changes, archive=decision, front=front, events=evs))
        if reports[k] is not None and status in ("baseline", "done"):
            evaluated.append(k)
    return AuditReport(
        run_dir=str(run_dir), name=config.name, objectives=list(config.objectives),
        targets={n: o.target for n, o in config.objectives.items()},
        budget=config.budget.max_tokens, log_entries=check.entries if check.ok else len(events),
        log_ok=check.ok, log_problem=check.problem, rounds=rounds, run_events=run_events,
        archive=archive, warnings=warnings)


def only_round(report: AuditReport, k: int) -> AuditReport:
    """The report narrowed to round `k` (ValueError naming the rounds there are)."""
    match = [r for r in report.rounds if r.round == k]
    if not match:
        raise ValueError(f"round {k} is not in {report.run_dir}; rounds: "
                         f"{', '.join(str(r.round) for r in report.rounds) or 'none'}")
    return report.model_copy(update={"rounds": match})


def diff_rounds(report: AuditReport, a: int, b: int) -> RoundDiff:
    """Action differences (dotted paths; the rationale left out) and score differences (f and
    slice means, eval and held-out, with CIs) from round `a` to round `b`."""
    ra, rb = only_round(report, a).rounds[0], only_round(report, b).rounds[0]

    def action_fields(r: RoundAudit) -> dict[str, Any]:
        if r.executed is None:
            return {}
        data = r.executed.action.model_dump(mode="json", exclude={"rationale", "schema_version"})
        return flatten(data)

    fa, fb = action_fields(ra), action_fields(rb)
    action = [ValueChange(path=p, a=fa.get(p), b=fb.get(p)) for p in sorted(set(fa) | set(fb))
              if fa.get(p) != fb.get(p)]
    run_dir = Path(report.run_dir)
    warnings: list[str] = []
    scores: list[ScoreChange] = []
    for split in ("eval", "heldout"):
        scores += score_changes(_eval_report(run_dir / f"round_{a}", split, warnings),
                                _eval_report(run_dir / f"round_{b}", split, warnings), split)
    return RoundDiff(a=a, b=b, action=action, scores=scores)


__all__ = ["build_audit_report", "diff_rounds", "failure_summary", "manifest_summary",
           "only_round", "read_events", "score_changes"]
