"""Training and generation throughput of the sandbox-sized model on this machine, and the
measured thread policy.

    .venv/bin/python bench/train_generate_bench.py [--config configs/sandbox.yaml]
        [--train-tokens 100000] [--prompts 256] [--single-prompts 64]
        [--threads 1,2,policy] [--pairs] [--variants trl-defaults,no-grouping]
        [--skip train|generate]

Generation: greedy replies to `--prompts` first user turns of the eval sets at batch 64 (and
`--single-prompts` at batch 1), on the current path (`decode="generate"`: transformers'
`generate`) and the new one (`decode="fast"`: training/decoding.py), for each thread count in
`--threads` (`policy`: runtime.threads unset, the measured policy of training/threads.py; on the
fast path N threads means N decode workers of one intra-op thread each); every row says its new
tokens/s, its ratio to the current path on one thread, and whether its replies equal that
path's. Training: LoRA SFT through MOSAIC's trainer for each
thread setting (and whether its adapter is bit-for-bit the first setting's), a plain torch
loop doing the same updates (the baseline DESIGN.md measured) and
trl variants with some of our settings put back to trl's defaults. `--pairs` adds process-level
parallelism: two trainings (and two generations) at once in two processes, one thread each,
reported as the aggregate tokens/s of the pair. Machines shared with other jobs make wall time
noisy: every figure carries the 1-minute load average when it was taken, and CPU time.

Figures on the sandbox machine (2 cores, AMD EPYC, 3.4M-parameter model; otherwise quiet: the
load column includes this bench's own threads), `--train-tokens 100000 --pairs --variants ''`,
2026-11-29 08:42:

    generation (256 prompts, batch 64)       new tok/s   ratio   load   replies
    current (generate), 1 thread                   832   1.00x   0.67
    current (generate), 2 threads                1,353   1.63x   0.77   same
    current (generate), policy                   1,341   1.61x   0.87   same
    new (fast), 1 thread                         1,993   2.40x   0.87   same
    new (fast), 2 threads (2 decode workers)     3,586   4.31x   0.87   same
    new (fast), policy                           3,397   4.08x   0.87   same
    generate, 2 processes x 1 thread             1,784   2.14x   1.05   (together)
    fast, 2 processes x 1 thread                 3,413   4.10x   1.12   (together)
    batch 1, 64 prompts: generate 308, fast 371 (1.20x), load 1.19

    training (LoRA SFT, 100k tokens)           tok/s   ratio   load   adapter
    mosaic trainer, 1 thread                     2,959   1.00x   1.18
    mosaic trainer, 2 threads                    5,302   1.79x   1.37   differs (float rounding)
    mosaic trainer, policy                       5,059   1.71x   1.48   differs (float rounding)
    mosaic trainer, 2 processes x 1 thread       5,047   1.71x   1.80   (together)
    plain torch loop, 1 thread                   1,771   0.60x   1.82

With another job holding one core (load 2.7), training the 300k-token round on 2 threads ran at
1,923 tok/s against 2,791 on one. The policy chosen from these figures (every core for training
while the machine is otherwise idle, one thread once it is not; one decode worker per core) is
in training/threads.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Each variant is trl's SFTConfig with a few of our settings put back to trl's defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "trl-defaults": {"activation_checkpointing": True, "bf16": True,
                     "train_sampling_strategy": "random"},
    "checkpointing": {"activation_checkpointing": True},
    "bf16": {"bf16": True},
    "no-grouping": {"train_sampling_strategy": "random"},
}


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


class Timer:
    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.load_before = os.getloadavg()[0]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        # The 1-minute average lags: report the higher of before and after.
        self.load = max(self.load_before, os.getloadavg()[0])


def training_rows(config: Any, n_tokens: int, tokenizer: Any, seed: int) -> list[dict]:
    """SFT rows drawn evenly from the world's training pools, about `n_tokens` in total."""
    import pyarrow.parquet as pq

    pools = [Path(o.pool) for o in config.objectives.values() if o.pool]
    rows: list[dict] = []
    for p in pools:
        if p.is_file():
            rows += [{"messages": m} for m in pq.read_table(p, columns=["messages"])["messages"]
                     .to_pylist()]
    if not rows:
        sys.exit(f"no training pools found ({', '.join(map(str, pools))}); build the world first")
    random.Random(seed).shuffle(rows)
    out, total = [], 0
    lengths = tokenizer.apply_chat_template([r["messages"] for r in rows[:20000]], tokenize=True,
                                            return_dict=True)["input_ids"]
    for row, ids in zip(rows, lengths):
        if total >= n_tokens:
            break
        if len(ids) <= config.model.max_length:
            out.append(row)
            total += len(ids)
    return out


