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
        self._start()
        now = time.monotonic()
        if e.status == "start":
            self.stage, self.stage_started = e.stage, now
            if e.round != self.round or e.round not in self.round_started:
                self.round = e.round
                self.round_started.setdefault(e.round, now)
        elif e.stage in ("evaluate", "baseline") and e.round in self.round_started and e.round > 0:
            self.round_seconds.append(now - self.round_started[e.round])
        self.live.update(self._line())

    def say(self, message: str) -> None:
        self.console.print(Text(message, style="dim"))
        if self.active:
            self.live.update(self._line())


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
