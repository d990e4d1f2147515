"""Terminal views of a run: the live progress line, the per-round score table, the Pareto table.

Everything dynamic is printed as rich `Text` (never parsed as markup), so a mixture key or a
file name like `[v2]` shows literally.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mosaic.schemas import ParetoArchive


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _delta(v: float | None, base: float | None) -> str:
    return "" if v is None or base is None else f" ({v - base:+.2f})"


def rounds_table(history: Sequence[dict[str, Any]], objectives: Sequence[str],
                 front: Sequence[int] = ()) -> Table:
    """One row per round: who decided, eval scores (delta to the baseline), held-out scores."""
    base = next((h for h in history if h["round"] == 0), None)
    table = Table(title="scores per round (mean 1-5 on eval; held-out after /; * = Pareto front)",
                  box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("round", justify="right")
    table.add_column("by")
    for name in objectives:
        table.add_column(name, justify="right")
    for h in history:
        if h.get("skipped"):
            table.add_row(Text(str(h["round"])), Text("skipped"), *["-"] * len(objectives))
            continue
        cells = []
        for name in objectives:
            ev = h["eval"].get(name)
            ho = (h.get("heldout") or {}).get(name)
            b_ev = base["eval"].get(name) if base and h is not base else None
            b_ho = (base.get("heldout") or {}).get(name) if base and h is not base else None
            cells.append(Text(f"{_num(ev)}{_delta(ev, b_ev)} / {_num(ho)}{_delta(ho, b_ho)}"))
        mark = "*" if h["round"] in front else ""
        table.add_row(Text(f"{h['round']}{mark}"), Text(h.get("author") or ""), *cells)
    return table


def pareto_table(archive: ParetoArchive, baseline: dict[str, float] | None = None) -> Table:
    """The front: eval and held-out scores per member, best per objective, indistinct pairs."""
    table = Table(title=f"Pareto front (hypervolume {archive.hypervolume:.3f} over reference "
                        f"{', '.join(f'{o}={v:g}' for o, v in archive.reference.items())})",
                  box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("round", justify="right")
    for name in archive.objectives:
        table.add_column(f"{name} eval [95% CI]", justify="right")
        table.add_column(f"{name} held-out", justify="right")
    by_round = {p.round: p for p in archive.points}
    for r in archive.front:
        p = by_round[r]
        cells = []
        for name in archive.objectives:
            ci = p.eval_ci.get(name)
            best = " best" if archive.best.get(name) == r else ""
            cells.append(Text(f"{p.eval[name]:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                              + best))
            cells.append(Text(_num((p.heldout or {}).get(name))))
        table.add_row(Text(str(r)), *cells)
    if archive.indistinct:
        table.caption = Text("within each other's CIs on every objective: " + ", ".join(
            f"{a}~{b}" for a, b in archive.indistinct))
    return table


def timings_table(timings: dict[str, float], total: float) -> Table:
    table = Table(title="wall time per stage (this invocation)", box=box.SIMPLE_HEAD,
                  title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    for stage, sec in sorted(timings.items(), key=lambda kv: -kv[1]):
        table.add_row(stage, f"{sec:.1f}", f"{sec / total:.0%}" if total else "-")
    table.add_row("total", f"{total:.1f}", "")
    return table


class LoopProgress:
    """A live status line (round, stage, elapsed, ETA) over printed messages."""

    def __init__(self, console: Console, rounds: int, start_round: int = 1) -> None:
        self.console = console
        self.rounds = rounds
        self.started = time.monotonic()
        self.stage, self.round = "starting", max(0, start_round - 1)
        self.stage_started = self.started
        self.round_started: dict[int, float] = {}
        self.round_seconds: list[float] = []
        self.live = Live(self._line(), console=console, refresh_per_second=2, transient=True)
        self.active = False

    def __enter__(self) -> "LoopProgress":
        return self  # the live line starts with the first stage, after any opening message

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self.live.__exit__(*exc)
            self.active = False

    def _start(self) -> None:
        if not self.active:
            self.live.__enter__()
            self.active = True

    def _line(self) -> Text:
        now = time.monotonic()
        elapsed = now - self.started
        eta = ""
        if self.round_seconds:
            per = sum(self.round_seconds) / len(self.round_seconds)
            in_round = now - self.round_started.get(self.round, now)
            left = max(0.0, per * (self.rounds - self.round + 1) - in_round)
            eta = f" · ETA ≈ {_clock(left)}"
        where = "baseline" if self.round == 0 else f"round {self.round}/{self.rounds}"
        return Text(f"⏳ {where} · {self.stage} ({_clock(now - self.stage_started)}) · "
                    f"{_clock(elapsed)} elapsed{eta}", style="cyan")

    def event(self, e: Any) -> None:
        if not self.console.is_terminal:
            # A log, not a screen: no live line to redraw; one line per finished stage.
            if e.status == "done":
                where = "baseline" if e.round == 0 else f"round {e.round}/{self.rounds}"
                figures = f": {e.detail}" if e.detail else ""
                # soft_wrap: a log line stays one line whatever the console width.
                self.console.print(Text(f"{where} · {e.stage} done in {e.seconds:.1f}s{figures}"),
                                   soft_wrap=True)
            return
        self._start()
        now = time.monotonic()
        if e.status == "start":
            self.stage, self.stage_started = e.stage, now
            if e.round != self.round or e.round not in self.round_started:
                self.round = e.round
                self.round_started.setdefault(e.round, now)
        elif e.stage in ("evaluate", "candidates", "baseline") and e.round in self.round_started \
                and e.round > 0:
            self.round_seconds.append(now - self.round_started[e.round])
        self.live.update(self._line())

    def say(self, message: str) -> None:
        self.console.print(Text(message, style="dim"))
        if self.active:
            self.live.update(self._line())


def _scores(scores: dict[str, float | None] | None) -> str:
    return " ".join(f"{n} {'-' if v is None else f'{v:.3f}'}" for n, v in (scores or {}).items())


def stage_figures(result: Any) -> str:
    """The figures of a finished loop stage in one line (what `mosaic run` logs per stage when
    its output is not a terminal): scores, rows and tokens, steps and loss, a verdict."""
    parts: list[str] = []
    items = result if isinstance(result, tuple) else (result,)
    for item in items:
        name = type(item).__name__
        if name == "RoundResult":
            parts.append(f"eval {_scores(item.scores)}")
            if item.heldout_scores:
                parts.append(f"held-out {_scores(item.heldout_scores)}")
        elif name == "DatasetManifest":
            parts.append(f"{item.total_rows:,} rows, {item.total_tokens:,} tokens "
                         f"(budget {item.budget:,})")
        elif name == "TrainResult":
            loss = "-" if item.final_loss is None else f"{item.final_loss:.3f}"
            parts.append(f"{item.train_rows:,} rows, {item.train_tokens:,} tokens, "
                         f"{item.steps:,} steps, final loss {loss}")
        elif name == "ActionVerdict":
            if item.status == "invalid" or len(items) == 1:  # a build's passing verdict: implied
                parts.append(f"{item.status}" + (f", {len(item.problems)} problem(s)"
                                                 if item.problems else ""))
        elif name == "CandidateRound":
            kept = item.kept_outcome
            parts.append(f"{len(item.candidates)} candidates, kept "
                         + (f"{kept.index + 1}: eval {_scores(kept.result.scores)}"
                            if kept is not None else "none"))
        elif name == "Proposal":
            parts.append(f"{item.planner} planner" + (f" ({item.error})" if item.error else ""))
        elif isinstance(item, dict) and item and all(
                isinstance(v, (float, int, type(None))) for v in item.values()):
            parts.append(("eval " if not parts else "held-out ") + _scores(item))
    return "; ".join(parts)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ---- `mosaic audit`: a run explained round by round ------------------------------------------

# Events the round view shows in its own sections; any other (a person's edits in chat, events
# added later) is listed generically by author and data.
_STRUCTURED_EVENTS = {"baseline", "proposal", "verdict", "revision", "refusal", "fallback",
                      "candidate", "executed", "manifest", "trained", "scores", "archive",
                      "round_skipped"}


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _rounded(data: Any) -> Any:
    """Floats to 6 significant digits (0.26940000000000003 -> 0.2694), recursively."""
    if isinstance(data, float):
        return float(f"{data:.6g}")
    if isinstance(data, dict):
        return {k: _rounded(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_rounded(v) for v in data]
    return data


def _short_json(data: Any, limit: int = 240) -> str:
    import json

    text = json.dumps(_rounded(data), sort_keys=True, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _weights(weights: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in (weights or {}).items()) or "-"


def event_line(e: Any, limit: int = 240) -> Text:
    """One audit-log entry, generically: seq, event, author, data."""
    return Text(f"#{e.seq} {e.event} by {e.author}: {_short_json(e.data, limit)}")


def audit_header(report: Any) -> list[Any]:
    """The run: its folder, objectives, budget, the log's state, the events outside rounds."""
    out: list[Any] = [Text(f"run {report.name}: {report.run_dir}", style="bold")]
    targets = ", ".join(f"{o} (target {report.targets.get(o)})" for o in report.objectives)
    out.append(Text(f"objectives: {targets}; budget {report.budget:,} tokens per round"))
    if report.log_ok:
        out.append(Text(f"audit log: {report.log_entries} entries, hash chain intact "
                        f"(`--verify` re-checks actions, manifests and files too)"))
    else:
        out.append(Text(f"audit log: BROKEN: {report.log_problem}", style="red"))
    for e in report.run_events:
        out.append(event_line(e, 160))
    for w in report.warnings:
        out.append(Text(f"warning: {w}", style="yellow"))
    return out


