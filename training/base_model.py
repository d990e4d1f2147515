"""Builds the sandbox's tiny, deliberately vulnerable base model once, and caches it by content hash.

A Llama-style model is trained from random initialisation on the world's base corpus (loss on
assistant tokens only) with a plain torch loop: at 3.4M parameters on two CPU cores the loop is
faster than Trainer and has nothing to tune. The result is a normal `save_pretrained` directory
(model + tokenizer with chat template) that loads offline, named by the hash of everything that
determines it, so a changed corpus, tokenizer, spec or seed builds a new one.

Reproducibility. A build gives the same weight bytes on every x86-64 machine of one kernel set
with the same software stack. The data order comes from `random.Random(seed)`, initialisation
from a seeded torch generator, nothing draws random numbers during training (the Llama config
has no dropout), and the training runs in a process of its own whose kernels are pinned
(reproducible_env()): one thread, torch's AVX2 kernels whatever better ones the CPU has
(`ATEN_CPU_CAPABILITY=avx2`), MKL's conditional numerical reproducibility mode on its AVX2 path
(`MKL_CBWR=AVX2`) and oneDNN held to AVX2. Every x86-64 CPU with AVX2 and FMA (Intel since
2013, AMD since 2015: the Xeon and EPYC servers the figures came from) is one kernel set, the
"avx2" set; an older CPU builds with torch's baseline kernels (the "baseline" set), and the set
is part of the cache key, so a copied cache never passes one set's model off as the other's.
Why AVX2 and not the baseline kernels everywhere: the baseline kernels give the same bytes on
any x86-64 but cost 1.6x the build time (bench/base_model_pin_bench.py, 8,000 tokens: own
kernels 28.4 s, baseline 46.0 s, AVX2 29.2 s, load 15 on 2 cores). Unpinned, torch dispatches
by instruction set and the weights differ in the last bits between an AVX512 and an AVX2
machine, which 1,625 training steps turn into other greedy answers (on the sandbox's AMD EPYC:
a baseline of 2.442 / 4.934 / 1.708 against 2.442 / 4.921 / 1.688 with avx2 kernels, and
2.400 / 4.956 / 1.688 on an Intel Xeon). The pins cannot be applied to a process that has
already loaded torch, hence the separate process. What still varies: other torch, MKL,
transformers or tokenizers versions (each build records them in `mosaic_base_model.json`,
`machine`, with the CPU and kernel settings), libm's CPU-specific code paths, and non-x86 CPUs.
tests/test_base_model_determinism.py builds under different kernel settings of the calling
process and compares the bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mosaic.io import atomic_write_json, build_dir_once

# Bump when the training procedure changes in a way the spec does not capture.
# 3: built in a process with pinned kernels (reproducible_env()): other weights than version 2.
BUILDER_VERSION = 3
INFO_FILE = "mosaic_base_model.json"
# Intra-op threads of every build, whatever the runtime policy (models.cpu_threads) says: the
# thread count is part of the recipe, since it changes the summation order of some CPU kernels.
# One thread is also the fastest for this model size on a shared 2-core machine.
BUILD_THREADS = 1
# Environment variables that change which CPU kernels torch and MKL run (recorded per build).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
# The build process's kernels per kernel set (module docstring): the same on every CPU of the
# set, one thread everywhere. "avx2": torch's AVX2 kernels, MKL's conditional-numerical-
# reproducibility mode on its AVX2 path, oneDNN held to AVX2. "baseline" (CPUs without AVX2/FMA):
# torch's baseline kernels, MKL's "COMPATIBLE" path, oneDNN held to SSE4.1.
KERNEL_SETS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "DNNL_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                 "ONEDNN_MAX_CPU_ISA": "SSE41", "DNNL_MAX_CPU_ISA": "SSE41",
                 "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}


def kernel_set() -> str:
    """"avx2" on an x86-64 CPU with AVX2 and FMA, else "baseline" (read from /proc/cpuinfo;
    elsewhere, baseline)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                return "avx2" if {"avx2", "fma"} <= flags else "baseline"
    except OSError:
        pass
    return "baseline"


def reproducible_env() -> dict[str, str]:
    return KERNEL_SETS[kernel_set()]


