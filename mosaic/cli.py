"""The `mosaic` command line: a thin typer layer over library functions (tests call those).

Heavy imports (torch, transformers, datasets) happen inside commands, so `mosaic --help`
answers instantly.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(
    name="mosaic",
    help="MOSAIC: closed-loop, budget-constrained curation of alignment training data.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

DEFAULT_CONFIG = Path("configs/sandbox.yaml")


def _load(config: Path):
    from mosaic.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@app.command("schema")
def schema_cmd(out: Path = typer.Option(None, help="Write the JSON schemas here instead of stdout.")) -> None:
    """Export the JSON Schemas of MOSAIC's records (data action, failure report, ...)."""
    import json

    from mosaic.io import atomic_write_json
    from mosaic.schemas import json_schemas

    schemas = json_schemas()
    if out:
        atomic_write_json(out, schemas)
        console.print(f"wrote {len(schemas)} schemas to {out}")
    else:
        typer.echo(json.dumps(schemas, indent=2))


@app.command("config")
def config_cmd(config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML).")) -> None:
    """Validate a config and print it fully resolved (defaults and MOSAIC__ overrides applied)."""
    from mosaic.config import dump_config

    typer.echo(dump_config(_load(config)))


_TULU_IF_FILE = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
                 / "tulu3_if_constraints.jsonl").resolve()


