"""The loop's nodes: thin wrappers over `mosaic.tools` that return only the state keys they change.

A node takes the state and LangGraph's `Runtime`, whose `context` is the run's `LoopContext`.
Every node is safe to run again from its start (LangGraph re-runs the node in flight after a
crash or an interrupt): stages reuse their outputs through input-keyed markers, a proposal is
kept in the round folder once made, and audit entries carry ids so a repeat is not logged twice.
Stage nodes pass `crash_point(".../during")` after their stage wrote its files and before they
log and return: the window where a crash leaves files but no record (see agents/crashpoints.py).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from langgraph.runtime import Runtime

from mosaic.agents.context import LoopContext
from mosaic.agents.crashpoints import crash_point
from mosaic.agents.state import HistoryEntry, LoopState
from mosaic.io import atomic_write_json, read_record
from mosaic.schemas import ActionVerdict, DataAction, Proposal


def _ctx(runtime: Runtime[LoopContext]) -> LoopContext:
    ctx = runtime.context
    if not isinstance(ctx, LoopContext):
        raise TypeError(f"the loop graph runs with a LoopContext as its context, got "
                        f"{type(ctx).__name__}; open it through mosaic.agents.runner.LoopDriver "
                        f"(or langgraph.json's make_graph)")
    return ctx


def _round(state: LoopState) -> int:
    return state.get("round", 1)


def _action_json(action: dict[str, Any] | DataAction) -> str:
    data = action.model_dump(mode="json") if isinstance(action, DataAction) else action
    return json.dumps(data, sort_keys=True)


def _action_hash(action: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(_action_json(action).encode()).hexdigest()


def _evaluated(ctx: LoopContext, k: int, *, baseline: bool = False) -> list[Any]:
    """What an evaluation wrote (reports with their slice means, responses, samples, markers),
    which the planner and the report read: recorded by sha256 in the audit log. The baseline
    also wrote its round.json and the archive's first point."""
    rd = ctx.round_dir(k)
    return [rd / "eval", rd / "heldout",
            *([rd / "round.json", ctx.run_dir / "archive.json"] if baseline else [])]


# ---- baseline -------------------------------------------------------------------------------------


