"""The run's HTML report: one self-contained file, viewable offline (`mosaic audit --html`, and
`<run_dir>/report.html` at the end of `mosaic run`).

Plots are matplotlib figures inlined as SVG with their text drawn as paths (no font is needed or
fetched); the page is `prompts/reports/run_report.html.j2` with inline CSS and no script. What
it shows: the Pareto front (2-D projections and parallel coordinates), each objective's score
per round with CI bars (eval and held-out), the mixture weights per round (stacked bars), a
per-slice score heatmap by round, the decision timeline (proposal -> verdict -> revision /
refusal -> executed, with authors), and each round's details. Each plot sits in an element with
a fixed id (`PLOT_IDS`), so tests and readers can find it.
"""

from __future__ import annotations

import io
import json
import re
from itertools import combinations
from pathlib import Path
from typing import Any

from mosaic.io import atomic_write_text
from mosaic.schemas import AuditEvent, AuditReport, RoundAudit

TEMPLATE = "reports/run_report.html.j2"
REPORT_FILE = "report.html"
# element id -> what the plot shows
PLOT_IDS = {
    "plot-pareto": "Pareto front, 2-D projections",
    "plot-parallel": "Pareto front, parallel coordinates",
    "plot-scores": "objective scores per round (eval and held-out, 95% CI)",
    "plot-mixture": "mixture weights per round",
    "plot-slices": "per-slice score by round",
}
TIMELINE_ID = "timeline"
SCORE_RANGE = (1.0, 5.0)
FRONT_COLOR = "#d62728"
OTHER_COLOR = "#7f7f7f"


# ---- figures ---------------------------------------------------------------------------------


def _colors(names: list[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22"]
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def _svg(fig: Any, plot_id: str) -> str:
    """The figure as an inline <svg> element: no XML prologue, ids unique to this plot."""
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    # Element ids inside matplotlib's SVG are hashes salted with this, so the plots on one page
    # never share an id; the fixed salt and no date keep the output reproducible.
    with matplotlib.rc_context({"svg.hashsalt": plot_id, "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):].strip()
    # The RDF metadata block names vocabularies by URL; nothing reads it in a page.
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, count=1, flags=re.DOTALL)
    # Every plot's SVG names its groups and glyphs alike ("axes_1", "DejaVuSans-31"): prefix
    # each id and each reference to one, so ids stay unique across the page.
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{plot_id}-{m.group(1)}"', text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{plot_id}-{m.group(1)}"', text)
    return re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{plot_id}-{m.group(1)})", text)


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False,
                             layout="constrained")
    return fig, axes


def _empty(plot_id: str, message: str) -> str:
    fig, axes = _figure(6, 1.6)
    ax = axes[0][0]
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, color="#555555",
            transform=ax.transAxes)
    return _svg(fig, plot_id)


def _evaluated(report: AuditReport) -> list[RoundAudit]:
    return [r for r in report.rounds if r.scores and all(r.scores.get(o) is not None
                                                         for o in report.objectives)]


def pareto_svg(report: AuditReport) -> str:
    """Every evaluated round in each pair of objectives (CI whiskers), the front in red."""
    objs, rounds = report.objectives, _evaluated(report)
    if not rounds:
        return _empty("plot-pareto", "no evaluated round yet")
    front = set(report.archive.front) if report.archive else set()
    pairs = list(combinations(objs, 2)) or [(objs[0], objs[0])]
    fig, axes = _figure(min(4.2 * len(pairs), 13), 4.0, ncols=len(pairs))
    for ax, (x, y) in zip(axes[0], pairs):
        for r in rounds:
            on = r.round in front
            xe, ye = r.scores_ci.get(x), r.scores_ci.get(y)
            sx, sy = r.scores[x], r.scores[y]
            ax.errorbar(sx, sy,
                        xerr=[[sx - xe[0]], [xe[1] - sx]] if xe else None,
                        yerr=[[sy - ye[0]], [ye[1] - sy]] if ye else None,
                        fmt="o", ms=8 if on else 6, color=FRONT_COLOR if on else OTHER_COLOR,
                        ecolor="#bbbbbb", elinewidth=1, capsize=2, zorder=3 if on else 2)
        # One label per position: rounds with the same scores share it ("1,2,3").
        labels: dict[tuple[float, float], list[int]] = {}
        for r in rounds:
            labels.setdefault((round(r.scores[x], 6), round(r.scores[y], 6)), []).append(r.round)
        for (sx, sy), ks in labels.items():
            on = any(k in front for k in ks)
            ax.annotate(",".join(map(str, ks)), (sx, sy), textcoords="offset points",
                        xytext=(6, 5), fontsize=9, color=FRONT_COLOR if on else "#444444")
        pts = sorted((r.scores[x], r.scores[y]) for r in rounds if r.round in front)
        if len(pts) > 1 and x != y:
            ax.plot(*zip(*pts), color=FRONT_COLOR, lw=1, alpha=0.5, zorder=1)
        for name, axis_line in ((x, ax.axvline), (y, ax.axhline)):
            t = report.targets.get(name)
            if t is not None:
                axis_line(t, color="#2ca02c", ls="--", lw=1)
        ax.set_xlabel(f"{x} (eval mean 1-5)")
        ax.set_ylabel(f"{y} (eval mean 1-5)")
        ax.grid(alpha=0.3)
    axes[0][0].set_title("red: Pareto front · whiskers: 95% CI · dashed: targets",
                         fontsize=9, loc="left")
    return _svg(fig, "plot-pareto")


