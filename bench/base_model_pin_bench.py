"""What pinning the base model build's kernels costs: the same training (the sandbox model's
architecture, a short run) in a fresh process with the CPU's own kernels and with
each pinned kernel set (KERNEL_SETS), alternating, with the load printed beside the figures (a shared machine).

    python bench/base_model_pin_bench.py [--tokens 20000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = """
import sys, time
from pathlib import Path
from mosaic.sandbox import ensure_world
from mosaic.config import load_config
from mosaic.training import base_model as bm
from mosaic.training.train import read_rows
cfg = load_config("configs/sandbox.yaml", environ={{}}, overrides={{"world": {{
    "data_dir": {data!r}, "pool_size": 300, "eval_size": 20, "heldout_size": 20,
    "base_corpus_size": 600}}}})
world = ensure_world(cfg.world)
convs = bm._conversations(read_rows(Path({data!r}) / "base_corpus.parquet"), "corpus")
spec = bm.BaseModelSpec(target_tokens={tokens})
t = time.perf_counter()
with bm._pinned():
    bm._train(convs, Path({data!r}) / "tokenizer", Path({out!r}), spec=spec, seed=0, key="b",
              progress=False, source="corpus", hashes={{}})
print(round(time.perf_counter() - t, 2))
"""


def main() -> None:
    from mosaic.training.base_model import KERNEL_SETS

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pin-bench-"))
    base = {k: v for k, v in os.environ.items() if k not in KERNEL_SETS["avx2"]}
    results: dict[str, list[float]] = {"cpu's own kernels": [], "pinned baseline": [], "pinned avx2": []}
    for r in range(args.repeats):
        for name, extra in (("cpu's own kernels", {"OMP_NUM_THREADS": "1"}),
                            ("pinned baseline", KERNEL_SETS["baseline"]),
                            ("pinned avx2", KERNEL_SETS["avx2"])):
            script = SCRIPT.format(data=str(root / "world"), tokens=args.tokens,
                                   out=str(root / f"{name.replace(' ', '_')}-{r}"))
            proc = subprocess.run([sys.executable, "-c", script], env={**base, **extra},
                                  capture_output=True, text=True, check=True)
            results[name].append(float(proc.stdout.strip().splitlines()[-1]))
    load = os.getloadavg()
    print(f"training {args.tokens:,} tokens, sandbox architecture, 1 thread "
          f"(load average {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cores):")
    for name, secs in results.items():
        print(f"  {name:18s} {min(secs):7.1f}s best of {len(secs)}  (all: {secs})")
    ratio = min(results["pinned baseline"]) / min(results["cpu's own kernels"])
    avx2_ratio = min(results["pinned avx2"]) / min(results["cpu's own kernels"])
    print(f"  pinned baseline / own: {ratio:.2f}x; pinned avx2 / own: {avx2_ratio:.2f}x")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