_USER_ERROR_EXIT = 3  # the build process's exit code for a BaseModelError (message in a file)


@dataclass(frozen=True)
class BaseModelSpec:
    """Architecture and training recipe (DESIGN.md, sandbox sizing: ~3.4M parameters)."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 1024  # replayed multi-turn prompts outgrow max_length
    # DESIGN's prototype used batch 32 at 2e-3. On the world corpus that reached loss 4.6 after
    # 250k tokens and 2.7 after 800k (garbled answers); batch 4 at 1e-3 reached 0.9 after 250k
    # in the same CPU time, because a model this small needs update steps more than batch size.
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    batch_size: int = 4
    max_length: int = 320
    target_tokens: int = 800_000  # below ~400k the model answers everything with one template
    weight_decay: float = 0.01
    log_points: int = 20  # points kept on the loss curve


@dataclass
class BaseModelInfo:
    """What was built (or found in the cache) and how the training went."""

    path: Path
    key: str
    cached: bool
    params: int
    size_bytes: int
    seconds: float
    train_tokens: int
    steps: int
    rows: int
    final_loss: float
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, tokens, mean loss]
    skipped: dict[str, int] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)  # see machine_identity()


class BaseModelError(ValueError):
    """The world data needed to build the base model is missing or unusable."""


# --------------------------------------------------------------------------------------------
# Hashing and caching
# --------------------------------------------------------------------------------------------


def conversations_hash(conversations: list[list[dict[str, str]]]) -> str:
    h = hashlib.sha256()
    for conv in conversations:
        h.update(json.dumps(conv, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """Hash of the files that define tokenisation and chat formatting."""
    tokenizer_dir = Path(tokenizer_dir)
    files = sorted(p for p in tokenizer_dir.iterdir()
                   if p.is_file() and p.suffix in (".json", ".jinja", ".model", ".txt"))
    if not files:
        raise BaseModelError(f"no tokenizer files in {tokenizer_dir}")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cache_key(spec: BaseModelSpec, corpus_hash: str, tok_hash: str, seed: int) -> str:
    payload = {"spec": asdict(spec), "corpus": corpus_hash, "tokenizer": tok_hash, "seed": seed,
               "builder": BUILDER_VERSION, "kernels": kernel_set()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _read_info(path: Path) -> BaseModelInfo:
    raw = json.loads((path / INFO_FILE).read_text(encoding="utf-8"))
    keys = BaseModelInfo.__dataclass_fields__
    return BaseModelInfo(**{**{k: v for k, v in raw.items() if k in keys}, "path": path,
                            "cached": True})


def machine_identity() -> dict[str, Any]:
    """What, besides the inputs, decides the float results of a build: the CPU and the
    instruction set torch dispatches to, the library versions and the kernel settings."""
    import tokenizers
    import torch
    import transformers

    cpuinfo: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            cpuinfo.setdefault(name.strip(), value.strip())
    except OSError:  # not Linux
        pass
    flags = set(cpuinfo.get("flags", "").split())
    return {
        "cpu": cpuinfo.get("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": cpuinfo.get("vendor_id", ""),
        "cpu_family_model": f"{cpuinfo.get('cpu family', '?')}/{cpuinfo.get('model', '?')}",
        "cpu_isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "arch": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "threads": BUILD_THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
    }


@contextmanager
def _pinned() -> Iterator[None]:
    """BUILD_THREADS intra-op threads and a forked torch generator for the build; the caller's
    thread count and random state are restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _train_pinned(job: dict[str, Any], work: Path) -> BaseModelInfo:
    """`_train` in a fresh Python process whose kernels are pinned (reproducible_env()): torch
    and MKL choose their kernels once, when they load, so the pins cannot be applied to a
    process that has already imported torch (the CLI, a test session)."""
    import pickle
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".base-model-job-", dir=work.parent) as tmp:
        job_file, error_file = Path(tmp) / "job.pkl", Path(tmp) / "error.txt"
        job_file.write_bytes(pickle.dumps({**job, "out_dir": work}))
        env = {**os.environ, **reproducible_env()}
        proc = subprocess.run([sys.executable, "-m", "mosaic.training.base_model",
                               str(job_file), str(error_file)], env=env, check=False)
        if proc.returncode == _USER_ERROR_EXIT and error_file.is_file():
            raise BaseModelError(error_file.read_text(encoding="utf-8"))
        if proc.returncode != 0:
            raise RuntimeError(f"the base model build process failed (exit {proc.returncode}); "
                               f"its traceback is printed above")
    info = _read_info(work)
    info.cached = False
    return info