def parallel_svg(report: AuditReport) -> str:
    """One line per evaluated round across the objectives (all on the 1-5 scale)."""
    objs, rounds = report.objectives, _evaluated(report)
    if not rounds:
        return _empty("plot-parallel", "no evaluated round yet")
    front = set(report.archive.front) if report.archive else set()
    fig, axes = _figure(max(5.0, 2.2 * len(objs) + 2), 3.8)
    ax = axes[0][0]
    xs = list(range(len(objs)))
    for r in sorted(rounds, key=lambda r: r.round in front):
        on = r.round in front
        ys = [r.scores[o] for o in objs]
        ax.plot(xs, ys, marker="o", lw=2.5 if on else 1, alpha=1 if on else 0.6,
                color=FRONT_COLOR if on else OTHER_COLOR, zorder=3 if on else 2,
                label=f"round {r.round}" + (" (front)" if on else ""))
    ends: dict[float, list[int]] = {}  # rounds ending at the same score share one label
    for r in rounds:
        ends.setdefault(round(r.scores[objs[-1]], 6), []).append(r.round)
    for y, ks in ends.items():
        on = any(k in front for k in ks)
        ax.annotate("r" + ",".join(map(str, sorted(ks))), (xs[-1], y), textcoords="offset points",
                    xytext=(6, 0), fontsize=8, color=FRONT_COLOR if on else "#444444",
                    va="center")
    for i, o in enumerate(objs):
        ax.axvline(i, color="#333333", lw=0.8)
        t = report.targets.get(o)
        if t is not None:
            ax.plot([i - 0.08, i + 0.08], [t, t], color="#2ca02c", lw=2)
    ax.set_xticks(xs, objs)
    ax.set_xlim(-0.3, len(objs) - 0.5)
    ax.set_ylim(*SCORE_RANGE)
    ax.set_ylabel("eval mean 1-5")
    ax.set_title("each line a round · red: Pareto front · green ticks: targets", fontsize=9,
                 loc="left")
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig, "plot-parallel")