def eval_prompts(config: Any, n: int) -> list[list[dict]]:
    """The first user turn of every eval row (all objectives), cycled to `n` prompts."""
    import pyarrow.parquet as pq

    prompts = []
    for o in config.objectives.values():
        if o.eval and Path(o.eval).is_file():
            for msgs in pq.read_table(o.eval, columns=["messages"])["messages"].to_pylist():
                prompts.append([m for m in msgs if m["role"] == "user"][:1])
    if not prompts:
        sys.exit("no eval sets found; build the world first (mosaic world)")
    return (prompts * math.ceil(n / len(prompts)))[:n]


def plain_loop_lora(model_dir: Path, rows: list[dict], training: Any,
                    max_length: int) -> tuple[int, int]:
    """The same LoRA update with a hand-written loop: random batches, AdamW, cosine schedule."""
    import torch
    from peft import get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    from mosaic.training.models import load_model, load_tokenizer
    from mosaic.training.settings import trainer_settings

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, device="cpu", trainable=True)
    _, lora = trainer_settings(training, method="sft", output_dir=tempfile.gettempdir(),
                               max_length=max_length, device="cpu", n_rows=len(rows),
                               n_params=0, progress=False)
    torch.manual_seed(training.seed)
    model = get_peft_model(model, lora)
    model.train()
    enc = tok.apply_chat_template([r["messages"] for r in rows], tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    samples = [(ids, [t if m else -100 for t, m in zip(ids, mask)])
               for ids, mask in zip(enc["input_ids"], enc["assistant_masks"])]
    order = list(range(len(samples)))
    random.Random(training.seed).shuffle(order)
    batches = [order[k:k + training.batch_size] for k in range(0, len(order), training.batch_size)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=training.learning_rate, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, round(training.warmup_ratio * len(batches))),
                                            len(batches))
    tokens = 0
    for batch in batches:
        width = max(len(samples[i][0]) for i in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            x, y = samples[i]
            ids[r, :len(x)], labels[r, :len(y)], attn[r, :len(x)] = (
                torch.tensor(x), torch.tensor(y), 1)
            tokens += len(x)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return tokens, len(batches)


def trl_variant(model_dir: Path, rows: list[dict], training: Any, max_length: int,
                overrides: dict[str, Any]) -> tuple[int, int]:
    """trl's SFTTrainer with our settings, then `overrides` put back (timing covers train())."""
    from datasets import Dataset
    from trl import SFTTrainer

    from mosaic.training.models import load_model, load_tokenizer
    from mosaic.training.settings import trainer_settings

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, device="cpu", trainable=True)
    with tempfile.TemporaryDirectory() as out:
        args, lora = trainer_settings(training, method="sft", output_dir=out, max_length=max_length,
                                      device="cpu", n_rows=len(rows), n_params=0, progress=False)
        args = dataclasses.replace(args, **overrides)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=lora)
        trainer.train()
        return sum(map(len, trainer.train_dataset["input_ids"])), trainer.state.global_step


# ---- one measurement, in this process or in a worker process ------------------------------------


