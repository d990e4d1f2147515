"""`mosaic annotate` at scale against an OpenAI-compatible judge on 127.0.0.1.

A real `mosaic annotate` process labels a 10,000-row jailbreak pool (two replies per prompt:
5,000 prompt requests + 10,000 reply requests) through the scripted judge server of the tests
(tests/openai_server.py + tests/judge_script.py), which answers after a fixed latency (a model's
inference time) and injects faults into marked rows: 429 with Retry-After, 500 (echoing the
request's Authorization header), read timeouts, 200s whose body is not JSON, replies that are not
JSON, and a few rows whose requests always fail. It measures and checks, in one run:

1. baseline: concurrency 1 on the first `--baseline-rows` rows -> rows/s;
2. concurrency `--concurrency` on all rows -> rows/s and the speed-up over the baseline; every
   fault kind retried and counted (the run's --report), the always-failing rows listed in the
   failures file, never dropped;
3. the same run SIGKILLed once about half of the requests were answered, then resumed: the
   resumed process sends no request for a conversation whose atoms were cached at the kill;
4. the API key (sent on every request, echoed by the 500s) appears in no output and no file.

    .venv/bin/python bench/annotate_bench.py            # 10,000 rows, concurrency 16
    .venv/bin/python bench/annotate_bench.py --smoke    # 400 rows: proves it works in ~1 min

Exits 1 if a check fails. Timings on a loaded machine are not final figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

KEY = "sk-bench-annotate-0123456789SECRET"
FAULTS = ("429", "500", "timeout", "body", "reply")


def load() -> float:
    return os.getloadavg()[0]


def pool_rows(n: int, fault_every: int, outage_rows: int) -> list[dict]:
    """n rows, two replies per prompt, 1-3 turns; every `fault_every`-th prompt carries a fault
    marker (cycling through FAULTS) and the last `outage_rows` rows an always-failing one."""
    rows = []
    for i in range(n):
        k = i // 2
        marker = ""
        if fault_every and k % fault_every == fault_every - 1:
            marker = f" [fault:{FAULTS[(k // fault_every) % len(FAULTS)]}]"
        if i >= n - outage_rows:
            marker = " [fault:always500]"
        turns = 1 + k % 3
        msgs = []
        for t in range(turns):
            msgs += [{"role": "user", "content": f"request {k} turn {t} about topic {k % 97}"
                                                 + (marker if t == 0 else "")},
                     {"role": "assistant", "content": f"reply {k}.{t}" if t < turns - 1
                      else f"final reply {i}: here is what I can say about topic {k % 97}."}]
        rows.append({"id": f"r{i}", "prompt_id": f"p{k}", "messages": msgs})
    return rows


def write_config(path: Path, base_url: str, cache_dir: Path, timeout_s: float) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "objectives": {"safety": {"type": "jailbreak"}}, "world": {"kind": "files"},
        "judge": {"kind": "llm", "cache_dir": str(cache_dir),
                  "endpoint": {"base_url": base_url, "model": "bench-judge",
                               "api_key_env": "MOSAIC_BENCH_KEY", "timeout_s": timeout_s,
                               # $0.15 / $0.60 per million tokens
                               "max_retries": 3, "price_per_1k_input": 0.00015,
                               "price_per_1k_output": 0.0006}}}))
    return path


def annotate_cmd(pool: Path, cfg: Path, concurrency: int, report: Path) -> list[str]:
    return [sys.executable, "-m", "mosaic", "annotate", str(pool), "--objective", "safety",
            "--config", str(cfg), "--concurrency", str(concurrency), "--report", str(report)]


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str, int]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, proc.stdout + proc.stderr, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--baseline-rows", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency-ms", type=float, default=50.0,
                    help="the judge server's answer time per request")
    ap.add_argument("--fault-every", type=int, default=50,
                    help="one prompt in this many carries a fault marker")
    ap.add_argument("--smoke", action="store_true", help="400 rows, 40 baseline rows")
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here")
    opts = ap.parse_args()
    if opts.smoke:
        opts.rows, opts.baseline_rows, opts.fault_every = 400, 40, 10

    import pandas as pd

    from judge_script import JudgeScript, asked_conversations, cached_conversations
    from openai_server import ScriptedOpenAIServer

    from mosaic.data import load_pool, rows_needing_annotation, write_table
    from mosaic.eval.annotate import AtomCache, failures_path

    work = Path(tempfile.mkdtemp(prefix="annotate-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOSAIC__")}
    env.update(MOSAIC_BENCH_KEY=KEY, COLUMNS="160")
    outage = 4 if opts.rows >= 1000 else 2
    rows = pool_rows(opts.rows, opts.fault_every, outage)
    checks: list[tuple[str, bool]] = []
    print(f"cores {os.cpu_count()}  load {load():.2f}  rows {opts.rows:,}  concurrency "
          f"{opts.concurrency}  server latency {opts.latency_ms:g} ms", flush=True)
    script = JudgeScript(timeout_delay_s=2.0, latency_s=opts.latency_ms / 1000)
    server = ScriptedOpenAIServer(responder=script).start()
    try:
        # 1. baseline: one request at a time.
        base_pool = work / "baseline.parquet"
        write_table(base_pool, pd.DataFrame(rows[:opts.baseline_rows]))
        base_cfg = write_config(work / "baseline.yaml", server.base_url, work / "cache-baseline", 1.0)
        secs, out, rc = run(annotate_cmd(base_pool, base_cfg, 1, work / "baseline.json"), env, work)
        base = json.loads((work / "baseline.json").read_text())
        base_rps = base["rows_todo"] / base["seconds"]
        print(f"baseline  concurrency 1: {base['rows_todo']:,} rows in {base['seconds']:.1f}s = "
              f"{base_rps:,.1f} rows/s (process {secs:.1f}s, load {load():.2f})", flush=True)

        # 2. the full pool at the given concurrency.
        pool = work / "pool.parquet"
        write_table(pool, pd.DataFrame(rows))
        cfg = write_config(work / "run.yaml", server.base_url, work / "cache-run", 1.0)
        server.reset()
        server.responder = script = JudgeScript(timeout_delay_s=2.0, latency_s=opts.latency_ms / 1000)
        secs, out_full, rc = run(annotate_cmd(pool, cfg, opts.concurrency, work / "run.json"), env, work)
        rep = json.loads((work / "run.json").read_text())
        st = rep["judge_stats"]
        rps = rep["rows_todo"] / rep["seconds"]
        print(f"run  concurrency {opts.concurrency}: {rep['rows_todo']:,} rows in "
              f"{rep['seconds']:.1f}s = {rps:,.1f} rows/s, {rps / base_rps:.1f}x the baseline "
              f"(process {secs:.1f}s, peak {server.peak_in_flight} requests in flight, load "
              f"{load():.2f})", flush=True)
        print(f"  requests {st['requests']:,}, attempts {st['attempts']:,}; retries "
              f"{st['retries']}; failed for good {st['failures']}; format retries "
              f"{st['format_retries']}; tokens in {st['tokens_in']:,} out {st['tokens_out']:,}; "
              f"cost ${st['cost']:.4f} at $0.15/$0.60 per million tokens", flush=True)
        print(f"  faults served {dict(script.faults)}; rows failed {rep['failed']} "
              f"{rep['failure_reasons']}", flush=True)
        checks += [(f"exit 1 (rows failed) with {outage} outage rows listed", rc == 1),
                   # The server also still holds requests whose client timed out and retried.
                   (f"{opts.concurrency} requests in flight, no more (+ abandoned timeouts)",
                    opts.concurrency <= server.peak_in_flight
                    <= opts.concurrency + st["retries"].get("timeout", 0))]
        for kind, reason in (("429", "http_429"), ("500", "http_500"), ("timeout", "timeout"),
                             ("body", "malformed_body")):
            checks.append((f"{kind} faults served and retried ({reason})",
                           script.faults[kind] > 0 and st["retries"].get(reason, 0) >= script.faults[kind]))
        checks.append(("malformed replies re-asked", st["format_retries"] >= script.faults["reply"] > 0))
        listed = [json.loads(x) for x in failures_path(pool).read_text().splitlines()]
        outage_ids = sorted(f"r{i}" for i in range(opts.rows - outage, opts.rows))
        checks.append(("outage rows listed, not dropped",
                       sorted(x["id"] for x in listed) == outage_ids))
        done = load_pool(pool, "jailbreak")
        checks.append(("every other row annotated",
                       int(rows_needing_annotation(done, "jailbreak").sum()) == outage))

        # 3. killed half-way, resumed.
        pool2 = work / "pool-kill.parquet"
        write_table(pool2, pd.DataFrame(rows))
        cfg2 = write_config(work / "kill.yaml", server.base_url, work / "cache-kill", 1.0)
        server.reset()
        server.responder = JudgeScript(timeout_delay_s=2.0, latency_s=opts.latency_ms / 1000)
        total = len({r["prompt_id"] for r in rows}) + len(rows)
        proc = subprocess.Popen(annotate_cmd(pool2, cfg2, opts.concurrency, work / "kill.json"),
                                env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while len(server.requests) < total // 2 and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        killed_out = proc.communicate()[0].decode()
        at_kill = len(server.requests)
        cache = AtomCache(work / "cache-kill" / "annotate.sqlite")
        cached = cache.keys()
        cache.close()
        secs2, out_resumed, rc2 = run(annotate_cmd(pool2, cfg2, opts.concurrency, work / "kill.json"),
                                      env, work)
        res = json.loads((work / "kill.json").read_text())
        from mosaic.config import load_config
        from mosaic.eval import build_judge
        from mosaic.eval.annotate import judge_identity

        ident = judge_identity(build_judge(load_config(cfg2, environ={}), request_cache=False))
        p_cached, r_cached = cached_conversations(load_pool(pool2, "jailbreak"), cached, ident)
        asked_p, asked_r = asked_conversations(server.requests[at_kill:])
        rejudged = len(asked_p & p_cached) + len(asked_r & r_cached)
        print(f"kill: SIGKILL after {at_kill:,} of ~{total:,} requests; {len(cached):,} "
              f"conversations cached ({len(p_cached):,} prompts, {len(r_cached):,} replies)",
              flush=True)
        print(f"resume: {res['counts']} in {res['seconds']:.1f}s (process {secs2:.1f}s); cached "
              f"conversations asked again: {rejudged}", flush=True)
        checks += [("killed mid-run", 0 < len(cached) < total),
                   ("0 cached rows re-judged after the resume", rejudged == 0),
                   ("the resume judged the uncached rest",
                    asked_r >= set(range(len(rows))) - r_cached - set(range(opts.rows - outage, opts.rows)))]

        # 4. the key.
        texts = out + out_full + killed_out + out_resumed
        leaked = [str(p) for p in work.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
        sent = any(r.headers.get("authorization") == f"Bearer {KEY}" for r in server.requests)
        checks.append(("the key was sent, and is in no output and no file",
                       sent and KEY not in texts and not leaked))
    finally:
        server.stop()
        if opts.keep is not None:
            shutil.copytree(work, opts.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    for name, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