def scores_svg(report: AuditReport) -> str:
    """Per objective: eval and held-out score per round with 95% CI bars, target dashed."""
    objs, rounds = report.objectives, [r for r in report.rounds if r.scores]
    if not rounds:
        return _empty("plot-scores", "no evaluated round yet")
    fig, axes = _figure(min(4.0 * len(objs), 13), 3.4, ncols=len(objs))
    for ax, o in zip(axes[0], objs):
        for split, dx, color in (("eval", -0.08, "#1f77b4"), ("held-out", 0.08, "#ff7f0e")):
            xs, ys, lo, hi = [], [], [], []
            for r in rounds:
                v = r.scores.get(o) if split == "eval" else (r.heldout_scores or {}).get(o)
                if v is None:
                    continue
                ci = (r.scores_ci if split == "eval" else r.heldout_ci).get(o) or (v, v)
                xs.append(r.round + dx)
                ys.append(v)
                lo.append(v - ci[0])
                hi.append(ci[1] - v)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=color, capsize=3, lw=1.2,
                            ms=5, label=split)
        t = report.targets.get(o)
        if t is not None:
            ax.axhline(t, color="#2ca02c", ls="--", lw=1, label="target")
        ax.set_title(o, fontsize=10)
        ax.set_xlabel("round")
        ax.set_xticks([r.round for r in rounds])
        ax.set_ylim(SCORE_RANGE[0] - 0.1, SCORE_RANGE[1] + 0.1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean 1-5 (95% CI)")
    axes[0][0].legend(fontsize=8, loc="lower right")
    return _svg(fig, "plot-scores")


def mixture_svg(report: AuditReport) -> str:
    """Stacked mixture weights of each round's executed action, its author under the bar."""
    objs = report.objectives
    rounds = [r for r in report.rounds if r.round > 0]
    if not rounds:
        return _empty("plot-mixture", "no planned round yet")
    colors = _colors(objs)
    fig, axes = _figure(max(4.5, 0.9 * len(rounds) + 3), 3.4)
    ax = axes[0][0]
    xs = [r.round for r in rounds]
    bottom = [0.0] * len(rounds)
    for o in objs:
        ws = [(r.executed.action.mixture.get(o, 0.0) if r.executed else 0.0) for r in rounds]
        ax.bar(xs, ws, bottom=bottom, color=colors[o], label=o, width=0.7, edgecolor="white")
        bottom = [b + w for b, w in zip(bottom, ws)]
    ax.set_xticks(xs, [f"round {r.round}\n{r.executed.decided_by if r.executed else r.status}"
                       for r in rounds])
    ax.set_ylim(0, 1)
    ax.set_ylabel("mixture weight")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("executed action per round (who decided, under each round)", fontsize=9,
                 loc="left")
    return _svg(fig, "plot-mixture")


def slices_svg(report: AuditReport) -> str:
    """Eval mean per objective/slice (rows) and round (columns), annotated, 1 red - 5 green."""
    import numpy as np

    rounds = [r for r in report.rounds if r.slice_means]
    rows = []
    for o in report.objectives:
        seen: list[str] = []
        for r in rounds:
            for s in r.slice_means.get(o, {}):
                if s not in seen:
                    seen.append(s)
        rows += [(o, s) for s in seen]
    if not rounds or not rows:
        return _empty("plot-slices", "no slice scores yet")
    grid = np.full((len(rows), len(rounds)), np.nan)
    for j, r in enumerate(rounds):
        for i, (o, s) in enumerate(rows):
            v = r.slice_means.get(o, {}).get(s)
            if v is not None:
                grid[i, j] = v
    fig, axes = _figure(max(4.5, 0.8 * len(rounds) + 3.2), max(2.5, 0.3 * len(rows) + 1.2))
    ax = axes[0][0]
    # pcolormesh, not imshow: vector cells, so the SVG holds no embedded raster image.
    im = ax.pcolormesh(np.arange(len(rounds) + 1) - 0.5, np.arange(len(rows) + 1) - 0.5,
                       np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=SCORE_RANGE[0],
                       vmax=SCORE_RANGE[1], edgecolors="white", linewidth=0.5)
    ax.invert_yaxis()
    for i in range(len(rows)):
        for j in range(len(rounds)):
            v = grid[i, j]
            dark = not np.isnan(v) and (v < 1.8 or v > 4.4)  # the colormap's dark ends
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    fontsize=7, color="#ffffff" if dark else "#111111")
    ax.set_xticks(range(len(rounds)), [str(r.round) for r in rounds])
    ax.set_yticks(range(len(rows)), [f"{o} / {s}" for o, s in rows], fontsize=8)
    ax.set_xlabel("round")
    bar = fig.colorbar(im, ax=ax, label="eval mean 1-5", shrink=0.8)
    if bar.solids is not None:
        bar.solids.set_rasterized(False)  # vector, like the rest: no embedded raster image
    return _svg(fig, "plot-slices")


def plot_svgs(report: AuditReport) -> dict[str, str]:
    """Each plot of the report as an inline <svg>, keyed by its element id."""
    return {"plot-pareto": pareto_svg(report), "plot-parallel": parallel_svg(report),
            "plot-scores": scores_svg(report), "plot-mixture": mixture_svg(report),
            "plot-slices": slices_svg(report)}


# ---- the decision timeline ----------------------------------------------------------------------

_STEP_EVENTS = ("proposal", "verdict", "revision", "refusal", "fallback", "round_skipped",
                "candidate", "executed", "archive")