def measure(kind: str, opts: argparse.Namespace, threads: int | None, decode: str = "fast",
            batch_size: int = 64, n: int | None = None) -> dict[str, Any]:
    """Train (`kind` 'train') or generate ('generate'); returns figures and timestamps."""
    from mosaic.config import load_config
    from mosaic.sandbox.base_model import ensure_base_model

    config = load_config(opts.config)
    model_dir = ensure_base_model(config)
    if kind == "train":
        from mosaic.training.models import load_tokenizer
        from mosaic.training.train import train_adapter

        import hashlib

        rows = training_rows(config, opts.train_tokens, load_tokenizer(model_dir), config.seed)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.time()
            with Timer() as t:
                result = train_adapter(rows, base_model=model_dir,
                                       adapter_dir=Path(tmp) / "adapter", training=config.training,
                                       max_length=config.model.max_length, progress=False,
                                       threads=threads)
            end = time.time()
            weights = hashlib.sha256((Path(tmp) / "adapter" / "adapter_model.safetensors")
                                     .read_bytes()).hexdigest()
        return {"tokens": result.train_tokens, "steps": result.steps, "wall": t.wall,
                "cpu": t.cpu, "load": t.load, "start": start, "end": end, "adapter": weights}
    from mosaic.training.transformers_backend import TransformersBackend

    prompts = eval_prompts(config, n or opts.prompts)
    backend = TransformersBackend(model_dir, batch_size=batch_size, config=config, decode=decode,
                                  threads=threads)
    backend.generate(prompts[:4], max_new_tokens=config.inference.max_new_tokens)  # warm-up
    start = time.time()
    with Timer() as t:
        replies = backend.generate(prompts, max_new_tokens=config.inference.max_new_tokens)
    end = time.time()
    return {"tokens": backend.stats.new_tokens, "prompts": len(prompts), "wall": t.wall,
            "cpu": t.cpu, "load": t.load, "start": start, "end": end, "replies": replies}


