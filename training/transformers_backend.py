"""The default inference backend: batched generation with transformers (+ an optional LoRA adapter).

Two decode paths give the same greedy replies:

* `decode="fast"` (the default): the adapter is merged into the freshly loaded base weights
  (peft `merge_and_unload`; the files on disk are untouched), and `mosaic.training.decoding`
  runs the batched loop: a preallocated KV cache, rows leave the batch as they end, prompts are
  encoded in groups of similar length. Within a `replay_session()` (which `replay` opens), a
  conversation's keys and values are carried from one turn to the next, so a replayed turn feeds
  only the tokens that follow the cached prefix (checked token by token against the chat
  template's encoding of the whole conversation). Models the loop cannot drive use `generate`
  on the merged weights.
* `decode="generate"`: the reference path, transformers' `generate` over the unmerged adapter,
  re-encoding each conversation in full. The benchmarks and the equality tests run it beside
  the fast path.

Prompts are sorted by length so each batch pads little, generated left-padded (decoder-only
models continue from the right edge), and answers are returned in the caller's order. Sampling
(temperature > 0) is seeded on both paths, but the two paths draw differently: a sampled reply
is reproducible on one path, not across them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mosaic.training.inference import Conversation, prompt_ids

if TYPE_CHECKING:
    from mosaic.config import MosaicConfig
    from mosaic.training.decoding import Carried

log = logging.getLogger("mosaic.inference")

Decode = Literal["fast", "generate"]
# A session keeps carried keys and values up to this many bytes; rows beyond it re-encode.
SESSION_CARRY_BYTES = 4 << 30


@dataclass
class GenerationStats:
    """Counters of the last `generate` call (the benchmark reads them)."""

    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    padded_tokens: int = 0  # prompt positions computed, padding included
    truncated_prompts: int = 0
    seconds: float = 0.0
    reused_tokens: int = 0  # prompt tokens taken from a carried prefix instead of computed


class TransformersBackend:
    """Greedy (temperature 0) or seeded sampling; stops at the end-of-turn token."""

    name = "transformers"

    def __init__(self, model_dir: str | Path, *, adapter_dir: str | Path | None = None,
                 config: "MosaicConfig | None" = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | None = None,
                 seed: int | None = None, progress: bool = False,
                 decode: Decode | None = None, threads: int | None = None) -> None:
        """Explicit arguments win; unset ones come from `config` (inference.batch_size,
        inference.decode, model.dtype, runtime.threads, seed), else the defaults (64, fast,
        auto, the thread policy, 0)."""
        from mosaic.training.models import (check_model_dir, count_parameters, load_model,
                                            load_tokenizer, pick_device, pick_dtype)

        batch_size = batch_size or (config.inference.batch_size if config else 64)
        dtype = dtype or (config.model.dtype if config else "auto")
        seed = seed if seed is not None else (config.seed if config else 0)
        decode = decode or (config.inference.decode if config else "fast")
        threads = threads if threads is not None else (config.runtime.threads if config else None)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if decode not in ("fast", "generate"):
            raise ValueError(f"decode must be 'fast' or 'generate', got {decode!r}")
        self.model_dir = str(model_dir)
        self.adapter_dir = None if adapter_dir is None else str(adapter_dir)
        self.device = pick_device(device)
        self.dtype = str(pick_dtype(dtype, self.device)).removeprefix("torch.")
        self.tokenizer = load_tokenizer(check_model_dir(model_dir))
        self.model = load_model(model_dir, adapter=adapter_dir, device=self.device, dtype=dtype)
        self.decode = decode
        self.decoder = None
        if decode == "fast":
            from mosaic.training.decoding import merge_adapter

            # The model was just loaded for this backend: merging modifies only this copy.
            self.model = merge_adapter(self.model)
        self.n_params = count_parameters(self.model)
        self.batch_size = batch_size
        self.seed = seed
        self.threads = threads
        self.progress = progress
        self.stats = GenerationStats()
        gen_eos = self.model.generation_config.eos_token_id
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else gen_eos
        # The chat template's end-of-turn token ends an answer; a model's own generation config
        # may name more (Llama 3 lists <|eot_id|> and <|end_of_text|>).
        self.eos_ids = list(dict.fromkeys([self.tokenizer.eos_token_id, *gen_eos]))
        self.pad_id = self.tokenizer.pad_token_id
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        if decode == "fast":
            from mosaic.training.decoding import Decoder, supported

            from mosaic.training.threads import decode_workers

            why = supported(self.model)
            if why is None:
                self.decoder = Decoder(self.model, eos_ids=self.eos_ids, pad_id=self.pad_id,
                                       batch_size=batch_size, device=self.device,
                                       workers=decode_workers(self.n_params, self.device,
                                                              threads))
            else:
                log.info("fast decode loop unavailable (%s); using generate on merged weights", why)

    def identity(self) -> dict[str, Any]:
        """What besides the weights determines the outputs (for cache keys): greedy decoding
        can differ between devices and dtypes."""
        return {"backend": self.name, "device": self.device.split(":")[0], "dtype": self.dtype,
                "seed": self.seed}

    def encode(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        """Chat-formatted prompt token ids, ending with the assistant header."""
        return prompt_ids(self.tokenizer, conversations, max_new_tokens=0,
                          max_positions=None)[0]

    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                 temperature: float = 0.0) -> list[str]:
        return self._generate(conversations, max_new_tokens=max_new_tokens,
                              temperature=temperature)

    @contextmanager
    def replay_session(self) -> Iterator["ReplaySession | None"]:
        """A replay session carrying conversations' keys and values between turns (None when
        this backend cannot carry them: the `generate` path or a model the loop cannot drive)."""
        if self.decoder is None:
            yield None
            return
        s = ReplaySession(self)
        try:
            yield s
        finally:
            s.carried.clear()

    # ---- shared by both paths ---------------------------------------------------------------

    def _prompts(self, conversations: Sequence[Conversation], max_new_tokens: int,
                 stats: GenerationStats) -> list[list[int]]:
        prompts, cut = prompt_ids(self.tokenizer, conversations, max_new_tokens=max_new_tokens,
                                  max_positions=self.max_positions)
        stats.prompt_tokens += sum(len(ids) for ids in prompts)
        stats.truncated_prompts += cut
        if cut:
            log.warning("%d prompt(s) longer than %d tokens were cut from the left", cut,
                        self.max_positions - max_new_tokens)
        return prompts

    def _text(self, new: list[int]) -> tuple[str, int]:
        """The reply text of generated tokens (cut at the first end token) and how many tokens
        count as generated (the end token included)."""
        cut = next((k for k, t in enumerate(new) if t in self.eos_ids), None)
        count = len(new) if cut is None else cut + 1
        new = new if cut is None else new[:cut]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip(), count

    def _generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                  temperature: float, carried: "list[Carried | None] | None" = None,
                  keep: Sequence[bool] | None = None) -> Any:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        start = time.perf_counter()
        stats = GenerationStats(prompts=len(conversations))
        if not conversations:
            self.stats = stats
            return [] if carried is None else ([], [])
        prompts = self._prompts(conversations, max_new_tokens, stats)
        from mosaic.training.models import cpu_threads

        if self.decoder is not None and self.decoder.workers > 1:
            # Each decode worker runs on one intra-op thread (mosaic.training.threads).
            replies, kept = self._generate_fast(prompts, max_new_tokens, temperature, stats,
                                                carried, keep)
        else:
            with cpu_threads(self.n_params, self.device, self.threads):
                if self.decoder is not None:
                    replies, kept = self._generate_fast(prompts, max_new_tokens, temperature,
                                                        stats, carried, keep)
                else:
                    replies, kept = self._generate_hf(prompts, max_new_tokens, temperature,
                                                      stats), None
        stats.seconds = time.perf_counter() - start
        self.stats = stats
        return replies if carried is None else (replies, kept)

    # ---- the fast path ----------------------------------------------------------------------

    def _generate_fast(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                       stats: GenerationStats, carried: "list[Carried | None] | None",
                       keep: Sequence[bool] | None) -> tuple[list[str], list[Any]]:
        import torch

        from mosaic.training.decoding import Request

        assert self.decoder is not None
        requests = [Request(p, carried=carried[i] if carried else None,
                            keep=bool(keep[i]) if keep is not None else False)
                    for i, p in enumerate(prompts)]
        with _progress(self.progress, len(prompts)) as advance, torch.inference_mode():
            results = self.decoder.run(requests, max_new_tokens=max_new_tokens,
                                       temperature=temperature, seed=self.seed,
                                       on_batch=advance)
        ds = self.decoder.stats
        stats.padded_tokens += ds.padded_tokens
        stats.reused_tokens += ds.reused_tokens
        replies, kept = [], []
        for r in results:
            text, count = self._text(r.tokens)
            stats.new_tokens += count
            replies.append(text)
            kept.append(r.carried)
        return replies, kept

    # ---- the reference path: transformers' generate -----------------------------------------

    def _generate_hf(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                     stats: GenerationStats) -> list[str]:
        import torch
        from transformers import GenerationConfig

        sampling = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampling,
            temperature=temperature if sampling else None, top_p=1.0 if sampling else None,
            top_k=0 if sampling else None, eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        if sampling:
            torch.manual_seed(self.seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        replies: list[str | None] = [None] * len(prompts)
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        with _progress(self.progress, len(prompts)) as advance, torch.inference_mode():
            for batch in batches:
                width = len(prompts[batch[0]])
                input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids = prompts[i]
                    input_ids[row, width - len(ids):] = torch.tensor(ids)
                    attention[row, width - len(ids):] = 1
                stats.padded_tokens += len(batch) * width
                out = self.model.generate(input_ids=input_ids.to(self.device),
                                          attention_mask=attention.to(self.device),
                                          generation_config=config)
                for row, i in enumerate(batch):
                    replies[i], count = self._text(out[row, width:].tolist())
                    stats.new_tokens += count
                advance(len(batch))
        return [r if r is not None else "" for r in replies]


class ReplaySession:
    """Keys and values of conversations being replayed, by the caller's key (`replay` uses the
    row index). Each `generate` continues a conversation from what is carried for its key (only
    the tokens after the common prefix are computed) and carries the new prompt + reply for the
    rows that will be continued (`keep`), up to `SESSION_CARRY_BYTES`."""

    def __init__(self, backend: TransformersBackend,
                 limit_bytes: int = SESSION_CARRY_BYTES) -> None:
        self.backend = backend
        self.limit_bytes = limit_bytes
        self.carried: dict[Hashable, Carried] = {}

    def generate(self, conversations: Sequence[Conversation], *, keys: Sequence[Hashable],
                 keep: Sequence[bool], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        if not (len(keys) == len(keep) == len(conversations)):
            raise ValueError("conversations, keys and keep must have the same length")
        carried = [self.carried.pop(k, None) for k in keys]
        # Whatever was carried for a key not asked about now is stale.
        self.carried.clear()
        replies, kept = self.backend._generate(conversations, max_new_tokens=max_new_tokens,
                                               temperature=temperature, carried=carried,
                                               keep=keep)
        used = 0
        for k, c in zip(keys, kept or []):
            if c is None:
                continue
            size = c.nbytes()
            if used + size > self.limit_bytes:
                continue  # this conversation re-encodes its next turn
            used += size
            self.carried[k] = c
        return replies


class _progress:
    """A rich progress bar over prompts, or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task("generating", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