def _step(e: AuditEvent) -> dict[str, str] | None:
    """A timeline step for a decision event (and for any event this module does not know, such
    as a person's, shown by its name, author and data)."""
    d = e.data
    if e.event == "proposal":
        detail = f"#{d.get('revision', 0)} {d.get('planner', '')}".strip()
        kind = "proposal"
    elif e.event == "verdict":
        detail = str(d.get("status"))
        kind = "ok" if d.get("status") in ("ok", "fixable") else "bad"
    elif e.event == "revision":
        n = len(d.get("feedback") or [])
        detail = f"{n} problem{'' if n == 1 else 's'} sent back"
        kind = "revision"
    elif e.event == "refusal":
        detail = f"after {d.get('revisions')} proposals"
        kind = "bad"
    elif e.event == "fallback":
        detail = str(d.get("source"))
        kind = "revision"
    elif e.event == "round_skipped":
        detail = "no valid action"
        kind = "bad"
    elif e.event == "candidate":
        detail = f"#{int(d.get('index', 0)) + 1} {d.get('status')}" + (" · kept" if d.get("kept")
                                                                          else "")
        kind = "bad" if d.get("status") != "done" else ("executed" if d.get("kept") else "ok")
    elif e.event == "executed":
        detail = f"decided by {d.get('decided_by') or e.author}"
        kind = "executed"
    elif e.event == "archive":
        detail = "on front" if d.get("on_front") else "dominated"
        kind = "archive"
    elif e.event in ("manifest", "trained", "scores", "baseline", "run_started",
                     "run_resumed", "run_finished"):
        return None
    else:
        text = json.dumps(d, sort_keys=True, ensure_ascii=False, default=str)
        detail = text if len(text) <= 80 else text[:79] + "…"
        kind = "other"
    return {"event": e.event.replace("_", " "), "author": e.author, "detail": detail,
            "kind": kind, "seq": str(e.seq),
            "author_class": re.sub(r"[^a-z0-9_-]", "", e.author.lower()) or "unknown"}


def timeline(report: AuditReport) -> list[dict[str, Any]]:
    """Per round, its decision steps in log order."""
    out = []
    for r in report.rounds:
        steps = [s for e in r.events if (s := _step(e)) is not None]
        if steps or r.round > 0:
            out.append({"round": r.round, "status": r.status, "steps": steps})
    return out


# ---- the page ---------------------------------------------------------------------------------


def _fmt(v: float | None, ci: Any = None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def page_variables(report: AuditReport) -> dict[str, Any]:
    """What `prompts/reports/run_report.html.j2` renders: the report, its plots (as markup),
    the summary rows, each executed action as JSON and the decision timeline."""
    from markupsafe import Markup

    plots = {k: Markup(v) for k, v in plot_svgs(report).items()}
    front = set(report.archive.front) if report.archive else set()
    summary = []
    for r in report.rounds:
        summary.append({
            "round": r.round, "status": r.status, "decided_by": r.decided_by or "",
            "front": r.round in front,
            "eval": [_fmt(r.scores.get(o), r.scores_ci.get(o)) for o in report.objectives],
            "heldout": [_fmt((r.heldout_scores or {}).get(o), r.heldout_ci.get(o))
                        for o in report.objectives]})
    actions = {r.round: json.dumps(r.executed.action.model_dump(
        mode="json", exclude={"schema_version"}), indent=2, ensure_ascii=False)
        for r in report.rounds if r.executed is not None}
    return {"report": report, "plots": plots, "plot_titles": PLOT_IDS, "summary": summary,
            "actions": actions, "timeline": timeline(report),
            "hypervolume": f"{report.archive.hypervolume:.3f}" if report.archive else "-",
            "front": sorted(front)}


def render_html_report(report: AuditReport) -> str:
    """The report as one HTML page (inline SVG and CSS, no script, nothing fetched)."""
    from mosaic.prompts import render

    return render(TEMPLATE, **page_variables(report))


def write_html_report(report: AuditReport | str | Path, out: str | Path | None = None) -> Path:
    """Write the report (of an AuditReport, or of the run folder given) to `out` (default
    `<run_dir>/report.html`); returns the path."""
    if not isinstance(report, AuditReport):
        from mosaic.tools.audit_report import build_audit_report

        report = build_audit_report(report)
    path = Path(out) if out is not None else Path(report.run_dir) / REPORT_FILE
    atomic_write_text(path, render_html_report(report))
    return path


__all__ = ["PLOT_IDS", "REPORT_FILE", "TIMELINE_ID", "page_variables", "plot_svgs",
           "render_html_report",
           "timeline", "write_html_report"]