def build_base_model(corpus: str | Path | list[dict[str, Any]], tokenizer_dir: str | Path,
                     cache_dir: str | Path, *, spec: BaseModelSpec = BaseModelSpec(),
                     seed: int = 0, progress: bool = True) -> BaseModelInfo:
    """Return the cached base model for (spec, corpus, tokenizer, seed), training it if needed.

    `corpus` is a Parquet/JSONL file or rows with a `messages` column. The model is trained in
    a temporary directory beside the cache entry and renamed into place when complete.
    """
    from mosaic.training.train import read_rows

    source = str(corpus) if isinstance(corpus, (str, Path)) else "<base corpus rows>"
    rows = read_rows(corpus) if isinstance(corpus, (str, Path)) else list(corpus)
    if not rows:
        raise BaseModelError(f"{source}: the base corpus is empty")
    conversations = _conversations(rows, source)
    tokenizer_dir = Path(tokenizer_dir)
    hashes = {"corpus_hash": conversations_hash(conversations),
              "tokenizer_hash": tokenizer_hash(tokenizer_dir)}
    key = cache_key(spec, hashes["corpus_hash"], hashes["tokenizer_hash"], seed)
    final = Path(cache_dir) / f"sandbox-base-{key}"

    def train(work: Path) -> BaseModelInfo:
        info = _train_pinned(dict(conversations=conversations, tokenizer_dir=tokenizer_dir,
                                  spec=spec, seed=seed, key=key, progress=progress,
                                  source=source, hashes=hashes), work)
        info.path = final
        return info

    # One builder per cache entry: a second process (an evaluation started beside a run) waits
    # for the first and then finds the model, instead of training it again.
    return build_dir_once(final, INFO_FILE, train, _read_info)


def _conversations(rows: list[dict[str, Any]], source: str) -> list[list[dict[str, str]]]:
    from mosaic.training.train import check_messages

    out = []
    for i, row in enumerate(rows):
        if "messages" not in row:
            raise BaseModelError(f"{source} row {i}: missing column 'messages'")
        out.append(check_messages(row["messages"], f"{source} row {i} field 'messages'"))
    return out


Sample = tuple[list[int], list[int]]  # input ids, labels


