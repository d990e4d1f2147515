"""DPO against SFT on the same data and budget, on the sandbox: the target objective's eval and
held-out scores, the other objectives' eval scores, and training time, with a beta x learning-rate
sweep for DPO.

    .venv/bin/python bench/dpo_vs_sft.py [--config configs/sandbox.yaml] [--objective safety]
        [--budget 100000] [--betas 0.1,0.5] [--lrs 1e-4,5e-4] [--out docs/dpo-sweep.json]

One action, `{"mixture": {OBJECTIVE: 1}, "quality_threshold": Q}`, is built twice at the same
token budget and seed: as SFT rows (what an SFT round trains on) and as DPO pairs (same prompts'
best answer against its worst). Every variant trains a fresh LoRA adapter from the base model on
one CPU thread (runtime.threads 1: the time ratio does not move with the policy's thread choice
when other processes come and go) and is scored by the rule judge with 95% bootstrap CIs:

    base           no training
    sft            the SFT build of the action (the SFT round)
    sft-chosen     SFT on the pairs' chosen answers (the pairs' own data, no rejected side)
    dpo b=.. lr=.. DPO on the pairs, for each beta and learning rate of the sweep
    sft+dpo ...    SFT on the chosen answers, then DPO on the pairs from there (best setting)
    dpo+nll ...    the best DPO setting with an NLL term on the chosen answer (dpo_sft_weight 1)
    dpo-trl ...    the best DPO setting in trl's own layout, two rows per pair
                   (training.dpo_packed false): the packed layout's same-commit baseline

The DPO setting is picked on the eval set only; the held-out set (templates and wording disjoint
from eval and pools) then says whether the gain is real. Wall and CPU seconds are the training
call's (reference log-probs, tokenising and the adapter's save included), each beside the 1-minute
load average when it ended: the machine is shared, so compare times through the CPU seconds and
the ratio to SFT, not as absolute figures. Each row also splits its CPU seconds into the
reference pass (DPO), the optimiser steps and the rest (loading, tokenising, saving). The JSON
written to --out holds every row; `--rerun NAME` measures a kept row again and moves the old one
to `superseded`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def load() -> float:
    return round(os.getloadavg()[0], 2)


def _commit() -> str:
    """The commit the row was measured at (rows kept by --resume may be older)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextmanager
def phase_clock() -> Iterator[dict[str, float]]:
    """CPU seconds of this process in the DPO reference pass (`train.reference_log_probs`) and
    in the optimiser steps (`train._train_stage`, every stage of the call), filled in as the
    training call runs."""
    from mosaic.training import train as train_module

    phases = {"ref_pass": 0.0, "steps": 0.0}

    def timed(real: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            c0 = time.process_time()
            try:
                return real(*args, **kwargs)
            finally:
                phases[key] += time.process_time() - c0
        return wrapper

    real_ref, real_stage = train_module.reference_log_probs, train_module._train_stage
    train_module.reference_log_probs = timed(real_ref, "ref_pass")
    train_module._train_stage = timed(real_stage, "steps")
    try:
        yield phases
    finally:
        train_module.reference_log_probs, train_module._train_stage = real_ref, real_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/sandbox.yaml")
    ap.add_argument("--objective", default="safety")
    ap.add_argument("--budget", type=int, default=100_000)
    ap.add_argument("--threshold", type=float, default=4.0,
                    help="quality threshold (SFT rows; DPO chosen answers)")
    ap.add_argument("--betas", default="0.1,0.5")
    ap.add_argument("--lrs", default="1e-4,5e-4")
    ap.add_argument("--variants", default="base,sft,sft-chosen,dpo,dpo+nll,sft+dpo",
                    help="which rows to run (dpo = the sweep; dpo-trl is not run by default)")
    ap.add_argument("--out", default="docs/dpo-sweep.json")
    ap.add_argument("--keep", help="keep adapters and eval folders here")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out and run only the missing ones")
    ap.add_argument("--rerun", action="append", default=[], metavar="NAME",
                    help="with --resume: measure this kept row again (repeatable, e.g. "
                         "--rerun sft --rerun 'dpo b=0.1 lr=0.002'); the old row moves to "
                         "`superseded`")
    ap.add_argument("--all-objectives", action="store_true",
                    help="also score the other objectives' eval sets (collateral effects)")
    ap.add_argument("--table", action="store_true",
                    help="print the rows already in --out as a markdown table and exit")
    opts = ap.parse_args()
    if opts.table:
        print(markdown(json.loads(Path(opts.out).read_text(encoding="utf-8"))))
        return
    wanted = set(opts.variants.split(","))

    from mosaic.config import load_config
    from mosaic.eval import check_objective_types
    from mosaic.sandbox import ensure_world
    from mosaic.sandbox.base_model import ensure_base_model
    from mosaic.tools.build_dataset import TRAIN_FILE
    from mosaic.tools.evaluate import evaluate
    from mosaic.tools.run_round import dataset_stage, run_data
    from mosaic.training.train import read_rows, train_adapter

    work = Path(opts.keep or tempfile.mkdtemp(prefix="dpo-vs-sft-"))
    config = load_config(opts.config, overrides={
        "run_dir": str(work / "run"), "budget": {"max_tokens": opts.budget},
        "runtime": {"threads": 1}})
    check_objective_types(config)
    if config.world.kind == "sandbox":
        ensure_world(config.world)
    base_model = ensure_base_model(config)
    run_data(config)
    target = opts.objective
    if target not in config.objectives:
        sys.exit(f"--objective {target!r} is not an objective of {opts.config} "
                 f"({sorted(config.objectives)})")
    print(f"cores {os.cpu_count()}  load at start {load()}  objective {target}  "
          f"budget {opts.budget:,} tokens  work {work}", flush=True)

    data: dict[str, Path] = {}
    manifests: dict[str, Any] = {}
    for method in ("sft", "dpo"):
        action = {"mixture": {target: 1.0}, "quality_threshold": opts.threshold,
                  "method": method, "rationale": "bench/dpo_vs_sft.py"}
        verdict, manifest = dataset_stage(config, action, work / f"data_{method}", round_index=1)
        if not verdict.ok or manifest is None:
            sys.exit(f"the {method} action was rejected: {verdict.problems}")
        data[method] = work / f"data_{method}" / "dataset" / TRAIN_FILE
        manifests[method] = manifest
        print(f"{method} build: {manifest.total_rows} rows, {manifest.total_tokens:,} tokens",
              flush=True)
    chosen_rows = [{"messages": list(r["prompt"]) + list(r["chosen"])}
                   for r in read_rows(data["dpo"])]

    rows: list[dict[str, Any]] = []
    superseded: list[dict[str, Any]] = []
    out_path = Path(opts.out)
    if opts.resume and out_path.is_file():
        # Rows measured before (same objective, budget and threshold) are kept, not rerun.
        old = json.loads(out_path.read_text(encoding="utf-8"))
        if (old["objective"], old["budget"], old["threshold"]) != (target, opts.budget,
                                                                   opts.threshold):
            sys.exit(f"{out_path} holds another setup; drop --resume or pick another --out")
        rows, superseded = old["rows"], old.get("superseded", [])
    unknown = sorted(set(opts.rerun) - {r["name"] for r in rows})
    if unknown:
        sys.exit(f"--rerun {unknown}: no such row in {out_path} "
                 f"(rows: {[r['name'] for r in rows]})")
    # A rerun row's old measurement is kept, marked, beside the new one.
    superseded += [r for r in rows if r["name"] in opts.rerun]
    rows = [r for r in rows if r["name"] not in opts.rerun]
    done = {r["name"]: r for r in rows}

    def score(name: str, adapter: Path | None) -> dict[str, Any]:
        folder = work / "eval" / name.replace(" ", "_")
        ev = evaluate(config, base_model, adapter, folder, "eval", round=1,
                      objectives=None if opts.all_objectives else [target])
        ho = evaluate(config, base_model, adapter, folder, "heldout", round=1,
                      objectives=[target])
        t, h = ev.reports[target], ho.reports[target]
        return {"eval": t.f, "eval_ci": [t.f_ci_low, t.f_ci_high],
                "heldout": h.f, "heldout_ci": [h.f_ci_low, h.f_ci_high],
                "other_eval": {k: v for k, v in ev.scores().items() if k != target}}

    def run(name: str, method: str | None, train_data: Any, **training: Any) -> dict[str, Any]:
        if name in done:
            return done[name]
        row: dict[str, Any] = {"name": name, "method": method, "training": training,
                               "code": _commit()}
        adapter = None
        if method is not None:
            adapter = work / "adapters" / name.replace(" ", "_")
            shutil.rmtree(adapter, ignore_errors=True)
            settings = config.training.model_copy(update=training)
            with phase_clock() as phases:
                c0 = time.process_time()
                res = train_adapter(train_data, base_model=base_model, adapter_dir=adapter,
                                    training=settings, max_length=config.model.max_length,
                                    method=method, progress=False, threads=1)
                cpu = time.process_time() - c0
            row.update(train_seconds=res.seconds, train_cpu_seconds=round(cpu, 1),
                       ref_pass_cpu_seconds=round(phases["ref_pass"], 1),
                       steps_cpu_seconds=round(phases["steps"], 1),
                       other_cpu_seconds=round(cpu - phases["ref_pass"] - phases["steps"], 1),
                       train_rows=res.train_rows, train_tokens=res.train_tokens,
                       steps=res.steps, final_loss=res.final_loss, load_after_train=load())
        row.update(score(name, adapter))
        row["load_after_eval"] = load()
        rows.append(row)
        print(json.dumps(row), flush=True)
        write()
        return row

    def write() -> None:
        from mosaic.io import atomic_write_json

        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_path, {
            "bench": "bench/dpo_vs_sft.py", "config": opts.config, "objective": target,
            "budget": opts.budget, "threshold": opts.threshold, "cores": os.cpu_count(),
            "base_training": config.training.model_dump(mode="json"),
            "builds": {m: {"rows": man.total_rows, "tokens": man.total_tokens}
                       for m, man in manifests.items()},
            "rows": rows, "superseded": superseded})

    if "base" in wanted:
        run("base", None, None)
    sft = run("sft", "sft", data["sft"]) if "sft" in wanted else None
    if "sft-chosen" in wanted:
        run("sft-chosen", "sft", chosen_rows)
    betas = [float(b) for b in opts.betas.split(",")]
    lrs = [float(x) for x in opts.lrs.split(",")]
    sweep = []
    if "dpo" in wanted:
        for beta in betas:
            for lr in lrs:
                sweep.append(run(f"dpo b={beta:g} lr={lr:g}", "dpo", data["dpo"],
                                 dpo_beta=beta, dpo_learning_rate=lr))
    # The best plain-DPO setting on the eval set, over this invocation's grid and kept rows.
    grid = [r for r in rows if r["name"].startswith("dpo b=")]
    best = max(grid, key=lambda r: r["eval"] or 0.0) if grid else None
    beta = best["training"]["dpo_beta"] if best else betas[0]
    lr = best["training"]["dpo_learning_rate"] if best else lrs[0]
    if "sft+dpo" in wanted:
        run(f"sft+dpo b={beta:g} lr={lr:g}", "sft+dpo", data["dpo"], dpo_beta=beta,
            dpo_learning_rate=lr)
    if "dpo+nll" in wanted:
        run(f"dpo+nll b={beta:g} lr={lr:g}", "dpo", data["dpo"], dpo_beta=beta,
            dpo_learning_rate=lr, dpo_sft_weight=1.0)
    if "dpo-trl" in wanted:
        run(f"dpo-trl b={beta:g} lr={lr:g}", "dpo", data["dpo"], dpo_beta=beta,
            dpo_learning_rate=lr, dpo_packed=False)

    print(f"\n{'variant':<26} {'eval':>6} {'95% CI':>15} {'held-out':>9} {'95% CI':>15} "
          f"{'train s':>8} {'cpu s':>7} {'x SFT':>6} {'load':>5}")
    for r in rows:
        # Against this SFT row only rows of its commit (the README table pairs the others).
        ratio = (f"{r['train_cpu_seconds'] / sft['train_cpu_seconds']:.2f}"
                 if sft and r.get("train_cpu_seconds") and r.get("code") == sft.get("code")
                 else "")
        print(f"{r['name']:<26} {r['eval']:6.3f} [{r['eval_ci'][0]:.2f}, {r['eval_ci'][1]:.2f}]"
              f"  {r['heldout']:8.3f} [{r['heldout_ci'][0]:.2f}, {r['heldout_ci'][1]:.2f}]"
              f" {r.get('train_seconds', 0):8.1f} {r.get('train_cpu_seconds', 0):7.1f} "
              f"{ratio:>6} {r.get('load_after_train', r['load_after_eval']):5.2f}")
    print(f"\nrows written to {out_path}")
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)