def baseline(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    """Round 0: the base model on the eval and held-out sets; the archive's first point."""
    ctx = _ctx(runtime)
    from mosaic.tools.archive import add_point, load_archive, new_archive, point_from_reports, save_archive
    from mosaic.tools.run_round import run_baseline

    result, seconds = ctx.timed("baseline", 0, lambda: run_baseline(
        ctx.config, ctx.round_dir(0), heldout=True, progress=ctx.say, base_model=ctx.base_model))
    crash_point("r0/baseline/during")
    archive = load_archive(ctx.run_dir) or new_archive(list(ctx.config.objectives))
    point = point_from_reports(0, ctx.eval_report(0), ctx.eval_report(0, "heldout"),
                               author="system")
    archive, decision = add_point(archive, point)
    save_archive(archive, ctx.run_dir)
    ctx.audit.append("baseline", {"eval": result.scores, "heldout": result.heldout_scores,
                                  "seconds": round(seconds, 2)},
                     round=0, event_id="r0/baseline", files=_evaluated(ctx, 0, baseline=True))
    entry: HistoryEntry = {"round": 0, "action": None, "author": "system", "eval": point.eval,
                           "heldout": point.heldout, "skipped": False}
    return {"round": 1, "revision": 0, "history": [entry], "feedback": [], "proposal": None,
            "verdict": None, "action": None, "author": None}


# ---- plan -> check -> revise / refuse -------------------------------------------------------------


def _proposal_key(ctx: LoopContext, state: LoopState) -> str:
    """The proposal's name in the round: its revision, and with loop.candidates > 1 which
    candidate of that revision it is (`<revision>-<j>`)."""
    rev = state.get("revision", 0)
    if ctx.config.loop.candidates == 1:
        return str(rev)
    return f"{rev}-{state.get('candidate', 0)}"


def plan(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    """Ask the planner for this round's action, or with loop.candidates > 1 for the next of the
    round's candidates (kept in the round folder once made)."""
    ctx = _ctx(runtime)
    k, rev = _round(state), state.get("revision", 0)
    key = _proposal_key(ctx, state)
    path = ctx.round_dir(k) / "proposals" / f"{key}.json"
    if path.is_file():
        proposal = read_record(path, Proposal)
    else:
        proposal, seconds = ctx.timed("plan", k, lambda: ctx.planner.propose(ctx.plan_context(state)))
        atomic_write_json(path, proposal)
    extra = {"candidate": state.get("candidate", 0)} if ctx.config.loop.candidates > 1 else {}
    ctx.audit.append("proposal", {**proposal.model_dump(mode="json", exclude={"schema_version"}),
                                  "revision": rev, **extra},
                     round=k, author="planner", event_id=f"r{k}/proposal/{key}", files=[path])
    return {"proposal": proposal.model_dump(mode="json")}


def check(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    """The proposal against the schema, the pools, the budget and the limits."""
    ctx = _ctx(runtime)
    k, rev = _round(state), state.get("revision", 0)
    raw = (state.get("proposal") or {}).get("raw", "")
    verdict, _ = ctx.timed("check", k, lambda: ctx.check(state, raw))
    ctx.audit.append("verdict", verdict.model_dump(mode="json", exclude={"schema_version"}),
                     round=k, author="system", event_id=f"r{k}/verdict/{_proposal_key(ctx, state)}")
    n = ctx.config.loop.candidates
    if n > 1:
        # One of the round's candidates: recorded; the revision moves on after the last one.
        j = state.get("candidate", 0)
        entry = {"index": j, "raw": raw, "verdict": verdict.model_dump(mode="json"),
                 "error": (state.get("proposal") or {}).get("error")}
        earlier = [c for c in state.get("candidates") or [] if c["index"] < j]
        update = {"verdict": verdict.model_dump(mode="json"), "candidates": [*earlier, entry]}
        if j + 1 < n:
            return {**update, "candidate": j + 1}
        return {**update, "candidate": 0, "revision": rev + 1}
    update: dict[str, Any] = {"verdict": verdict.model_dump(mode="json"), "revision": rev + 1}
    if verdict.ok and verdict.action is not None:
        update.update(action=verdict.action.model_dump(mode="json"), author="planner")
    return update


def _passing(candidate: dict[str, Any]) -> ActionVerdict | None:
    verdict = ActionVerdict.model_validate(candidate["verdict"])
    return verdict if verdict.ok and verdict.action is not None else None


def after_check(state: LoopState, runtime: Runtime[LoopContext]
                ) -> Literal["execute", "revise", "refuse", "candidate", "candidates"]:
    ctx = _ctx(runtime)
    n = ctx.config.loop.candidates
    if n > 1:
        checked = state.get("candidates") or []
        if len(checked) < n:
            return "candidate"  # plan the round's next candidate
        if any(_passing(c) for c in checked):
            return "candidates"
    elif ActionVerdict.model_validate(state["verdict"]).ok:
        return "execute"
    # max_revisions revisions after the first proposal; then the proposal is refused.
    if state.get("revision", 1) <= ctx.config.planner.max_revisions:
        return "revise"
    return "refuse"


def revise(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    """Send the verdict's problems back to the planner, verbatim."""
    ctx = _ctx(runtime)
    from mosaic.tools.validate_action import format_problems

    k, rev = _round(state), state.get("revision", 1)

    def problems(verdict: ActionVerdict, error: str | None) -> list[str]:
        lines = [f"[{p.code}] {p.path}: {p.message}" + (f" (hint: {p.hint})" if p.hint else "")
                 for p in verdict.problems]
        return [f"no usable reply: {error}", *lines] if error else lines

    if ctx.config.loop.candidates > 1:
        # Every candidate of the revision failed: each one's problems, named by candidate.
        feedback, texts = [], []
        for c in state.get("candidates") or []:
            verdict = ActionVerdict.model_validate(c["verdict"])
            feedback += [f"candidate {c['index'] + 1}: {line}"
                         for line in problems(verdict, c.get("error"))]
            texts.append(f"candidate {c['index'] + 1}: {format_problems(verdict)}")
        ctx.audit.append("revision", {"revision": rev, "feedback": feedback,
                                      "verdict": "\n".join(texts)},
                         round=k, author="system", event_id=f"r{k}/revision/{rev}")
        return {"feedback": feedback, "candidates": [], "candidate": 0}
    verdict = ActionVerdict.model_validate(state["verdict"])
    feedback = problems(verdict, (state.get("proposal") or {}).get("error"))
    ctx.audit.append("revision", {"revision": rev, "feedback": feedback,
                                  "verdict": format_problems(verdict)},
                     round=k, author="system", event_id=f"r{k}/revision/{rev}")
    return {"feedback": feedback}


def refuse(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    """The planner's proposals stayed invalid: refuse them and fall back to the heuristic
    planner, or failing that to the last valid action; with neither, skip the round."""
    ctx = _ctx(runtime)
    k = _round(state)
    ctx.audit.append("refusal", {"revisions": state.get("revision", 0),
                                 "last_problems": (state.get("verdict") or {}).get("problems")},
                     round=k, author="system", event_id=f"r{k}/refusal")
    candidates: list[tuple[str, str]] = []
    if ctx.fallback is not ctx.planner:
        proposal = ctx.fallback.propose(ctx.plan_context({**state, "feedback": []}))
        candidates.append((f"{ctx.fallback.name} planner", proposal.raw))
    previous = ctx.previous_action(state)
    if previous is not None:
        candidates.append(("last valid action", _action_json(previous)))
    for source, raw in candidates:
        verdict = ctx.check(state, raw)
        if verdict.ok and verdict.action is not None:
            ctx.audit.append("fallback", {"source": source, "raw": raw,
                                          "verdict": verdict.status},
                             round=k, author="fallback", event_id=f"r{k}/fallback")
            return {"verdict": verdict.model_dump(mode="json"),
                    "action": verdict.action.model_dump(mode="json"), "author": "fallback"}
    ctx.audit.append("round_skipped", {"reason": "no valid action: the planner's proposals were "
                                                 "refused and no fallback passed the check",
                                       "tried": [s for s, _ in candidates]},
                     round=k, author="system", event_id=f"r{k}/skipped")
    return {"action": None, "author": None}


def after_refuse(state: LoopState) -> Literal["execute", "skip"]:
    return "execute" if state.get("action") else "skip"


# ---- review: a person's pause before an action executes (mosaic chat) --------------------------


def review_payload(state: LoopState, ctx: LoopContext) -> dict[str, Any]:
    """What a person sees at a pause: the failure summary the planner saw, the action, who
    decided it and why, the standing limits, and the answer to their last edit."""
    history = [h for h in state.get("history") or [] if not h.get("skipped")]
    latest = history[-1]["round"] if history else 0
    report = ctx.eval_report(latest)
    summary = {}
    for name, rep in (report.reports.items() if report else ()):
        worst = sorted(rep.slices, key=lambda s: -s.need)[:3]
        summary[name] = {"f": rep.f, "ci": [rep.f_ci_low, rep.f_ci_high], "target": rep.target,
                         "worst_slices": [{"slice": s.slice, "mean": s.mean,
                                           "ci": [s.ci_low, s.ci_high], "n": s.n_valid,
                                           "reliability": s.reliability, "need": s.need}
                                          for s in worst]}
    return {"round": _round(state), "rounds": ctx.rounds, "summary_round": latest,
            "summary": summary, "action": state.get("action"), "author": state.get("author"),
            "rationale": (state.get("proposal") or {}).get("rationale")
            or (state.get("action") or {}).get("rationale", ""),
            "verdict_notes": (state.get("verdict") or {}).get("notes", []),
            "limits": state.get("human_limits") or {}, "notes": state.get("notes") or [],
            "message": state.get("review_message")}


def review(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    """Pause for a person before the action executes (only in chat); apply what they decide."""
    ctx = _ctx(runtime)
    if not ctx.review:
        return {"decision": "execute"}
    from langgraph.types import interrupt

    answer = interrupt(review_payload(state, ctx))
    return decide(state, ctx, answer if isinstance(answer, dict) else {})


def decide(state: LoopState, ctx: LoopContext, answer: dict[str, Any]) -> dict[str, Any]:
    """A person's edits at a pause, all or nothing: notes, standing limits (re-checking the
    action under them), action edits (checked like a planner's proposal), then approve or
    reject. An edit that fails changes nothing and the message says why. Each part is logged
    with author human: human_limits carries the whole new set of limits, so an audit can
    re-check later actions against what bound them."""
    from mosaic.agents.chat import ACTION_OPS, LIMIT_OPS, apply_action_edit, apply_limit_edit
    from mosaic.schemas import ChatEdit
    from mosaic.tools.validate_action import format_problems

    k, seq = _round(state), state.get("human_seq", 0)
    edits = [ChatEdit.model_validate(e) for e in answer.get("edits") or []]
    command = answer.get("text") or "; ".join(e.command() for e in edits)

    # The answer's digest is in the id: a crash after logging replays the same answer as a
    # no-op, while a different answer given after the crash is logged as what it is.
    answer_id = _action_hash({"edits": answer.get("edits") or [], "text": command})[:12]

    def log(event: str, part: str, data: dict[str, Any]) -> None:
        ctx.audit.append(event, {**data, "command": command}, round=k, author="human",
                         event_id=f"r{k}/human/{seq}/{answer_id}/{part}")

    def stay(message: str) -> dict[str, Any]:
        return {"decision": "review", "review_message": message, "human_seq": seq + 1}

    old_limits = dict(state.get("human_limits") or {})
    limits, notes = dict(old_limits), list(state.get("notes") or [])
    for e in edits:
        if e.op in LIMIT_OPS:
            limits, problems = apply_limit_edit(limits, e, list(ctx.config.objectives))
            if problems:
                log("human_limits", "limits", {"accepted": False, "edit": e.model_dump(),
                                               "problems": problems})
                return stay(f"{e.command()} refused, nothing changed: " + "; ".join(problems))
        elif e.op == "note":
            notes.append(e.text or "")
    action = state.get("action") or {}
    action_edits = [e for e in edits if e.op in ACTION_OPS]
    for e in action_edits:
        action = apply_action_edit(action, e)
    verdict = ctx.check({**state, "human_limits": limits}, _action_json(action)) if action else None
    if action_edits and (verdict is None or not verdict.ok or verdict.action is None):
        text = format_problems(verdict) if verdict else "no action to edit"
        log("human_edit", "edit", {"accepted": False, "edits": [e.model_dump() for e in action_edits],
                                   "problems": text})
        return stay("the edit was refused by the check, nothing changed:\n" + text)

    update: dict[str, Any] = {"human_limits": limits, "notes": notes, "human_seq": seq + 1,
                              "review_message": None}
    if limits != old_limits:
        log("human_limits", "limits", {"accepted": True, "limits": limits,
                                       "edits": [e.model_dump() for e in edits if e.op in LIMIT_OPS]})
    if notes != (state.get("notes") or []):
        log("human_edit", "note", {"accepted": True, "notes": notes})
    if action_edits:
        assert verdict is not None and verdict.action is not None
        log("human_edit", "edit", {"accepted": True, "edits": [e.model_dump() for e in action_edits],
                                   "action": verdict.action.model_dump(mode="json"),
                                   "verdict": verdict.status})
        update.update(action=verdict.action.model_dump(mode="json"), author="human",
                      verdict=verdict.model_dump(mode="json"))
    elif limits != old_limits and verdict is not None and not verdict.ok:
        # The proposal breaks the new limits: the planner proposes again under them.
        return {**update, "decision": "plan", "action": None, "revision": 0,
                "feedback": ["a person set new limits and the proposal breaks them:",
                             format_problems(verdict)]}
    reject = next((e for e in edits if e.op == "reject"), None)
    if reject is not None:
        log("human_decision", "decision", {"decision": "reject", "reason": reject.text})
        return {**update, "decision": "plan", "action": None, "revision": 0,
                "feedback": [f"a person rejected the proposal: {reject.text}"]}
    if any(e.op == "approve" for e in edits):
        log("human_decision", "decision", {"decision": "approve"})
        return {**update, "decision": "execute"}
    return {**update, "decision": "review",
            "review_message": ("applied: " + command) if edits else "nothing to apply"}


def after_review(state: LoopState) -> Literal["execute", "plan", "review"]:
    return state.get("decision") or "execute"  # type: ignore[return-value]


# ---- execute: build -> train -> evaluate -> archive ---------------------------------------------


def build(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    ctx = _ctx(runtime)
    from mosaic.tools.run_round import dataset_stage

    k = _round(state)
    action = state["action"]
    _log_executed(ctx, k, action, state.get("author"))
    (verdict, manifest), seconds = ctx.timed("build", k, lambda: dataset_stage(
        ctx.config, _action_json(action), ctx.round_dir(k), round_index=k,
        previous_action=ctx.previous_action(state), progress=ctx.say))
    crash_point(f"r{k}/build/during")
    if manifest is None:  # cannot happen after a passing check: the same rules, stricter limits
        raise RuntimeError(f"round {k}: the build rejected an action the check passed: "
                           f"{[p.message for p in verdict.problems]}")
    _log_manifest(ctx, k, manifest, seconds)
    return {}


def train(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    ctx = _ctx(runtime)
    from mosaic.schemas import DatasetManifest
    from mosaic.tools.run_round import train_stage

    k = _round(state)
    manifest = read_record(ctx.round_dir(k) / "dataset" / "manifest.json", DatasetManifest)
    result, seconds = ctx.timed("train", k, lambda: train_stage(
        ctx.config, ctx.round_dir(k), manifest, round_index=k, progress=ctx.say, bars=False,
        base_model=ctx.base_model))
    crash_point(f"r{k}/train/during")
    _log_trained(ctx, k, result, seconds)
    return {}


def evaluate(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    ctx = _ctx(runtime)
    from mosaic.tools.run_round import evaluate_stage

    k = _round(state)
    (scores, heldout), seconds = ctx.timed("evaluate", k, lambda: evaluate_stage(
        ctx.config, ctx.round_dir(k), round_index=k, adapter_dir=ctx.round_dir(k) / "adapter",
        heldout=ctx.config.loop.heldout_every_round, progress=ctx.say, base_model=ctx.base_model))
    crash_point(f"r{k}/evaluate/during")
    _log_scores(ctx, k, scores, heldout, seconds)
    return {}


# What the stages of an executed round log (the build, train and evaluate nodes, or for the
# kept candidate the candidates node); `seconds` None: the stage's time is not its own entry's.


def _log_executed(ctx: LoopContext, k: int, action: dict[str, Any], author: str | None,
                  **extra: Any) -> None:
    ctx.audit.append("executed", {"action": action, "action_hash": _action_hash(action),
                                  "decided_by": author, **extra},
                     round=k, author=author or "planner", event_id=f"r{k}/executed")


def _seconds(seconds: float | None) -> dict[str, float]:
    return {} if seconds is None else {"seconds": round(seconds, 2)}


def _log_manifest(ctx: LoopContext, k: int, manifest: Any, seconds: float | None) -> None:
    from mosaic.tools.run_round import DATASET_MARKER

    per_objective: dict[str, dict[str, int]] = {}
    for b in manifest.buckets:
        o = per_objective.setdefault(b.objective, {"rows": 0, "tokens": 0, "focus_rows": 0})
        o["rows"] += b.rows
        o["tokens"] += b.tokens_used
        o["focus_rows"] += b.focus_rows
    ctx.audit.append("manifest", {"output_hash": manifest.output_hash,
                                  "total_tokens": manifest.total_tokens,
                                  "total_rows": manifest.total_rows, "budget": manifest.budget,
                                  "per_objective": per_objective,
                                  "buckets": {f"{b.objective}/{b.bucket}": b.tokens_used
                                              for b in manifest.buckets},
                                  **_seconds(seconds)},
                     round=k, event_id=f"r{k}/manifest",
                     files=[ctx.round_dir(k) / n for n in ("action.json", "verdict.json", "dataset",
                                                           DATASET_MARKER)])


def _log_trained(ctx: LoopContext, k: int, result: Any, seconds: float | None) -> None:
    from mosaic.tools.run_round import ADAPTER_MARKER

    ctx.audit.append("trained", {"train_tokens": result.train_tokens, "rows": result.train_rows,
                                 "steps": result.steps, "final_loss": result.final_loss,
                                 **_seconds(seconds)},
                     round=k, event_id=f"r{k}/trained",
                     files=[ctx.round_dir(k) / "adapter", ctx.round_dir(k) / ADAPTER_MARKER])


def _log_scores(ctx: LoopContext, k: int, scores: dict[str, float | None],
                heldout: dict[str, float | None] | None, seconds: float | None) -> None:
    ctx.audit.append("scores", {"eval": scores, "heldout": heldout, **_seconds(seconds)},
                     round=k, event_id=f"r{k}/scores", files=_evaluated(ctx, k))


# ---- candidates: several actions trained side by side, the archive's best kept -----------------


def candidates(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    """loop.candidates > 1: every candidate that passed the check is built, trained and
    evaluated in round_<k>/candidates/<j>/ (`run_candidates`: Ray tasks side by side, or in
    turn), the one adding most to the archive is kept and placed in the round folder, and the
    audit log gets one entry per candidate and the kept one's executed/manifest/trained/scores,
    as any round's. The archive node then adds the kept point."""
    ctx = _ctx(runtime)
    from mosaic.schemas import DatasetManifest
    from mosaic.tools.archive import load_archive
    from mosaic.tools.candidates import (CANDIDATES_FILE, Candidate, candidate_dir, keep_candidate,
                                         run_candidates)

    k = _round(state)
    rd = ctx.round_dir(k)
    checked = state.get("candidates") or []
    proposed: list[Candidate] = []
    hashes: list[str | None] = []
    for c in checked:
        verdict = _passing(c)
        if verdict is not None and verdict.action is not None:
            # Built from the checked action, as the build node builds a single round's.
            action = verdict.action.model_dump(mode="json")
            proposed.append(Candidate(action=_action_json(action)))
            hashes.append(_action_hash(action))
        else:
            refused = ActionVerdict.model_validate(c["verdict"])
            proposed.append(Candidate(action=c["raw"], refused=refused))
            hashes.append(_action_hash(refused.action.model_dump(mode="json"))
                          if refused.action is not None else None)
    record, seconds = ctx.timed("candidates", k, lambda: run_candidates(
        ctx.config, proposed, rd, round_index=k, archive=load_archive(ctx.run_dir),
        previous_action=ctx.previous_action(state),
        heldout=ctx.config.loop.heldout_every_round, progress=ctx.say,
        # A kill between two candidates: the resumed node retrains neither (their markers).
        on_candidate=lambda j, result: crash_point(f"r{k}/candidates/{j}")))
    kept = record.kept_outcome
    if kept is None or kept.result.action is None or kept.result.manifest is None \
            or kept.result.train is None:
        # cannot happen: the check passed at least one, and the build checks by the same rules
        raise RuntimeError(f"round {k}: no candidate ran although the check passed "
                           f"{sum(_passing(c) is not None for c in checked)}; see "
                           f"{rd / CANDIDATES_FILE}")
    keep_candidate(rd, kept.index)
    crash_point(f"r{k}/candidates/during")
    for o in record.candidates:
        cd = candidate_dir(rd, o.index)
        action_hash = (_action_hash(o.result.action.model_dump(mode="json"))
                       if o.result.action is not None else hashes[o.index])
        verdict = o.result.verdict
        ctx.audit.append("candidate", {
            "index": o.index, "status": o.status, "action_hash": action_hash,
            "verdict": checked[o.index]["verdict"]["status"],
            "problems": [p.code for p in verdict.problems] if verdict else [],
            "duplicate_of": o.duplicate_of, "eval": o.result.scores,
            "heldout": o.result.heldout_scores,
            "hypervolume_after": o.decision.hypervolume_after if o.decision else None,
            "on_front": o.decision.on_front if o.decision else None, "kept": o.kept,
            "round_dir": cd.relative_to(ctx.run_dir).as_posix() if o.status == "done" else None},
            round=k, author=o.author, event_id=f"r{k}/candidate/{o.index}",
            files=[rd / CANDIDATES_FILE, *((cd / "eval", cd / "heldout",
                                            cd / "dataset" / "manifest.json",
                                            cd / "adapter" / "train_result.json")
                                           if o.status == "done" else ())])
    action = kept.result.action.model_dump(mode="json")
    _log_executed(ctx, k, action, "planner", candidate=kept.index)
    _log_manifest(ctx, k, read_record(rd / "dataset" / "manifest.json", DatasetManifest), None)
    _log_trained(ctx, k, kept.result.train, None)
    _log_scores(ctx, k, kept.result.scores, kept.result.heldout_scores, seconds)
    return {"action": action, "author": "planner",
            "verdict": (kept.result.verdict or ActionVerdict(status="ok")).model_dump(mode="json")}


def archive(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    """Add the round to the Pareto archive; move on to the next round."""
    ctx = _ctx(runtime)
    from mosaic.tools.archive import add_point, load_archive, new_archive, point_from_reports, save_archive

    k = _round(state)
    action, author = state["action"], state.get("author") or "planner"
    store = load_archive(ctx.run_dir) or new_archive(list(ctx.config.objectives))
    point = point_from_reports(k, ctx.eval_report(k), ctx.eval_report(k, "heldout"),
                               action_hash=_action_hash(action),
                               adapter=str(ctx.round_dir(k) / "adapter"), author=author)
    _write_round_summary(state, ctx, point)
    guards = (state.get("human_limits") or {}).get("guards") or {}
    violated = {n: {"score": point.eval[n], "guard": g} for n, g in sorted(guards.items())
                if point.eval.get(n, float("inf")) < g}
    entry: HistoryEntry = {"round": k, "action": action, "author": author, "eval": point.eval,
                           "heldout": point.heldout, "skipped": False, "accepted": not violated}
    if violated:
        # A person said never to accept such a round: it stays out of the archive, and the
        # planner hears why.
        ctx.audit.append("archive", {"round": k, "accepted": False, "violated": violated,
                                     "front": store.front},
                         round=k, event_id=f"r{k}/archive",
                         files=[ctx.round_dir(k) / "round.json"])
        why = ", ".join(f"{n} {v['score']:.3f} < guard {v['guard']:g}" for n, v in violated.items())
        return _next_round(state, entry, feedback=[f"round {k} was not accepted: {why}"])
    store, decision = add_point(store, point)
    save_archive(store, ctx.run_dir)
    crash_point(f"r{k}/archive/during")
    ctx.audit.append("archive", {**decision.model_dump(mode="json"), "accepted": True,
                                 "front": store.front},
                     round=k, event_id=f"r{k}/archive",
                     files=[ctx.run_dir / "archive.json", ctx.round_dir(k) / "round.json"])
    return _next_round(state, entry)


def _write_round_summary(state: LoopState, ctx: LoopContext, point: Any) -> None:
    """round.json: the round's RoundResult (verdict, action, manifest, training, scores)."""
    from mosaic.schemas import DatasetManifest, RoundResult, TrainResult
    from mosaic.tools.run_round import ROUND_FILE

    k = _round(state)
    rd = ctx.round_dir(k)
    result = RoundResult(
        round=k, status="done", verdict=ActionVerdict.model_validate(state["verdict"]),
        action=DataAction.model_validate(state["action"]),
        manifest=read_record(rd / "dataset" / "manifest.json", DatasetManifest),
        train=read_record(rd / "adapter" / "train_result.json", TrainResult),
        scores=point.eval, heldout_scores=point.heldout)
    atomic_write_json(rd / ROUND_FILE, result)


def skip(state: LoopState) -> dict[str, Any]:
    k = _round(state)
    entry: HistoryEntry = {"round": k, "action": None, "author": "system", "eval": {},
                           "heldout": None, "skipped": True}
    return _next_round(state, entry)


def _next_round(state: LoopState, entry: HistoryEntry,
                feedback: list[str] | None = None) -> dict[str, Any]:
    history = [h for h in state.get("history") or [] if h["round"] != entry["round"]]
    update: dict[str, Any] = {
        "history": [*history, entry], "round": entry["round"] + 1, "revision": 0,
        "proposal": None, "verdict": None, "feedback": feedback or [], "action": None,
        "author": None, "decision": None, "review_message": None, "human_seq": 0}
    if "candidates" in state:  # loop.candidates > 1: the next round plans its own
        update.update(candidates=[], candidate=0)
    return update


def after_round(state: LoopState, runtime: Runtime[LoopContext]) -> Literal["plan", "finish"]:
    # The driver's target, not the state's: a resume may raise or lower loop.rounds.
    return "plan" if state.get("round", 1) <= _ctx(runtime).rounds else "finish"


def finish(state: LoopState, runtime: Runtime[LoopContext]) -> dict[str, Any]:
    ctx = _ctx(runtime)
    from mosaic.tools.archive import load_archive

    store = load_archive(ctx.run_dir)
    rounds = ctx.rounds
    ctx.audit.append("run_finished", {"rounds": rounds,
                                      "front": store.front if store else [],
                                      "hypervolume": store.hypervolume if store else None},
                     event_id=f"finished/{rounds}/{ctx.opening}")
    # The one place a run becomes finished: drivers read this flag, never an empty `next`
    # (LangGraph leaves `next` empty too when a step's writes are saved but its checkpoint not).
    return {"finished": True, "rounds": rounds}
