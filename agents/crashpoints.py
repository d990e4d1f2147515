"""Named crash points: a deterministic SIGKILL at a chosen place in the loop, for crash tests.

`MOSAIC_CRASH_AT` holds a comma-separated list of point names; when the loop reaches one of
them the process kills itself with SIGKILL (no cleanup, no flush, no `finally`), exactly as an
out-of-memory kill or a pulled plug would. Points are named `r<round>/<node>/<where>`:

    r<k>/<node>/after    the driver received the node's update (its writes are with LangGraph)
    r<k>/<node>/during   inside a stage node, after its stage wrote its files and before the
                         node logged its audit entry and returned its state update
    r<k>/candidates/<j>  (loop.candidates > 1) candidate j's round finished (its files
                         written), before the next one starts (on Ray: as its result arrives)
    r<k>/candidates/during  every candidate ran, candidates.json written and the kept one
                         placed in the round folder; before any of the node's audit entries

Unset (the normal case) it costs one environment lookup per point. Tests use it to prove that
every window between two nodes resumes into the node that did not complete.
"""

from __future__ import annotations

import os
import signal

ENV = "MOSAIC_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process if `name` is listed in MOSAIC_CRASH_AT."""
    wanted = os.environ.get(ENV)
    if wanted and name in {w.strip() for w in wanted.split(",")}:
        os.kill(os.getpid(), signal.SIGKILL)
