"""Training and generation throughput of the sandbox-sized model on this machine.

Prints tokens/s for LoRA SFT through MOSAIC's trainer (trl SFTTrainer with our settings), for a
plain torch loop doing the same LoRA updates (the baseline DESIGN.md measured), optionally for
trl with its own defaults (what made it ~2x slower), and for batched vs. one-at-a-time greedy
generation. Machines shared with other jobs make wall time noisy, so CPU time is shown too.

    .venv/bin/python bench/train_generate_bench.py [--config configs/sandbox.yaml]
        [--train-tokens 100000] [--prompts 256] [--variants trl-defaults,no-grouping]

Every variant runs under the library's CPU thread policy (`models.cpu_threads`: one intra-op
thread for small models), so the rows differ only in what they name.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
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


class Timer:
    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/sandbox.yaml")
    ap.add_argument("--train-tokens", type=int, default=100_000)
    ap.add_argument("--prompts", type=int, default=256, help="prompts for the generation bench")
    ap.add_argument("--single-prompts", type=int, default=64,
                    help="prompts generated one at a time (batch size 1)")
    ap.add_argument("--variants", default="trl-defaults,no-grouping",
                    help=f"comma list of trl variants to time too, from {sorted(VARIANTS)}, or ''")
    opts = ap.parse_args()


    from mosaic.config import load_config
    from mosaic.sandbox.base_model import ensure_base_model
    from mosaic.training.models import load_tokenizer
    from mosaic.training.train import train_adapter
    from mosaic.training.transformers_backend import TransformersBackend

    config = load_config(opts.config)
    model_dir = ensure_base_model(config)
    tok = load_tokenizer(model_dir)
    rows = training_rows(config, opts.train_tokens, tok, config.seed)
    training, max_length = config.training, config.model.max_length
    print(f"model {model_dir}  rows {len(rows)}  "
          f"LoRA r={training.lora_r} batch {training.batch_size}")

    def report(name: str, tokens: int, steps: int, t: Timer) -> None:
        print(f"  {name:<28} {tokens:>8} tok {steps:>4} steps  {t.wall:6.1f} s wall "
              f"{tokens / t.wall:7.0f} tok/s   (cpu {t.cpu:6.1f} s, {tokens / t.cpu:7.0f} tok/cpu-s)")

    print("training (LoRA SFT, one epoch):")
    with tempfile.TemporaryDirectory() as tmp, Timer() as t:
        result = train_adapter(rows, base_model=model_dir, adapter_dir=Path(tmp) / "adapter",
                               training=training, max_length=max_length, progress=False)
    report("mosaic trainer (trl, tuned)", result.train_tokens, result.steps, t)
    from mosaic.training.models import cpu_threads

    small = 3_500_000  # the sandbox model: below models.SMALL_MODEL_PARAMS
    with Timer() as t, cpu_threads(small, "cpu"):
        tokens, steps = plain_loop_lora(model_dir, rows, training, max_length)
    report("plain torch loop", tokens, steps, t)
    for name in filter(None, opts.variants.split(",")):
        with Timer() as t, cpu_threads(small, "cpu"):
            tokens, steps = trl_variant(model_dir, rows, training, max_length, VARIANTS[name])
        report(f"trl, {name}", tokens, steps, t)

    print(f"generation (greedy, max {config.inference.max_new_tokens} new tokens):")
    eval_rows = []
    for o in config.objectives.values():
        if o.eval and Path(o.eval).is_file():
            import pyarrow.parquet as pq

            for msgs in pq.read_table(o.eval, columns=["messages"])["messages"].to_pylist():
                eval_rows.append([m for m in msgs if m["role"] == "user"][:1])
    if not eval_rows:
        eval_rows = [[r["messages"][0]] for r in rows]
    prompts = (eval_rows * math.ceil(opts.prompts / len(eval_rows)))[:opts.prompts]
    for bs, n in ((config.inference.batch_size, len(prompts)), (1, opts.single_prompts)):
        backend = TransformersBackend(model_dir, batch_size=bs, config=config)
        with Timer() as t:
            backend.generate(prompts[:n], max_new_tokens=config.inference.max_new_tokens)
        s = backend.stats
        print(f"  batch size {bs:<3} {n:>5} prompts {s.new_tokens:>7} new tok  {t.wall:6.1f} s wall "
              f"{s.new_tokens / t.wall:7.0f} tok/s  {n / t.wall:6.1f} prompts/s   "
              f"(cpu {t.cpu:6.1f} s)")


if __name__ == "__main__":
    main()
