"""The real-model smoke run end to end, with the wall time of every stage.

    .venv/bin/python scripts/real_smoke.py            # the whole run (configs/real-smoke.yaml)
    .venv/bin/python scripts/real_smoke.py --quick    # 12 prompts a pool, 10 an eval set,
                                                      # 3,000 training tokens a round
    .venv/bin/python scripts/real_smoke.py --stages doctor,run   # some stages only

Stages, each a `mosaic` command (printed before it runs, so the transcript can be replayed):

1. import: the real third-party subsets shipped in mosaic/resources/real_text/smoke/ (their
   sources and licences: that folder's README) become eval files and prompt files with
   `mosaic import`; pool rows that come with a written reply are imported as pool rows;
2. replies: `mosaic generate-replies` answers every pool prompt with SmolLM2-135M-Instruct
   itself (one greedy reply and one sampled), keeping the written replies beside them;
3. annotate: `mosaic annotate` grades every pool row with the configured judge (the offline
   embedding judge; IFEval rows by the programmatic checker);
4. doctor: `mosaic doctor` checks the whole config before anything trains;
5. run: `mosaic run` (baseline + 2 heuristic rounds).

Everything lands under data/real-smoke/ (or --data DIR) and the run folder of the config;
a stage whose outputs exist is run again anyway (each command is cheap to rerun or resumes
by itself: annotate from its cache, run from its checkpoint). The table at the end gives each
stage's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "mosaic" / "resources" / "real_text" / "smoke"
CONFIG = ROOT / "configs" / "real-smoke.yaml"
LICENCE = ("per row: metadata.licence (MIT or ODC-BY sources; see "
           "mosaic/resources/real_text/README.md)")
# objective -> (type, raw pool file, raw eval file)
STAGES = ["import", "replies", "annotate", "doctor", "run"]
QUICK_BUDGET = 3000  # training tokens per round with --quick
OBJECTIVES = {
    "jailbreak": ("jailbreak", "jailbreak_pool.jsonl", "jailbreak_eval.jsonl"),
    "overrefusal": ("overrefusal", "overrefusal_pool.jsonl", "overrefusal_eval.jsonl"),
    "ifeval": ("ifeval", "ifeval_pool.jsonl", "ifeval_eval.jsonl"),
}


def mosaic(*args: str, env: dict[str, str]) -> None:
    cmd = [str(ROOT / ".venv" / "bin" / "mosaic"), *args]
    print(f"\n$ mosaic {' '.join(shlex.quote(a) for a in args)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def split_raw(src: Path, dest: Path, limit: int | None) -> tuple[Path | None, Path | None]:
    """The raw rows with a written reply and those without, as two JSONL files (the first
    `limit` rows in all)."""
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line]
    rows = rows[:limit] if limit else rows
    answered = [r for r in rows if r.get("response")]
    asked = [{k: v for k, v in r.items() if k != "response"} for r in rows
             if not r.get("response")]
    out = []
    for name, part in (("answered", answered), ("prompts", asked)):
        if not part:
            out.append(None)
            continue
        path = dest / f"{src.stem}.{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part),
                        encoding="utf-8")
        out.append(path)
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 prompts a pool, 10 an eval set, a 3,000-token budget")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "real-smoke")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated stages to run, in order (default: all of {STAGES})")
    args = ap.parse_args()
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; stages are {STAGES}")
    pool_limit, eval_limit = (12, 10) if args.quick else (None, None)
    data = args.data
    for sub in ("raw", "prompts", "pools", "eval"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for name in OBJECTIVES:  # the config's paths, pointed at --data
        env[f"MOSAIC__objectives__{name}__pool"] = str(data / "pools" / f"{name}.parquet")
        env[f"MOSAIC__objectives__{name}__eval"] = str(data / "eval" / f"{name}.parquet")
    if args.quick:
        env["MOSAIC__run_dir"] = str(ROOT / "runs" / "real-smoke-quick")
        # 12 prompts a pool supply 2-3k training tokens each: at the config's 12,000 no mixture
        # is fillable, and every proposal is refused as unfillable.
        env["MOSAIC__budget__max_tokens"] = str(QUICK_BUDGET)
    config = str(args.config)
    times: dict[str, float] = {}

    def run(name: str, body) -> None:
        if name not in wanted:
            return
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        body()
        times[name] = time.perf_counter() - start

    def import_stage() -> None:
        for name, (otype, pool_raw, eval_raw) in OBJECTIVES.items():
            for stale in (data / "prompts").glob(f"{name}.*.parquet"):
                stale.unlink()  # from an earlier import with other limits
            common = ["--objective", name, "--type", otype, "--license", LICENCE, "--id", "id",
                      "--prompt", "prompt", "--keep", "source", "--keep", "licence",
                      "--keep", "origin"]
            if otype == "ifeval":
                common += ["--instruction-ids", "instruction_id_list", "--kwargs", "kwargs"]
            ev = data / "raw" / eval_raw
            rows = RAW.joinpath(eval_raw).read_text(encoding="utf-8").splitlines()
            ev.write_text("\n".join(rows[:eval_limit] if eval_limit else rows) + "\n",
                          encoding="utf-8")
            mosaic("import", str(ev), "--kind", "eval", *common,
                   "--out", str(data / "eval" / f"{name}.parquet"), env=env)
            answered, asked = split_raw(RAW / pool_raw, data / "raw", pool_limit)
            if asked is not None:
                mosaic("import", str(asked), "--kind", "eval", *common,
                       "--out", str(data / "prompts" / f"{name}.prompts.parquet"), env=env)
            if answered is not None:
                mosaic("import", str(answered), "--kind", "pool", *common,
                       "--response", "response",
                       "--out", str(data / "prompts" / f"{name}.answered.parquet"), env=env)

    def replies_stage() -> None:
        for name in OBJECTIVES:
            files = sorted(str(p) for p in (data / "prompts").glob(f"{name}.*.parquet"))
            mosaic("generate-replies", *files, "--objective", name, "--config", config,
                   "--candidates", "2", "--temperature", "0.8",
                   "--out", str(data / "pools" / f"{name}.parquet"), env=env)

    def annotate_stage() -> None:
        for name in OBJECTIVES:
            mosaic("annotate", str(data / "pools" / f"{name}.parquet"), "--objective", name,
                   "--config", config, env=env)

    run("import", import_stage)
    run("replies", replies_stage)
    run("annotate", annotate_stage)
    run("doctor", lambda: mosaic("doctor", config, env=env))
    run("run", lambda: mosaic("run", config, env=env))

    print("\nstage      wall time")
    for name, seconds in times.items():
        print(f"{name:<10} {seconds / 60:5.1f} min")
    print(f"{'total':<10} {sum(times.values()) / 60:5.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