def markdown(result: dict[str, Any]) -> str:
    """The rows as the README's table: scores with CIs, training CPU seconds against the SFT
    row measured at the same commit (the oldest SFT row for rows of commits without one),
    split into reference pass / optimiser steps / the rest where measured. The rows measured
    with the current SFT row come first, then older ones, then the superseded measurements."""
    rows, old = result["rows"], result.get("superseded", [])
    sfts = [r for r in rows + old if r["name"] == "sft"]
    current = next((r for r in rows if r["name"] == "sft"), None)
    oldest = next((r for r in reversed(sfts) if "code" not in r), sfts[-1] if sfts else None)

    def sft_of(r: dict[str, Any]) -> dict[str, Any] | None:
        return next((s for s in sfts if "code" in r and s.get("code") == r["code"]), oldest)

    def table(rows: list[dict[str, Any]]) -> list[str]:
        out = ["| variant | eval (95% CI) | held-out (95% CI) | train wall s | train CPU s | "
               "CPU x SFT | ref pass / steps / rest CPU s | load | code |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            sft = sft_of(r)
            ratio = (f"{r['train_cpu_seconds'] / sft['train_cpu_seconds']:.2f}"
                     if sft and r.get("train_cpu_seconds") else "")
            split = (f"{r['ref_pass_cpu_seconds']:.1f} / {r['steps_cpu_seconds']:.1f} / "
                     f"{r['other_cpu_seconds']:.1f}" if "steps_cpu_seconds" in r else "")
            out.append(
                f"| {r['name']} | {r['eval']:.2f} [{r['eval_ci'][0]:.2f}, "
                f"{r['eval_ci'][1]:.2f}] | {r['heldout']:.2f} [{r['heldout_ci'][0]:.2f}, "
                f"{r['heldout_ci'][1]:.2f}] | {r.get('train_seconds', 0):.0f} | "
                f"{r.get('train_cpu_seconds', 0):.1f} | {ratio} | {split} | "
                f"{r.get('load_after_train', r['load_after_eval']):.1f} | "
                f"{r.get('code', '')} |")
        return out

    code = current.get("code") if current else None
    # The base row (no training) leads whatever commit scored it.
    same = [r for r in rows if r["name"] == "base" or (code and r.get("code") == code)]
    out = table(same + [r for r in rows if r not in same])
    if old:
        out += ["", "Superseded (measured again above):", ""] + table(old)
    return "\n".join(out)


if __name__ == "__main__":
    main()
