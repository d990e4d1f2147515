"""Figures about the sandbox world for people: statistics tables and the rule judge's agreement
with the world's ground truth (`mosaic world`, `mosaic run`, `mosaic judge-agreement`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mosaic.sandbox.world import World

if TYPE_CHECKING:
    from rich.table import Table

    from mosaic.eval.judge import Judge
    from mosaic.eval.rule_judge import AtomAgreement


def _short(hist: dict[str, int]) -> str:
    """'complexity_1': 12 -> 'c1 12'; 'boundary_3': 4 -> 'b3 4'; '2': 7 -> '2:7'."""
    parts = []
    for k, v in hist.items():
        if "_" in k:
            head, num = k.rsplit("_", 1)
            parts.append(f"{head[0]}{num} {v:,}")
        else:
            parts.append(f"{k}:{v:,}")
    return "  ".join(parts)


def world_tables(world: World) -> list["Table"]:
    """Pools (rows, prompts, tokens, slices, scores), eval/held-out/judge sets (rows, slices,
    turns) and the base corpus (size in tokens), as rich tables."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    s = world.stats
    # The root comes from the config (a "[v2]" in it is a folder name, not markup).
    pools = Table(title=Text(f"Training pools ({world.root}/pools)"), box=box.SIMPLE_HEAD)
    for col, j in (("pool", "left"), ("type", "left"), ("rows", "right"), ("prompts", "right"),
                   ("tokens", "right"), ("mean/max", "right"), ("slices (rows)", "left"),
                   ("score 1..5 (rows)", "left")):
        pools.add_column(col, justify=j)  # type: ignore[arg-type]
    for name, e in s["pools"].items():
        pools.add_row(*map(Text, (name, world.objectives[name], f"{e['rows']:,}", f"{e['prompts']:,}",
                                  f"{e['tokens']:,}", f"{e['tokens_mean']:.0f}/{e['tokens_max']}",
                                  _short(e["slices"]), _short(e["scores"]))))

    sets = Table(title="Eval, held-out and judge-agreement sets", box=box.SIMPLE_HEAD)
    for col, j in (("set", "left"), ("objective", "left"), ("rows", "right"), ("tokens", "right"),
                   ("slices", "left"), ("user turns", "left"), ("controls", "right")):
        sets.add_column(col, justify=j)  # type: ignore[arg-type]
    for split in ("eval", "heldout", "judge"):
        for name, e in s[split].items():
            sets.add_row(*map(Text, (split, name, f"{e['rows']:,}", f"{e['tokens']:,}",
                                     _short(e["slices"]), _short(e["turns"]),
                                     str(e.get("controls", "")))))
        sets.add_section()

    c = s["base_corpus"]
    corpus = Table(title="Base corpus (deliberately vulnerable) and tokenizer", box=box.SIMPLE_HEAD)
    for col in ("conversations", "tokens", "mean/max", "> 300 tokens", "kinds", "user turns",
                "vocab"):
        corpus.add_column(col)
    corpus.add_row(*map(Text, (f"{c['conversations']:,}", f"{c['tokens']:,}",
                               f"{c['tokens_mean']:.0f}/{c['tokens_max']}", str(c["over_300_tokens"]),
                               _short(c["kinds"]), _short(c["turns"]),
                               str(s["tokenizer"]["vocab_size"]))))
    return [pools, sets, corpus]


def measure_judge(world: World, judge: "Judge | None" = None) -> dict[str, list["AtomAgreement"]]:
    """Per-atom agreement of `judge` (default: the rule judge) with ground truth on the world's
    held-out judge-agreement set, per objective."""
    import pyarrow.parquet as pq

    from mosaic.eval.rule_judge import RuleJudge, judge_agreement

    judge = judge or RuleJudge()
    return {name: judge_agreement(judge, typ, pq.read_table(world.judge_path(name)).to_pylist())
            for name, typ in world.objectives.items()}


def agreement_table(results: dict[str, list["AtomAgreement"]], target: float = 0.95) -> "Table":
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"Rule judge vs ground truth on the held-out judge set (target accuracy "
                        f">= {target:.2f})", box=box.SIMPLE_HEAD)
    for col, j in (("objective", "left"), ("channel", "left"), ("atom", "left"), ("n", "right"),
                   ("accuracy", "right"), ("F1", "right"), ("support", "right")):
        table.add_column(col, justify=j)  # type: ignore[arg-type]
    for name, rows in results.items():
        for a in rows:
            acc = f"{a.accuracy:.3f}"
            table.add_row(Text(name), Text(a.channel), Text(a.atom), f"{a.n:,}",
                          Text(acc, style="" if a.accuracy >= target else "red"),
                          "-" if a.f1 is None else f"{a.f1:.3f}", f"{a.support:,}")
        table.add_section()
    return table


def below_target(results: dict[str, list["AtomAgreement"]], target: float = 0.95) -> list[str]:
    return [f"{name}.{a.atom}" for name, rows in results.items() for a in rows if a.accuracy < target]