@app.command("ifeval-coverage")
def ifeval_coverage_cmd(
    file: Path = typer.Argument(_TULU_IF_FILE,
                                help="IFEval-format JSONL (prompt, instruction_id_list, kwargs)."),
) -> None:
    """Per IFEval instruction id in FILE: count, underspecified count, supported. Exit 1 if any id
    is unsupported."""
    from rich import box
    from rich.table import Table

    from mosaic.eval.ifeval_data import IFEvalDataError, file_coverage

    try:
        report = file_coverage(file)
    except (FileNotFoundError, IFEvalDataError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    table = Table(title=f"IFEval checker coverage: {file} ({report.n_prompts:,} prompts)",
                  box=box.SIMPLE_HEAD)
    for col, justify in (("instruction id", "left"), ("count", "right"),
                         ("underspecified", "right"), ("checkable", "right"), ("supported", "center")):
        table.add_column(col, justify=justify)
    for r in report.rows:
        table.add_row(r.instruction_id, f"{r.count:,}", f"{r.underspecified:,}", f"{r.checkable:,}",
                      "yes" if r.supported else "[red]NO[/red]")
    table.add_section()
    n_ids = len(report.rows)
    table.add_row(f"total ({n_ids} ids, {n_ids - len(report.unsupported_ids)} supported)",
                  f"{report.n_constraints:,}", f"{report.n_underspecified:,}",
                  f"{report.n_checkable:,}", "yes" if not report.unsupported_ids else "[red]NO[/red]")
    # Full instruction ids matter more than fitting an 80-column pipe.
    Console(width=max(console.width, 100)).print(table)
    if report.absent_supported_ids:
        console.print(f"supported ids not in this file: {', '.join(report.absent_supported_ids)}")
    if report.unsupported_ids:
        console.print(f"[red]unsupported ids: {', '.join(report.unsupported_ids)}[/red]")
        raise typer.Exit(1)


def print_eval_report(report, out: Console | None = None) -> None:
    """Per objective: f, then one row per slice (n, mean, 95% CI, fail rate, need, reliability)."""
    from rich import box
    from rich.table import Table

    out = out or console

    def num(v: float | None, fmt: str = ".2f") -> str:
        return "-" if v is None else format(v, fmt)

    for name, rep in report.reports.items():
        f = num(rep.f, ".3f")
        failed = report.judge_failures.get(name, 0)
        extra = f", [red]{failed} not judged[/red]" if failed else ""
        table = Table(title=f"{name} ({rep.objective_type}): f = {f}  "
                            f"(n {rep.n}, valid {rep.n_valid}, target {num(rep.target, '.1f')}{extra})",
                      box=box.SIMPLE_HEAD, title_justify="left")
        for col in ("slice", "n", "mean", "95% CI", "fail rate", "need", "reliability"):
            table.add_column(col, justify="left" if col in ("slice", "reliability") else "right")
        for s in rep.slices:
            ci = "-" if s.ci_low is None else f"[{s.ci_low:.2f}, {s.ci_high:.2f}]"
            table.add_row(s.slice, str(s.n), num(s.mean), ci, num(s.fail_rate), f"{s.need:.1f}",
                          s.reliability)
        out.print(table)


@app.command("evaluate")
def evaluate_cmd(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML)."),
    model: Path = typer.Option(None, "--model", help="Model directory (default: config model.base)."),
    adapter: Path = typer.Option(None, "--adapter", help="LoRA adapter directory to apply."),
    split: str = typer.Option("eval", "--split", help="eval or heldout."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only N evenly spaced rows of each set."),
    out: Path = typer.Option(None, "--out", help="Folder for responses, samples and reports "
                                                 "(default: <run_dir>/evaluate/<model>[__<adapter>])."),
) -> None:
    """Evaluate a model (optionally + adapter) on the config's eval sets; print f and slice tables."""
    import logging

    from mosaic.config import ConfigError
    from mosaic.data import DataFormatError
    from mosaic.llm import EndpointError
    from mosaic.sandbox import WorldError, ensure_world
    from mosaic.tools.evaluate import evaluate
    from mosaic.training.base_model import BaseModelError
    from mosaic.training.models import ModelLoadError

    if split not in ("eval", "heldout"):
        console.print(f"[red]--split must be 'eval' or 'heldout', got {split!r}[/red]")
        raise typer.Exit(2)
    cfg = _load(config)
    if out is None:
        label = model.resolve().name if model else (
            cfg.inference.endpoint.model if cfg.inference.backend == "openai" and cfg.inference.endpoint
            else cfg.model.base)
        label = label.replace("/", "_") + (f"__{adapter.resolve().name}" if adapter else "")
        out = Path(cfg.run_dir) / "evaluate" / label
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    say = lambda msg: console.print(f"[dim]{msg}[/dim]")  # noqa: E731
    try:
        if cfg.world.kind == "sandbox":
            # The sandbox's eval sets are generated (once, cached) from the config's world seed.
            ensure_world(cfg.world, progress=say)
        report = evaluate(cfg, model, adapter, out, split=split, limit=limit,  # type: ignore[arg-type]
                          progress=say)
    except (ConfigError, DataFormatError, FileNotFoundError, EndpointError, WorldError,
            ModelLoadError, BaseModelError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    print_eval_report(report)
    console.print(f"wrote {out / split}")


@app.command("build-dataset")
def build_dataset_cmd(
    action: Path = typer.Argument(..., help="Data action (JSON file)."),
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", help="Run config (YAML)."),
    out: Path = typer.Option(None, "--out",
                             help="Output folder (default: <run_dir>/datasets/<action hash>-s<seed>)."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed (default: the config's seed)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and manifest; write nothing."),
    previous: Path = typer.Option(None, "--previous",
                                  help="Previous round's action, for per-round change limits."),
    tokenizer: Path = typer.Option(None, "--tokenizer",
                                   help="Tokenizer directory (default: the sandbox world's "
                                        "tokenizer, or model.base)."),
    cache_dir: Path = typer.Option(Path(".cache/pools"), "--cache-dir",
                                   help="Cache of token counts and message hashes per pool."),
) -> None:
    """Check a data action and build its training set (parquet + manifest). Exit 2 if invalid."""
    import json

    from rich import box
    from rich.table import Table

    from mosaic.data import DataFormatError
    from mosaic.schemas import DataAction
    from mosaic.tools.build_dataset import (PoolError, check_and_build, prepare_from_config,
                                            write_training_set)
    from mosaic.tools.validate_action import MAX_ACTION_BYTES, ActionContext

    cfg = _load(config)
    seed = cfg.seed if seed is None else seed
    try:
        with open(action, "rb") as f:
            raw = f.read(MAX_ACTION_BYTES + 1)  # the check reports oversize; never read more
        prev = None
        if previous is not None:
            prev = DataAction.model_validate_json(previous.read_text(encoding="utf-8"))
        from mosaic.training.base_model import tokenizer_dir
        from mosaic.training.models import load_tokenizer

        tok = load_tokenizer(tokenizer if tokenizer is not None else tokenizer_dir(cfg))
        run = prepare_from_config(cfg, tok, cache_dir=cache_dir)
    except (OSError, ValueError, DataFormatError, PoolError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    ctx = ActionContext.from_config(cfg, run.prepared, previous_action=prev, eval_ids=run.eval_ids)
    outcome = check_and_build(raw, ctx, seed=seed, dry_run=True)
    verdict = outcome.verdict
    if not verdict.ok or outcome.manifest is None or outcome.table is None:
        table = Table(title=f"{action}: invalid data action ({len(verdict.problems)} problems)",
                      box=box.SIMPLE_HEAD)
        for col in ("code", "path", "problem", "hint"):
            table.add_column(col, overflow="fold")
        for p in verdict.problems:
            table.add_row(p.code, p.path, p.message, p.hint)
        Console(width=max(console.width, 140)).print(table)
        raise typer.Exit(2)
    man = outcome.manifest
    plan = Table(title=f"plan: {man.method}, budget {man.budget:,} tokens, seed {seed} "
                       f"({verdict.status})", box=box.SIMPLE_HEAD)
    for col in ("objective", "bucket", "allocation", "available", "focus alloc", "used", "rows",
                "focus rows", "shortfall"):
        plan.add_column(col, justify="left" if col in ("objective", "bucket") else "right")
    for b in man.buckets:
        plan.add_row(b.objective, b.bucket, f"{b.allocation:,}", f"{b.available_tokens:,}",
                     f"{b.focus_allocation:,}", f"{b.tokens_used:,}", f"{b.rows:,}",
                     f"{b.focus_rows:,}", f"{b.shortfall:,}")
    plan.add_section()
    plan.add_row("total", "", f"{sum(man.allocations.values()):,}", "", "", f"{man.total_tokens:,}",
                 f"{man.total_rows:,}", "", "")
    Console(width=max(console.width, 120)).print(plan)
    if dry_run:
        typer.echo(json.dumps(man.model_dump(mode="json"), indent=2))
        console.print("dry run: nothing written")
        return
    out = out or Path(cfg.run_dir) / "datasets" / f"{man.action_hash[:12]}-s{seed}"
    write_training_set(out, outcome.table, man)
    console.print(f"wrote {out}/train.parquet ({man.total_rows:,} rows, {man.total_tokens:,} tokens) "
                  f"and {out}/manifest.json")


@app.command("check-data")
def check_data_cmd(
    path: Path = typer.Argument(..., help="Pool or eval set (parquet or JSONL)."),
    objective_type: str = typer.Option(None, "--type", help="Objective type, to check its atoms "
                                                            "and slices (jailbreak, overrefusal, ...)."),
    eval_set: bool = typer.Option(False, "--eval", help="The file is an eval/held-out set, not a pool."),
) -> None:
    """Validate a data file against docs/data-format.md and print its counts."""
    import json

    from mosaic.data import DataFormatError, describe, load_eval_set, load_pool

    try:
        df = load_eval_set(path, objective_type) if eval_set else load_pool(path, objective_type)
    except (DataFormatError, FileNotFoundError, KeyError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    typer.echo(json.dumps(describe(df, objective_type), indent=2))


@app.command("show-report")
def show_report_cmd(
    path: Path = typer.Argument(..., help="A failure report (report.json) or an eval report "
                                          "(eval_report.json)."),
) -> None:
    """Print failure reports as the planner reads them (prompts/reports/failure_report.j2)."""
    from pydantic import ValidationError

    from mosaic.eval.report import render_failure_report
    from mosaic.schemas import EvalReport, FailureReport

    text = path.read_text(encoding="utf-8")
    try:
        reports = list(EvalReport.model_validate_json(text).reports.values())
    except ValidationError:
        try:
            reports = [FailureReport.model_validate_json(text)]
        except ValidationError as e:
            console.print(f"[red]{path} is neither an EvalReport nor a FailureReport: {e}[/red]")
            raise typer.Exit(2) from None
    typer.echo("\n\n".join(render_failure_report(r) for r in reports))


# ---- the sandbox world: `mosaic world`, `mosaic judge-agreement`, `mosaic run` -----------------


def _sandbox_world(cfg, force: bool = False):
    """Build (or reuse) the config's sandbox world; print its statistics; return it."""
    import time

    from mosaic.sandbox import WorldError, ensure_world
    from mosaic.sandbox_report import world_tables

    start = time.perf_counter()
    try:
        world = ensure_world(cfg.world, force=force,
                             progress=lambda msg: console.print(f"[dim]{msg}...[/dim]"))
    except WorldError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    wide = Console(width=max(console.width, 140))
    for table in world_tables(world):
        wide.print(table)
    how = "generated" if world.generated else "reused (cache stamp matches)"
    console.print(f"sandbox world {how} in {time.perf_counter() - start:.1f}s: {world.root}")
    return world


@app.command("world")
def world_cmd(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML)."),
    force: bool = typer.Option(False, "--force", help="Regenerate even if the cached world matches."),
) -> None:
    """Build the sandbox world if not cached (pools, eval/held-out/judge sets, base corpus,
    tokenizer) and print its statistics."""
    _sandbox_world(_load(config), force=force)


@app.command("judge-agreement")
def judge_agreement_cmd(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML)."),
    target: float = typer.Option(0.95, help="Accuracy each atom should reach (shown in red below)."),
) -> None:
    """Per objective and atom: the rule judge's accuracy, F1 and support against ground truth on
    the sandbox's held-out judge-agreement set."""
    from mosaic.sandbox_report import agreement_table, below_target, measure_judge

    world = _sandbox_world(_load(config))
    results = measure_judge(world)
    Console(width=max(console.width, 120)).print(agreement_table(results, target))
    short = below_target(results, target)
    console.print(f"atoms below {target:.2f}: {', '.join(short)}" if short
                  else f"every atom reaches accuracy {target:.2f}")


def run_main(cfg) -> None:
    """The main job behind `mosaic run`: the sandbox world's statistics (for sandbox configs),
    then the base model's baseline evaluation (round 0) with its per-slice tables. The planner
    loop's rounds come next in this same function, without changing the command."""
    from mosaic.schemas import EvalReport
    from mosaic.tools.evaluate import report_path
    from mosaic.tools.run_round import run_baseline

    if cfg.world.kind == "sandbox":
        _sandbox_world(cfg)
    round_dir = Path(cfg.run_dir) / "round_0"
    say = lambda msg: console.print(f"[dim]{msg}[/dim]")  # noqa: E731
    run_baseline(cfg, round_dir, progress=say)
    for split in ("eval", "heldout"):
        path = report_path(round_dir, split)
        if path.is_file():
            console.print(f"[bold]baseline ({split} split)[/bold]")
            print_eval_report(EvalReport.model_validate_json(path.read_text(encoding="utf-8")))
    console.print(f"baseline written to {round_dir}")


@app.command("run")
def run_cmd(config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML).")) -> None:
    """The main job on a config (default configs/sandbox.yaml)."""
    run_main(_load(config))


# ---- models: `mosaic base-model` ----------------------------------------------------------------


@app.command("base-model")
def base_model_cmd(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML)."),
    sample: int = typer.Option(0, help="Also replay this many eval rows per objective through "
                                       "the model (greedy) and print its last answers."),
) -> None:
    """Build the sandbox base model if not cached (or check a local model.base); print where it
    is, its size, build time and loss curve."""
    from mosaic.training.base_model import BaseModelError, ensure_base_model, sandbox_base_model
    from mosaic.training.models import ModelLoadError

    cfg = _load(config)
    try:
        if cfg.model.base == "sandbox":
            info = sandbox_base_model(cfg)
            path = info.path
            how = "found in cache" if info.cached else f"built in {info.seconds:.0f}s"
            console.print(f"sandbox base model {how}: {path}")
            console.print(f"  {info.params / 1e6:.2f}M parameters, {info.size_bytes / 1e6:.1f} MB "
                          f"on disk; trained on {info.train_tokens:,} tokens ({info.rows:,} "
                          f"conversations) in {info.steps:,} steps"
                          + (f"; skipped {info.skipped}" if info.skipped else ""))
            curve = info.loss_curve
            marks = sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4,
                            len(curve) - 1})
            console.print("  loss (assistant tokens): " + "  ".join(
                f"{curve[i][1] / 1e3:.0f}k tok {curve[i][2]:.2f}" for i in marks))
            # Weights are repeatable only on the same machine kind and versions (base_model.py).
            m = info.machine
            if m:
                console.print(f"  built on {m['cpu']} ({m['torch_cpu_capability']}), torch "
                              f"{m['torch']}, transformers {m['transformers']}, {m['threads']} "
                              f"thread(s)" + (f", {m['env']}" if m["env"] else ""))
        else:
            path = ensure_base_model(cfg)
            console.print(f"local base model: {path}")
    except (BaseModelError, ModelLoadError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    if sample > 0:
        _sample_answers(cfg, path, sample)


def _sample_answers(cfg, model_dir: Path, n: int) -> None:
    import json

    import pyarrow.parquet as pq

    from mosaic.training.inference import replay
    from mosaic.training.transformers_backend import TransformersBackend

    backend = TransformersBackend(model_dir, config=cfg)
    for name, obj in cfg.objectives.items():
        if not obj.eval or not Path(obj.eval).is_file():
            continue
        rows = pq.read_table(obj.eval, columns=["messages"]).to_pylist()[:n]
        turns = [[m["content"] for m in r["messages"] if m["role"] == "user"] for r in rows]
        convs = replay(backend, turns, max_new_tokens=cfg.inference.max_new_tokens,
                       temperature=cfg.inference.temperature)
        console.print(f"[bold]{name}[/bold] ({obj.type})")
        for conv in convs:
            console.print(f"  user ({len(conv) // 2} turns): {json.dumps(conv[-2]['content'])[:160]}",
                          markup=False, highlight=False)
            console.print(f"  model: {json.dumps(conv[-1]['content'])[:200]}", markup=False,
                          highlight=False)


# ---- one round by hand: `mosaic round` -------------------------------------------------------


@app.command("round")
def round_cmd(
    action: Path = typer.Argument(..., help="Data action (JSON file) to check, build and train on."),
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Run config (YAML)."),
    round_dir: Path = typer.Option(None, "--round-dir", help="Round folder (default "
                                   "<run_dir>/manual/<action file stem>)."),
    index: int = typer.Option(1, "--index", help="Round number (seeds the build: seed + index)."),
    heldout: bool = typer.Option(True, "--heldout/--no-heldout",
                                 help="Also evaluate on the held-out generalisation sets."),
) -> None:
    """Run one round by hand: check the action, build its training set, LoRA-train from the
    base model, evaluate. Rerunning on the same folder finishes only what did not finish."""
    from mosaic.tools.run_round import run_baseline, run_round

    cfg = _load(config)
    if not action.is_file():
        console.print(f"[red]action file not found: {action}[/red]")
        raise typer.Exit(2)
    base_dir = Path(cfg.run_dir) / "manual"
    round_dir = round_dir or base_dir / action.stem
    say = lambda msg: console.print(f"[dim]{msg}[/dim]")  # noqa: E731
    baseline = run_baseline(cfg, base_dir / "baseline", heldout=heldout, progress=say)
    result = run_round(cfg, action.read_text(encoding="utf-8"), round_dir, round_index=index,
                       heldout=heldout, progress=say)
    if result.status == "rejected":
        from mosaic.tools.validate_action import format_problems

        console.print(f"[red]the check rejected {action}:[/red]")
        console.print(format_problems(result.verdict))
        raise typer.Exit(2)
    _print_round_comparison(baseline, result)
    console.print(f"round folder: {round_dir}")


def _print_round_comparison(baseline, result) -> None:
    from rich.table import Table

    table = Table(title=f"round {result.round} vs baseline (f, mean L1 score 1-5)")
    table.add_column("objective")
    for col in ("baseline", f"round {result.round}", "delta"):
        table.add_column(col, justify="right")
    splits = [("eval", baseline.scores, result.scores)]
    if baseline.heldout_scores and result.heldout_scores:
        splits.append(("held-out", baseline.heldout_scores, result.heldout_scores))
    for split, before, after in splits:
        for name in after:
            b, a = before.get(name), after.get(name)
            delta = f"{a - b:+.3f}" if a is not None and b is not None else "-"
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            table.add_row(f"{name} ({split})", fmt(b), fmt(a), delta)
    console.print(table)
    if result.train:
        console.print(f"trained {result.train.train_tokens:,} tokens / {result.train.train_rows:,} "
                      f"rows in {result.train.seconds:.0f}s, final loss {result.train.final_loss}")


if __name__ == "__main__":
    app()