def pair(kind: str, opts: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    """Two identical measurements at once in two worker processes (one thread each): the
    aggregate throughput is both tokens over the span from the first start to the last end."""
    args = [sys.executable, __file__, "--config", opts.config, "--train-tokens",
            str(opts.train_tokens), "--prompts", str(opts.prompts), "--worker",
            json.dumps({"kind": kind, **kw})]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            sys.exit(f"worker failed ({p.returncode})")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    span = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    return {"tokens": sum(o["tokens"] for o in outs), "wall": span,
            "cpu": sum(o["cpu"] for o in outs), "load": max(o["load"] for o in outs),
            "each": [o["wall"] for o in outs]}


# ---- the bench --------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/sandbox.yaml")
    ap.add_argument("--train-tokens", type=int, default=100_000)
    ap.add_argument("--prompts", type=int, default=256, help="prompts for the generation bench")
    ap.add_argument("--single-prompts", type=int, default=64,
                    help="prompts generated one at a time (batch size 1)")
    ap.add_argument("--threads", default="1,2,policy",
                    help="thread settings to measure: counts, and/or 'policy' (unset)")
    ap.add_argument("--pairs", action="store_true",
                    help="also two trainings / generations at once, one thread each")
    ap.add_argument("--variants", default="trl-defaults,no-grouping",
                    help=f"comma list of trl variants to time too, from {sorted(VARIANTS)}, or ''")
    ap.add_argument("--skip", default="", help="train and/or generate")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.worker:
        spec = json.loads(opts.worker)
        out = measure(spec.pop("kind"), opts, **spec)
        out.pop("replies", None)
        print(json.dumps(out))
        return

    from mosaic.config import load_config
    from mosaic.sandbox.base_model import ensure_base_model
    from mosaic.training.models import load_tokenizer

    config = load_config(opts.config)
    model_dir = ensure_base_model(config)
    threads = [None if t == "policy" else int(t) for t in opts.threads.split(",") if t]
    skip = set(filter(None, opts.skip.split(",")))
    print(f"model {model_dir}  cores {os.cpu_count()}  {load()}")

    def label(t: int | None) -> str:
        return "policy" if t is None else f"{t} thread{'s' if t > 1 else ''}"

    def row(name: str, r: dict[str, Any], base: float | None = None, extra: str = "") -> None:
        rate = r["tokens"] / r["wall"]
        ratio = f"{rate / base:5.2f}x" if base else "   --"
        print(f"  {name:<34} {r['tokens']:>8} tok {r['wall']:7.1f} s wall {rate:7.0f} tok/s "
              f"{ratio}  (cpu {r['cpu']:6.1f} s)  load {r['load']:.2f}{extra}", flush=True)

    if "generate" not in skip:
        new = config.inference.max_new_tokens
        print(f"generation (greedy, max {new} new tokens, {opts.prompts} prompts at batch "
              f"{config.inference.batch_size}; ratio: new tokens/s over the current path, "
              f"1 thread):")
        ref = measure("generate", opts, 1, decode="generate")
        row("current (generate), 1 thread", ref, ref["tokens"] / ref["wall"])
        base = ref["tokens"] / ref["wall"]
        for decode in ("generate", "fast"):
            for t in threads:
                if (decode, t) == ("generate", 1):
                    continue
                r = measure("generate", opts, t, decode=decode)
                same = "  same replies" if r["replies"] == ref["replies"] else "  REPLIES DIFFER"
                row(f"{'current (generate)' if decode == 'generate' else 'new (fast)'}, "
                    f"{label(t)}", r, base, same)
        if opts.pairs:
            for decode in ("generate", "fast"):
                r = pair("generate", opts, threads=1, decode=decode)
                row(f"{decode}: 2 processes x 1 thread", r, base,
                    f"  (each {r['each'][0]:.1f} / {r['each'][1]:.1f} s)")
        print(f"  batch size 1, {opts.single_prompts} prompts:")
        one = {d: measure("generate", opts, 1, decode=d, batch_size=1, n=opts.single_prompts)
               for d in ("generate", "fast")}
        b1 = one["generate"]["tokens"] / one["generate"]["wall"]
        for d, r in one.items():
            row(f"{d}, batch 1, 1 thread", r, b1)

    if "train" not in skip:
        training, max_length = config.training, config.model.max_length
        rows = training_rows(config, opts.train_tokens, load_tokenizer(model_dir), config.seed)
        print(f"training (LoRA SFT r={training.lora_r}, batch {training.batch_size}, one epoch of "
              f"{len(rows)} rows; ratio over 1 thread):")
        runs = {t: measure("train", opts, t) for t in threads}
        first = runs[threads[0]]
        base = first["tokens"] / first["wall"]
        for t, r in runs.items():
            same = ("  same adapter" if r["adapter"] == first["adapter"]
                    else "  adapter differs (float rounding)")
            row(f"mosaic trainer, {label(t)}", r, base, same)
        if opts.pairs:
            r = pair("train", opts, threads=1)
            row("mosaic trainer: 2 processes x 1", r, base,
                f"  (each {r['each'][0]:.1f} / {r['each'][1]:.1f} s)")
        from mosaic.training.models import cpu_threads

        small = 3_500_000  # the sandbox model: below models.SMALL_MODEL_PARAMS
        with Timer() as t, cpu_threads(small, "cpu", 1):
            tokens, steps = plain_loop_lora(model_dir, rows, training, max_length)
        row("plain torch loop, 1 thread", {"tokens": tokens, "wall": t.wall, "cpu": t.cpu,
                                           "load": t.load}, base)
        for name in filter(None, opts.variants.split(",")):
            with Timer() as t, cpu_threads(small, "cpu", 1):
                tokens, steps = trl_variant(model_dir, rows, training, max_length, VARIANTS[name])
            row(f"trl, {name}, 1 thread", {"tokens": tokens, "wall": t.wall, "cpu": t.cpu,
                                           "load": t.load}, base)


if __name__ == "__main__":
    main()