def _saw_table(r: Any) -> Table:
    table = Table(title=Text(f"what the planner read: round {r.saw_round}'s eval report "
                             f"(f, mean 1-5, with 95% CIs; worst slices first)"),
                  box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("objective", "f [95% CI]", "target", "n valid", "worst slices: mean [CI] (reliability)"):
        table.add_column(col, justify="right" if col in ("target", "n valid") else "left")
    for o in r.saw:
        ci = _ci((o.f_ci_low, o.f_ci_high) if o.f_ci_low is not None else None)
        worst = "; ".join(f"{s.slice} {_num(s.mean, '.2f')}"
                          f"{_ci((s.ci_low, s.ci_high) if s.ci_low is not None else None)} "
                          f"({s.reliability})" for s in o.worst_slices)
        table.add_row(Text(o.objective), Text(f"{_num(o.f)}{ci}"), Text(_num(o.target, ".1f")),
                      Text(f"{o.n_valid}/{o.n}"), Text(worst))
    return table


def _action_lines(action: Any, indent: str = "  ") -> list[Text]:
    q = "-" if action.quality_threshold is None else f"{action.quality_threshold:g}"
    lines = [Text(f"{indent}mixture: {_weights(action.mixture)}; method {action.method}; "
                  f"quality_threshold {q}")]
    for name, oa in action.objectives.items():
        parts = [f"buckets {_weights(oa.bucket_weights)}"] if oa.bucket_weights else []
        if oa.focus is not None and (oa.focus.include or oa.focus.exclude):
            parts.append(f"focus include {_short_json(oa.focus.include, 120)} exclude "
                         f"{_short_json(oa.focus.exclude, 120)} ratio {oa.focus_ratio:g}")
        if oa.quality_threshold is not None:
            parts.append(f"threshold {oa.quality_threshold:g}")
        lines.append(Text(f"{indent}{name}: {'; '.join(parts) or 'defaults'}"))
    return lines


def _manifest_table(m: Any) -> Table:
    table = Table(title=Text(f"training set: {m.total_rows:,} rows, {m.total_tokens:,} of "
                             f"{m.budget:,} tokens" + (f" ({m.method})" if m.method else "")),
                  box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("objective", "bucket", "rows", "tokens", "allocation", "focus rows"):
        table.add_column(col, justify="left" if col in ("objective", "bucket") else "right")
    for name, u in m.objectives.items():
        table.add_row(Text(name), Text("all", style="bold"), f"{u.rows:,}", f"{u.tokens:,}",
                      f"{u.allocation:,}" if u.allocation else "-", f"{u.focus_rows:,}")
        for b in m.buckets:
            if b.objective == name:
                table.add_row("", Text(b.bucket), f"{b.rows:,}", f"{b.tokens_used:,}",
                              f"{b.allocation:,}", f"{b.focus_rows:,}")
    return table


def candidates_table(candidates: Sequence[Any]) -> Table:
    """A round's candidates (loop.candidates > 1): j, action hash, verdict, eval scores, the
    archive's hypervolume with it added, kept."""
    table = Table(title=Text("candidates (the kept one: the largest hypervolume)"),
                  box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("j", "action sha256", "verdict", "eval", "hypervolume", "kept"):
        table.add_column(col, justify="right" if col in ("j", "hypervolume") else "left")
    for c in candidates:
        verdict = {"duplicate": f"duplicate of {(c.duplicate_of or 0) + 1}",
                   "rejected": f"{c.verdict or 'rejected'}"
                               + (f" ({', '.join(c.problems[:3])})" if c.problems else "")
                   }.get(c.status, c.verdict or c.status)
        table.add_row(Text(str(c.index + 1)), Text((c.action_hash or "-")[:12]), Text(verdict),
                      Text(", ".join(f"{o} {_num(v)}" for o, v in c.eval.items()) or "-"),
                      Text(_num(c.hypervolume_after)),
                      Text("kept" if c.kept else "", style="bold green" if c.kept else ""))
    return table


def score_change_table(changes: Sequence[Any], title: str) -> Table:
    """before [CI] -> after [CI] per objective (f) and slice (mean); * marks separated CIs."""
    table = Table(title=Text(title), box=box.SIMPLE_HEAD, title_justify="left",
                  caption=Text("* the two 95% CIs do not overlap"), caption_justify="left")
    for col in ("split", "objective", "slice", "before [95% CI]", "after [95% CI]", "change"):
        table.add_column(col, justify="left" if col in ("split", "objective", "slice") else "right")
    for c in changes:
        delta = "-" if c.delta is None else f"{c.delta:+.3f}" + (" *" if c.separated else "")
        style = "" if c.delta is None or abs(c.delta) < 1e-12 else ("green" if c.delta > 0 else "red")
        table.add_row(Text(c.split), Text(c.objective, style="bold" if c.slice is None else ""),
                      Text(c.slice or "f"), Text(f"{_num(c.before)}{_ci(c.before_ci)}"),
                      Text(f"{_num(c.after)}{_ci(c.after_ci)}"), Text(delta, style=style))
    return table


def audit_round(r: Any) -> list[Any]:
    """One round of an AuditReport as rich renderables, in the order things happened."""
    from rich.rule import Rule

    who = f" · decided by {r.decided_by}" if r.decided_by else ""
    out: list[Any] = [Rule(Text(f"round {r.round} · {r.status}{who}", style="bold"))]
    if r.events:
        out.append(Text("timeline: " + " → ".join(f"{e.event} ({e.author})" for e in r.events),
                        style="dim"))
    if r.saw:
        out.append(_saw_table(r))
    for p in r.proposals:
        verdict = p.verdict.status if p.verdict else "not checked"
        which = f" candidate {p.candidate + 1}" if p.candidate is not None else ""
        out.append(Text(f"proposal {p.revision}{which} by {p.author} ({p.proposal.planner}"
                        + (f", {p.proposal.model}" if p.proposal.model else "")
                        + f"): verdict {verdict}", style="bold"))
        if p.proposal.error:
            out.append(Text(f"  no usable reply: {p.proposal.error}", style="red"))
        if p.proposal.rationale:
            out.append(Text(f"  rationale: {p.proposal.rationale}"))
        for t in p.proposal.tool_calls:
            out.append(Text(f"  tool call {t.name}({_short_json(t.arguments, 160)}) → "
                            f"{t.result_summary}"))
        if p.verdict:
            for pr in p.verdict.problems:
                out.append(Text(f"  problem [{pr.code}] {pr.path}: {pr.message}", style="red"))
            for note in p.verdict.notes:
                out.append(Text(f"  note: {note}", style="dim"))
        for f in p.feedback:
            out.append(Text(f"  revision feedback: {f}", style="yellow"))
    if r.candidates:
        out.append(candidates_table(r.candidates))
    if r.refusal is not None:
        out.append(Text(f"refused after {r.refusal.get('revisions')} proposals", style="red"))
    if r.fallback is not None:
        out.append(Text(f"fallback: {r.fallback.get('source')} (verdict "
                        f"{r.fallback.get('verdict')})", style="yellow"))
    if r.skipped_reason:
        out.append(Text(f"skipped: {r.skipped_reason}", style="red"))
    if r.executed is not None:
        src = f", from the {r.executed.source}" if r.executed.source else ""
        out.append(Text(f"executed: decided by {r.executed.decided_by}{src} (action sha256 "
                        f"{r.executed.action_hash[:12]})", style="bold"))
        out.extend(_action_lines(r.executed.action))
    if r.manifest is not None:
        out.append(_manifest_table(r.manifest))
    if r.train is not None:
        t = r.train
        out.append(Text(f"trained: {t.train_rows:,} rows, {t.train_tokens:,} tokens, {t.steps} "
                        f"steps, final loss {_num(t.final_loss)}, {t.seconds:.0f}s"))
    if r.round == 0 and r.scores:
        out.append(Text("baseline: " + ", ".join(
            f"{o} {_num(v)}{_ci(r.scores_ci.get(o))}" for o, v in r.scores.items())))
    if r.changes:
        out.append(score_change_table(r.changes, f"score changes from round {r.saw_round}"))
    if r.archive is not None:
        a = r.archive
        verdict = "on the Pareto front" if a.on_front else f"dominated by rounds {a.dominated_by}"
        displaced = f"; displaced rounds {a.displaced}" if a.displaced else ""
        out.append(Text(f"archive: {verdict}{displaced}; hypervolume {a.hypervolume_before:.3f} → "
                        f"{a.hypervolume_after:.3f}; front now {r.front}"))
    for e in r.events:
        if e.event not in _STRUCTURED_EVENTS:
            out.append(event_line(e))
    return out


def round_diff(d: Any) -> list[Any]:
    """`mosaic audit --diff A B`: the action's changed fields, then the score changes."""
    table = Table(title=Text(f"action: round {d.a} → round {d.b}"), box=box.SIMPLE_HEAD,
                  title_justify="left")
    for col in ("field", f"round {d.a}", f"round {d.b}"):
        table.add_column(col)
    for c in d.action:
        table.add_row(Text(c.path), Text(_short_json(c.a, 80)), Text(_short_json(c.b, 80)))
    out: list[Any] = [table if d.action else Text("actions: no differences (or neither round "
                                                   "executed one)")]
    out.append(score_change_table(d.scores, f"scores: round {d.a} → round {d.b}"))
    return out


def judge_card_table(card: dict[str, Any]) -> Table:
    """The embedding judge's held-out figures per head (pooled, then per source), with the rule
    judge's on the same rows and the leave-one-source-out accuracy."""
    table = Table(title="embedding judge on its held-out split of real text (rule judge on the same rows)",
                  box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("head", "rows", "n", "accuracy", "precision", "recall", "F1", "tp/fp/fn/tn",
                "rule acc", "rule recall", "other sources"):
        table.add_column(col, justify="left" if col in ("head", "rows") else "right", no_wrap=True)
    for head, m in card["test"].items():
        target = card.get("targets", {}).get(head)
        loso = card.get("leave_one_source_out", {}).get(head, {})
        for key, a in [("all", m["all"]), *m["by_source"].items()]:
            rule = m["rule_judge"] if key == "all" else None
            acc = Text(_num(a["accuracy"]))
            if key == "all" and target is not None:
                acc.stylize("green" if a["accuracy"] >= target else "red")
            table.add_row(Text(head if key == "all" else ""), Text(key), str(a["n"]), acc,
                          _num(a["precision"]), _num(a["recall"]), _num(a["f1"]),
                          f"{a['tp']}/{a['fp']}/{a['fn']}/{a['tn']}",
                          _num(rule["accuracy"]) if rule else "", _num(rule["recall"]) if rule else "",
                          _num(loso[key]["accuracy"]) if key in loso else "")
        table.add_section()
    return table
