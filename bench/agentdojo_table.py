"""The AgentDojo before/after table: per held-out suite, utility (benign items), utility under
attack and targeted attack success rate with 95% bootstrap CIs, from the evaluator's own
reports, plus what the model's replies contain (how many make at least one valid tool call),
which says whether an attack success rate of 0 means "resisted" or "could not act at all".

    python bench/agentdojo_table.py runs/agentdojo-smoke/manual [--out table.md]

Reads <dir>/baseline/eval/<objective>/{report.json,responses.parquet} and the same under every
other round folder of <dir> (e.g. agentdojo_train); needs the agentdojo extra (calls are
re-parsed with the suite's tool signatures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _fmt(rate: dict | None) -> str:
    if not rate or rate.get("value") is None:
        return "n/a"
    lo, hi = rate["ci"]
    return f"{rate['value']:.2f} [{lo:.2f}, {hi:.2f}] (n={rate['n']})"


def _replies(responses: Path) -> list[tuple[dict, str]]:
    import pyarrow.parquet as pq

    out = []
    for row in pq.read_table(responses).to_pylist():
        msgs = row["messages"]
        reply = msgs[-1]["content"] if msgs and msgs[-1]["role"] == "assistant" else ""
        out.append((json.loads(row["l3_prompt"]), reply))
    return out


def _call_stats(responses: Path) -> dict[str, float]:
    from mosaic.eval import agentdojo as ad

    rows = _replies(responses)
    act = valid_any = valid = invalid = anywhere = 0
    for atoms, reply in rows:
        ref = atoms["agentdojo"]
        params = ad._params(ref["suite"], ref["version"])
        calls, bad = ad.parse_tool_calls(reply, params)
        # A valid call of a suite tool written anywhere (e.g. as `CALL: ...`, copying the
        # transcript) but not in an ACT segment: the model knows the tools, not the format.
        anywhere += bool(ad.parse_tool_calls("ACT: " + reply.replace("ACT:", " "), params)[0])
        act += "act:" in reply.lower()
        valid_any += bool(calls)
        valid += len(calls)
        invalid += bad
    n = len(rows) or 1
    return {"n": len(rows), "act_share": act / n, "valid_call_share": valid_any / n,
            "valid_calls": valid, "invalid_calls": invalid, "call_anywhere_share": anywhere / n}


def table(root: Path) -> str:
    rounds = [root / "baseline"] + sorted(p for p in root.iterdir()
                                          if p.is_dir() and p.name != "baseline")
    lines = ["| suite | model | utility | utility under attack | attack success rate | "
             "replies with ≥1 valid call in ACT (anywhere) | valid / invalid calls |",
             "|---|---|---|---|---|---|---|"]
    for obj_dir in sorted((root / "baseline" / "eval").iterdir()):
        name = obj_dir.name
        for rnd in rounds:
            d = rnd / "eval" / name
            if not (d / "report.json").is_file():
                continue
            b = json.loads((d / "report.json").read_text())["breakdowns"]
            s = _call_stats(d / "responses.parquet")
            label = "base" if rnd.name == "baseline" else f"after {rnd.name}"
            lines.append(f"| {name.removeprefix('agentdojo_')} | {label} | {_fmt(b['utility'])} | "
                         f"{_fmt(b['utility_under_attack'])} | {_fmt(b['attack_success_rate'])} | "
                         f"{s['valid_call_share']:.2f} ({s['call_anywhere_share']:.2f}) | "
                         f"{s['valid_calls']} / {s['invalid_calls']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="folder holding baseline/ and the round folders")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    a = ap.parse_args()
    if not (a.root / "baseline" / "eval").is_dir():
        print(f"error: {a.root}/baseline/eval not found; run `mosaic round` first", file=sys.stderr)
        raise SystemExit(2)
    text = table(a.root)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    text += f"\n\nmachine load when tabulated: {load} ({os.cpu_count()} CPUs)\n"
    print(text)
    if a.out:
        from mosaic.io import atomic_write_text

        atomic_write_text(a.out, text)


if __name__ == "__main__":
    main()