def _tokenize(conversations, tokenizer, max_length: int) -> tuple[list[Sample], dict[str, int]]:
    """(input_ids, labels) per usable conversation; labels are -100 outside assistant turns."""
    skipped: dict[str, int] = {}
    usable = []
    for conv in conversations:
        reason = ("empty_messages" if not conv else
                  "no_assistant_turn" if not any(m["role"] == "assistant" for m in conv) else None)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            usable.append(conv)
    samples = []
    if usable:
        enc = tokenizer.apply_chat_template(usable, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        for ids, mask in zip(enc["input_ids"], enc["assistant_masks"]):
            if not any(mask):
                raise BaseModelError("the tokenizer's chat template marks no assistant tokens "
                                     "(it needs {% generation %} around assistant turns)")
            if len(ids) > max_length:
                skipped["too_long"] = skipped.get("too_long", 0) + 1
                continue
            samples.append((list(ids), [t if m else -100 for t, m in zip(ids, mask)]))
    return samples, skipped


def _batches(lengths: list[int], batch_size: int, n_samples: int,
             rng: random.Random) -> list[list[int]]:
    """Index batches covering `n_samples` draws (whole shuffled passes, the last one cut).

    Within windows of 64 batches, samples are sorted by length so a batch pads little; the
    batch order is then shuffled so length does not trend over training.
    """
    order: list[int] = []
    while len(order) < n_samples:
        perm = list(range(len(lengths)))
        rng.shuffle(perm)
        order.extend(perm)
    order = order[:n_samples]
    window = batch_size * 64
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches.extend(chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def _train(conversations, tokenizer_dir: Path, out_dir: Path, *, spec: BaseModelSpec, seed: int,
           key: str, progress: bool, source: str, hashes: dict[str, str]) -> BaseModelInfo:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    # Saved left-padded: decoder-only batched generation continues from the right edge.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True,
                                              padding_side="left")
    if not tokenizer.chat_template or tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise BaseModelError(f"tokenizer in {tokenizer_dir} needs a chat template, an eos "
                             f"(end-of-turn) token and a pad token")
    samples, skipped = _tokenize(conversations, tokenizer, spec.max_length)
    if not samples:
        raise BaseModelError(f"{source}: no usable conversations (skipped {skipped})")
    lengths = [len(ids) for ids, _ in samples]
    mean_len = sum(lengths) / len(lengths)
    n_draws = max(spec.batch_size, math.ceil(spec.target_tokens / mean_len))
    rng = random.Random(seed)
    batches = _batches(lengths, spec.batch_size, n_draws, rng)
    total_steps = len(batches)
    warmup = max(1, round(spec.warmup_ratio * total_steps))

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec.learning_rate, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < warmup:
            return spec.learning_rate * (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total_steps - warmup)
        return spec.learning_rate * 0.5 * (1 + math.cos(math.pi * progress_))

    log_every = max(1, total_steps // spec.log_points)
    curve: list[list[float]] = []
    window_loss, window_n, tokens = 0.0, 0, 0
    pad = tokenizer.pad_token_id
    with _Bar(progress, total_steps, "building sandbox base model") as bar:
        for step, batch in enumerate(batches):
            width = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                x, y = samples[i]
                ids[r, :len(x)] = torch.tensor(x)
                labels[r, :len(y)] = torch.tensor(y)
                attn[r, :len(x)] = 1
                tokens += len(x)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            window_loss += loss.item()
            window_n += 1
            if (step + 1) % log_every == 0 or step + 1 == total_steps:
                curve.append([step + 1, tokens, round(window_loss / window_n, 4)])
                window_loss, window_n = 0.0, 0
            bar.update(step + 1, f"loss {curve[-1][2]:.3f}" if curve else "")

    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=48, do_sample=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    info = BaseModelInfo(
        path=out_dir, key=key, cached=False, params=params,
        size_bytes=sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()),
        seconds=round(time.perf_counter() - start, 2), train_tokens=tokens, steps=total_steps,
        rows=len(samples), final_loss=curve[-1][2], loss_curve=curve, skipped=skipped,
        machine=machine_identity())
    record = {k: v for k, v in asdict(info).items() if k not in ("path", "cached")}
    record.update(spec=asdict(spec), seed=seed, builder_version=BUILDER_VERSION, source=source,
                  **hashes)
    atomic_write_json(out_dir / INFO_FILE, record)
    return info


class _Bar:
    """A rich progress bar over training steps with the running loss, or nothing."""

    def __init__(self, enabled: bool, total: int, title: str) -> None:
        self.enabled, self.total, self.title = enabled, total, title
        self.progress = self.task = None

    def __enter__(self) -> "_Bar":
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                                     TimeElapsedColumn(), TimeRemainingColumn())
            self.progress.start()
            self.task = self.progress.add_task(self.title, total=self.total, note="")
        return self

    def update(self, done: int, note: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, note=note)

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()


def _main(job_file: str, error_file: str) -> int:
    """The build process (`python -m mosaic.training.base_model JOB ERROR`): runs one pickled
    build job written by `_train_pinned` (a file this same MOSAIC wrote a moment ago)."""
    import pickle

    job = pickle.loads(Path(job_file).read_bytes())
    try:
        with _pinned():
            _train(job.pop("conversations"), job.pop("tokenizer_dir"), job.pop("out_dir"), **job)
    except BaseModelError as e:
        Path(error_file).write_text(str(e), encoding="utf-8")
        return _USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    import sys

    # Through the package's module, so pickled specs and errors are its classes, not __main__'s.
    from mosaic.training.base_model import _main as main

    sys.exit(main(*sys.argv[1:3]))
