"""How many CPU threads a small model uses: measured on the 2-core sandbox machine, adapted to
what the other processes on it are doing, overridable with the config's `runtime.threads`.

Measured with bench/train_generate_bench.py --pairs on the sandbox machine (2 cores, AMD EPYC,
the 3.4M-parameter model), otherwise quiet (1-minute load 0.64-0.87 for generation, 1.2-1.8
for training, our own threads included); the full table is in that bench's module doc:

    LoRA SFT, 100k tokens         1 thread 2,959 tok/s | 2 threads 5,302 (1.79x) |
                                  2 processes x 1 thread 5,047 together (1.71x)
    greedy generation, 256        generate 1 thread 832 new tok/s | 2 threads 1,353 (1.63x)
    prompts, batch 64             fast 1 thread 1,993 (2.40x) | 2 workers 3,586 (4.31x) |
                                  2 processes x 1 thread 3,413 together (4.10x)

and with another job holding a core (load 2.7): training on 2 threads 1,923 tok/s against
2,791 on one; at load 4.3, generation 3-6x slower on 2 intra-op threads than on one (a thread
that shares its core with another process stalls every parallel region). Intra-op threads pay
off for training's large matmuls; generation's small per-step ops gain less from them than
from independent batches side by side. Hence the policy when `runtime.threads` is unset:

* intra-op threads (training, transformers' `generate`): all usable cores while other processes
  use under a third of a core, one once they use more than 0.6 (in between: unchanged), taken
  from /proc/stat when a stage starts and, in training, again every few seconds
  (`ThreadPolicy.recheck`, called by a trainer callback);
* the fast decode loop: one worker thread per usable core, each running whole batches on one
  intra-op thread, so a busy machine costs it no more than the cores it loses.

`runtime.threads = N` fixes both (N intra-op threads, N decode workers). Greedy replies do not
depend on the setting: the decode loop computes each batch, planned independently of the
workers, on one thread. Training does, in float rounding only: a few backward reductions sum in
another order on 2 threads, so adapters trained on 1 and 2 threads differ by ~2e-10 (largest
weight difference) after 100k tokens (bench/train_generate_bench.py reports "same adapter" or
not). Where the policy may
switch, a retrained round can differ from the first by that much; set `runtime.threads` for
bit-for-bit repeatable adapters whatever else runs on the machine.
Models of `SMALL_MODEL_PARAMS` and more, and GPUs, keep torch's default and one worker.

The policy covers the sub-500M pretrained models a laptop runs too (SmolLM2-135M-Instruct of
configs/real-smoke.yaml): on this machine under other helpers' load (1-minute load 15-18),
`mosaic generate-replies` of 12 prompts x 2 replies of 48 tokens took 981 s on torch's default
2 intra-op threads and 128 s on one (7.7x): a parallel region whose second thread shares a core
with other processes waits for it at every op, and a 135M model's decode step is many small ops.
"""

from __future__ import annotations

import os
import time

# Below this size a CPU model follows the policy above; larger ones keep torch's default.
SMALL_MODEL_PARAMS = 500_000_000
# Other processes' CPU use (in cores) under which a stage takes every core, and over which it
# keeps to one thread.
IDLE_OTHERS = 0.33
BUSY_OTHERS = 0.6
# How often training re-reads the machine.
RECHECK_SECONDS = 3.0


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _proc_stat() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs, or None where /proc/stat is unavailable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return total - idle, total


def _own_jiffies() -> float:
    t = os.times()
    return (t.user + t.system) * os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """CPU used by other processes since the previous reading, in cores."""

    def __init__(self) -> None:
        self.cores = usable_cores()
        self._last = (_proc_stat(), _own_jiffies(), time.monotonic())

    def others(self, min_interval: float = 0.2) -> float | None:
        """Other processes' CPU use since the last call (waiting up to `min_interval` so the
        reading spans at least that long); None where it cannot be read."""
        stat, own, when = self._last
        wait = min_interval - (time.monotonic() - when)
        if wait > 0:
            time.sleep(wait)
        now = (_proc_stat(), _own_jiffies(), time.monotonic())
        self._last = now
        if stat is None or now[0] is None:
            return None
        busy, total = now[0][0] - stat[0], now[0][1] - stat[1]
        n_cpus = os.cpu_count() or self.cores
        per_cpu = total / n_cpus
        if per_cpu <= 0:
            return None
        return max(0.0, (busy - (now[1] - own)) / per_cpu)


_WATCH: CpuWatch | None = None


def watch() -> CpuWatch:
    global _WATCH
    if _WATCH is None:
        _WATCH = CpuWatch()
    return _WATCH


def choose(others: float | None, cores: int, current: int | None) -> int:
    """Intra-op threads for a small model given other processes' CPU use (in cores)."""
    if others is None:
        return 1  # cannot tell: the choice that never stalls
    if others < IDLE_OTHERS:
        return cores
    if others > BUSY_OTHERS or current is None:
        return 1
    return current


class ThreadPolicy:
    """The intra-op thread count of one stage (`threads`), fixed (`runtime.threads` set) or
    adaptive; `recheck()` re-reads the machine when adaptive and applies a change."""

    def __init__(self, fixed: int | None) -> None:
        import torch

        self.adaptive = fixed is None
        self.cores = usable_cores()
        self.threads = fixed if fixed is not None else choose(watch().others(), self.cores, None)
        self.changes = 0
        self._checked = time.monotonic()
        torch.set_num_threads(self.threads)

    def recheck(self, force: bool = False) -> int:
        if not self.adaptive or (not force and time.monotonic() - self._checked < RECHECK_SECONDS):
            return self.threads
        import torch

        self._checked = time.monotonic()
        new = choose(watch().others(min_interval=0.0), self.cores, self.threads)
        if new != self.threads:
            torch.set_num_threads(new)
            self.threads = new
            self.changes += 1
        return self.threads


def decode_workers(n_params: int, device: str, threads: int | None) -> int:
    """Worker threads of the fast decode loop (see the module doc)."""
    if device != "cpu" or n_params >= SMALL_MODEL_PARAMS:
        return 1
    return threads if threads is not None else usable_cores()


def trainer_callback(policy: ThreadPolicy):
    """A transformers TrainerCallback that rechecks `policy` between steps."""
    from transformers import TrainerCallback

    class _Recheck(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            policy.recheck()

    return _Recheck()
