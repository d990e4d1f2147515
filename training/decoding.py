"""The fast decode loop behind the transformers backend: batched greedy (or seeded sampling)
generation with a preallocated KV cache, dropping rows as they end, and continuing a
conversation from its cached prefix instead of re-encoding it.

Why not `model.generate`: for the sandbox's 3.4M-parameter model much of generate's time went
to work that produces nothing: its DynamicCache grows by `torch.cat` (a full copy of every
layer's keys and values on every step), rows that have ended keep being computed until the
longest one ends, a batch's prompts are all padded to its longest one, and a replayed multi-turn
conversation re-encodes its whole history on every turn. Here:

* every layer's keys and values live in one buffer per batch; a step writes one column in place;
* rows that end leave the batch (the buffers are compacted once a quarter of it has ended), and
  the loop stops when every row has ended;
* prompts are encoded in groups of similar length (`PREFILL_ROWS` rows), each padded only to its
  own longest prompt, before the whole batch decodes together;
* a request may bring the keys and values of a prefix (`Carried`: the previous turn's prompt and
  reply). Only the tokens after the longest common prefix are fed, so a conversation pays for
  each token once. The prefix is compared token by token with the chat template's encoding of
  the whole conversation, so whatever the template or the tokenizer does to a decoded reply, the
  model sees exactly the tokens a fresh encoding would give it.

Positions and the attention mask are per row: a row's cached tokens and its new tokens may be
separated by masked (padding) columns, and positions count only the row's own tokens, so each
row gets what it would get alone, up to the float rounding of batched matmuls (as with
`generate`'s own left padding). Greedy replies are checked against `generate`'s in the tests and
on the full sandbox eval sets (bench/round_bench.py).

Two forward passes drive the loop. Llama-shaped models (Llama, Mistral without sliding windows,
Qwen2: q/k/v/o projections, RMSNorms, rotary embeddings, a gated MLP) run `_LlamaStep`, which
calls the model's own modules layer by layer but does the attention bookkeeping itself (no
per-step mask factory, no cache object). Any other decoder with full attention runs `_HFStep`,
the model's own forward over a cache object on the same buffers. `supported(model)` says why a
model can use neither (the backend then falls back to `generate`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Compact the batch (drop ended rows from the KV buffers) once this fraction of it has ended.
COMPACT_FRACTION = 0.25
# Prompts are encoded in groups of at most this many rows of similar length (a row joins the
# group while its padding stays under PREFILL_PAD of its length), each group padded only to its
# own longest prompt.
PREFILL_ROWS = 64
PREFILL_PAD = 0.15
# Rows per batch below which a batch is not split in two for a second worker.
MIN_SPLIT_ROWS = 16
LLAMA_LIKE = ("llama", "mistral", "qwen2")


@dataclass
class Carried:
    """Keys and values of a token sequence, kept to continue it later (one tensor pair per
    layer, shape (kv_heads, len(tokens), head_dim))."""

    tokens: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)


@dataclass
class Request:
    """One prompt (already chat-formatted and truncated) and, optionally, a carried prefix."""

    prompt: list[int]
    carried: Carried | None = None
    keep: bool = False  # return the keys and values of prompt + reply to continue it later


@dataclass
class Result:
    tokens: list[int]  # generated tokens, the end-of-turn token included when it was generated
    reused: int = 0  # prompt tokens whose keys and values came from the carried prefix
    carried: Carried | None = None


@dataclass
class DecodeStats:
    """What one `Decoder.run` computed (not just what it returned)."""

    batches: int = 0
    steps: int = 0
    fed_tokens: int = 0  # prompt tokens run through the model
    reused_tokens: int = 0  # prompt tokens taken from carried prefixes instead
    padded_tokens: int = 0  # prompt positions computed, padding included
    new_tokens: int = 0
    row_steps: int = 0  # decode rows x steps computed
    attended: int = 0  # decode rows x cache columns attended over (padding included)
    compactions: int = 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _layered_cache_api() -> bool:
    try:
        from transformers.cache_utils import Cache, DynamicCache, DynamicLayer  # noqa: F401
    except ImportError:  # pragma: no cover - transformers too old
        return False
    return True


def _llama_like(model: Any) -> bool:
    config = model.config
    inner = getattr(model, "model", None)
    if config.model_type not in LLAMA_LIKE or inner is None or not hasattr(model, "lm_head"):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    need = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(inner, n) for n in need):
        return False
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in
                                   ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return False
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return False
        parts = ("input_layernorm", "post_attention_layernorm", "mlp")
        if not all(hasattr(layer, n) for n in parts):
            return False
    module = sys.modules.get(type(inner.layers[0].self_attn).__module__)
    return hasattr(module, "apply_rotary_pos_emb")


def supported(model: Any) -> str | None:
    """None if `Decoder` can drive this model, else why not."""
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    if getattr(model, "peft_config", None) is not None:
        return "an unmerged PEFT adapter (merge it first: `merge_adapter`)"
    if _llama_like(model):
        return None
    if not _layered_cache_api():
        return "this transformers version has no layered cache API"
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        layers = DynamicCache(config=config).layers
    except Exception as e:  # noqa: BLE001 - any failure means: use generate
        return f"cannot build a cache for this config ({type(e).__name__}: {e})"
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return "the model has sliding-window, linear or shared attention layers"
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params or not ({"cache", "past_key_values"} & set(params)):
        return "the model's forward takes no position_ids or cache"
    return None


def merge_adapter(model: Any) -> Any:
    """The model with its LoRA adapter folded into the weights (peft `merge_and_unload`); the
    model passed in is modified, so pass a copy you own (the backend's freshly loaded one)."""
    if getattr(model, "peft_config", None) is None:
        return model
    return model.merge_and_unload()


# ---- KV buffers ----------------------------------------------------------------------------------


class KVBuffers:
    """Every layer's keys and values for one batch: (rows, kv_heads, capacity, head_dim) each,
    allocated on first write; `length` columns are filled (shared by all rows)."""

    def __init__(self, n_layers: int, rows: int, capacity: int, length: int) -> None:
        self.rows, self.capacity, self.length = rows, capacity, length
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pending: list[list[tuple[int, int, torch.Tensor, torch.Tensor]]] = [
            [] for _ in range(n_layers)]  # carried prefixes, written at allocation

    def place(self, row: int, start: int, kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
              n: int) -> None:
        """Put the first `n` tokens of a carried prefix at columns [start, start + n) of `row`."""
        for layer, (k, v) in enumerate(kv):
            self.pending[layer].append((row, start, k[:, :n], v[:, :n]))

    def _allocate(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        shape = (self.rows, k.shape[1], self.capacity)
        self.k[layer] = k.new_zeros(shape + (k.shape[-1],))
        self.v[layer] = v.new_zeros(shape + (v.shape[-1],))
        for row, start, pk, pv in self.pending[layer]:
            self.k[layer][row, :, start:start + pk.shape[1]] = pk
            self.v[layer][row, :, start:start + pv.shape[1]] = pv
        self.pending[layer] = []

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int,
              rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values at columns [start, start + len) of `rows`; returns those rows'
        keys and values up to the written end."""
        if self.k[layer] is None:
            self._allocate(layer, k, v)
        end = start + k.shape[-2]
        kb, vb = self.k[layer], self.v[layer]
        kb[rows, :, start:end] = k
        vb[rows, :, start:end] = v
        return kb[rows, :, :end], vb[rows, :, :end]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (copies the filled columns only)."""
        n = self.length
        for bufs in (self.k, self.v):
            for i, buf in enumerate(bufs):
                if buf is None:
                    continue
                # Columns from n on are written for every row before they are read.
                new = buf.new_empty((len(keep),) + tuple(buf.shape[1:]))
                new[:, :, :n] = buf[keep, :, :n]
                bufs[i] = new
        self.rows = len(keep)

    def row_kv(self, row: int, columns: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[row][:, columns].clone(), v[row][:, columns].clone())
                for k, v in zip(self.k, self.v)]


def _cache_layer_class():
    """A transformers cache layer over `KVBuffers` (for `_HFStep`), built on first use."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, bufs: KVBuffers, index: int) -> None:
            super().__init__()
            self.bufs, self.index = bufs, index
            self.is_initialized = True

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            pass

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self.keys, self.values = self.bufs.write(self.index, key_states, value_states,
                                                     self.bufs.length)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.bufs.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.bufs.length + query_length, 0

    return BufferLayer


# ---- forward passes ------------------------------------------------------------------------------


class _HFStep:
    """The model's own forward over a cache object backed by `KVBuffers`."""

    def __init__(self, model: Any) -> None:
        from transformers.cache_utils import DynamicCache

        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_arg = "logits_to_keep" if "logits_to_keep" in params else None
        self.n_layers = len(DynamicCache(config=model.config).layers)
        self.layer_class = _cache_layer_class()
        self.prefill_rows = None  # one prefill over the whole batch (a cache object spans it)

    def __call__(self, bufs: KVBuffers, ids: torch.Tensor, pos: torch.Tensor,
                 mask: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        from transformers.cache_utils import Cache

        cache = getattr(bufs, "_hf_cache", None)
        if cache is None:
            cache = Cache(layers=[self.layer_class(bufs, i) for i in range(self.n_layers)])
            bufs._hf_cache = cache  # type: ignore[attr-defined]
        kwargs = {self.cache_arg: cache}
        if self.keep_arg:
            kwargs[self.keep_arg] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **kwargs)
        return out.logits[:, -1]


class _LlamaStep:
    """A Llama-shaped decoder's forward, module by module: the same modules and attention
    kernel as the model's own forward, with the mask built once per call from the row mask."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.n_layers = len(self.layers)
        self.rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.prefill_rows = PREFILL_ROWS

    def __call__(self, bufs: KVBuffers, ids: torch.Tensor, pos: torch.Tensor,
                 mask: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Logits of the last position of each row for `ids` (rows x q), written at columns
        [end - q, end) of `rows` in `bufs`, where end = mask.shape[1]."""
        b, q = ids.shape
        end = mask.shape[1]
        start = end - q
        keep = mask.bool()
        if q == 1:
            attn_mask = keep[:, None, None, :]
        else:
            causal = torch.ones((q, end), dtype=torch.bool, device=keep.device).tril(start)
            attn_mask = (causal[None] & keep[:, None, :])[:, None]
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, pos)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = h
            x = layer.input_layernorm(h)
            shape = (b, q, -1, attn.head_dim)
            qs = attn.q_proj(x).view(shape).transpose(1, 2)
            ks = attn.k_proj(x).view(shape).transpose(1, 2)
            vs = attn.v_proj(x).view(shape).transpose(1, 2)
            qs, ks = self.rope(qs, ks, cos, sin)
            keys, values = bufs.write(i, ks, vs, start, rows)
            groups = qs.shape[1] // keys.shape[1]
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            o = torch.nn.functional.scaled_dot_product_attention(
                qs, keys, values, attn_mask=attn_mask, dropout_p=0.0, scale=attn.scaling)
            o = o.transpose(1, 2).contiguous().reshape(b, q, -1)
            h = residual + attn.o_proj(o)
            residual = h
            h = residual + layer.mlp(layer.post_attention_layernorm(h))
        h = self.inner.norm(h[:, -1:])
        return self.model.lm_head(h)[:, -1]


# ---- the loop ------------------------------------------------------------------------------------


def plan_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Row ranges of the batches of n length-sorted rows: ceil(n / batch_size) batches of
    near-equal size, made an even number once there are rows enough for two (>= 32), so two
    workers share them evenly. The plan depends on n and batch_size only, never on the
    workers: a row's batch, hence its float rounding, is the same whatever the thread setting."""
    if n == 0:
        return []
    k = -(-n // batch_size)
    if k % 2 and n >= 2 * MIN_SPLIT_ROWS:
        k += 1
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]


@dataclass
class _Row:
    index: int  # position in the caller's request list
    request: Request
    reuse: int  # leading prompt tokens taken from the carried prefix
    new: list[int] = field(default_factory=list)
    done: bool = False


class Decoder:
    """Batched decoding of `model` (see the module doc). `model` must not carry an unmerged
    adapter (`merge_adapter`)."""

    def __init__(self, model: Any, *, eos_ids: Sequence[int], pad_id: int, batch_size: int,
                 device: str, step: str = "auto", workers: int = 1) -> None:
        why = supported(model)
        if why is not None:
            raise ValueError(f"the fast decode loop cannot drive this model: {why}")
        if step not in ("auto", "llama", "hf"):
            raise ValueError(f"step must be auto, llama or hf, got {step!r}")
        use_llama = step == "llama" or (step == "auto" and _llama_like(model))
        if step == "llama" and not _llama_like(model):
            raise ValueError("step 'llama' needs a Llama-shaped model")
        self.step = _LlamaStep(model) if use_llama else _HFStep(model)
        self.model = model
        self.eos = set(eos_ids)
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.device = device
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.stats = DecodeStats()

    def run(self, requests: Sequence[Request], *, max_new_tokens: int, temperature: float = 0.0,
            seed: int = 0, on_batch: Callable[[int], None] | None = None) -> list[Result]:
        """Generate for every request; results in request order. `on_batch(n)` reports each
        finished batch of n requests. Sampling (temperature > 0) draws from one generator per
        batch seeded by (`seed`, batch), so it does not depend on `workers`."""
        rows = []
        for i, req in enumerate(requests):
            if not req.prompt:
                raise ValueError(f"request {i} has an empty prompt")
            reuse = 0
            if req.carried is not None:
                # At least one prompt token is fed: its logits give the first new token.
                reuse = min(common_prefix(req.carried.tokens, req.prompt), len(req.prompt) - 1)
            rows.append(_Row(i, req, reuse))
        # Longest prompt first, so a batch's rows attend over similar lengths; within a batch
        # the rows are encoded in groups of similar feed length (`_batch`).
        order = sorted(rows, key=lambda r: (len(r.request.prompt), -r.reuse), reverse=True)
        batches = [order[a:b] for a, b in plan_batches(len(order), self.batch_size)]
        stats = [DecodeStats() for _ in batches]
        results: list[Result | None] = [None] * len(requests)

        def work(k: int) -> list[tuple[_Row, Result]]:
            generator = None
            if temperature > 0:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + k)
            out = self._batch(batches[k], max_new_tokens, temperature, generator, stats[k])
            if on_batch is not None:
                on_batch(len(batches[k]))
            return out

        if self.workers > 1 and len(batches) > 1:
            from concurrent.futures import ThreadPoolExecutor

            # One intra-op thread per worker: the batches run side by side, each computed as
            # it would be alone (no thread waits on another inside an op). Setting it also sets
            # MKL's process-wide count, which the caller's setting is given back afterwards.
            before = torch.get_num_threads()
            try:
                with ThreadPoolExecutor(max_workers=min(self.workers, len(batches)),
                                        initializer=torch.set_num_threads,
                                        initargs=(1,)) as pool:
                    done = list(pool.map(work, range(len(batches))))
            finally:
                torch.set_num_threads(before)
        else:
            done = [work(k) for k in range(len(batches))]
        for part in done:
            for row, result in part:
                results[row.index] = result
        self.stats = DecodeStats()
        for st in stats:
            for f, v in vars(st).items():
                setattr(self.stats, f, getattr(self.stats, f) + v)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _batch(self, rows: list[_Row], max_new_tokens: int, temperature: float,
               generator: torch.Generator | None, st: DecodeStats) -> list[tuple[_Row, Result]]:
        dev = self.device
        st.batches += 1
        b = len(rows)
        rows = sorted(rows, key=lambda r: len(r.request.prompt) - r.reuse, reverse=True)
        past = max(r.reuse for r in rows)
        feeds = [r.request.prompt[r.reuse:] for r in rows]
        width = max(len(f) for f in feeds)
        n = past + width
        bufs = KVBuffers(self.step.n_layers, b, n + max_new_tokens, past)
        mask = torch.zeros((b, n + max_new_tokens), dtype=torch.long)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((b, width), dtype=torch.long)
        for j, (row, feed) in enumerate(zip(rows, feeds)):
            if row.reuse:
                bufs.place(j, past - row.reuse, row.request.carried.kv, row.reuse)  # type: ignore[union-attr]
                mask[j, past - row.reuse:past] = 1
            ids[j, width - len(feed):] = torch.tensor(feed, dtype=torch.long)
            mask[j, n - len(feed):n] = 1
            pos[j, width - len(feed):] = torch.arange(row.reuse, row.reuse + len(feed))
            st.fed_tokens += len(feed)
            st.reused_tokens += row.reuse
        mask = mask.to(dev)
        parts = []
        for sl in self._prefill_groups([len(f) for f in feeds]):
            # Rows are sorted by feed length, so a group's first row has its longest feed.
            w = len(feeds[sl.start])
            st.padded_tokens += (sl.stop - sl.start) * w
            parts.append(self.step(bufs, ids[sl, width - w:].to(dev), pos[sl, width - w:].to(dev),
                                   mask[sl, :n], sl))
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        bufs.length = n
        last_pos = pos[:, -1].clone()
        active = list(range(b))  # batch slot -> index into rows
        ended: list[tuple[_Row, Result]] = []
        while True:
            picks = self._pick(logits, temperature, generator)
            st.row_steps += len(active)
            stale = 0
            for slot, tok in enumerate(picks):
                row = rows[active[slot]]
                if row.done:
                    stale += 1
                    continue
                row.new.append(tok)
                if tok in self.eos or len(row.new) >= max_new_tokens:
                    row.done = True
                    stale += 1
                    ended.append(self._finish(row, bufs, slot, mask, n))
            if stale == len(active):
                break
            if stale >= max(1, COMPACT_FRACTION * len(active)):
                live = [s for s, a in enumerate(active) if not rows[a].done]
                keep = torch.tensor(live, dtype=torch.long, device=dev)
                bufs.select(keep)
                if hasattr(bufs, "_hf_cache"):
                    del bufs._hf_cache  # its layers hold views of the old buffers
                mask = mask.index_select(0, keep)
                last_pos = last_pos.index_select(0, keep.cpu())
                active = [active[s] for s in live]
                picks = [picks[s] for s in live]
                st.compactions += 1
            # Feed the picked tokens; rows that have ended but are still in the batch feed a
            # masked pad token.
            live_flags = [not rows[a].done for a in active]
            feed = torch.tensor([t if f else self.pad_id for t, f in zip(picks, live_flags)],
                                dtype=torch.long).unsqueeze(1)
            mask[:, n] = torch.tensor(live_flags, dtype=torch.long).to(dev)
            last_pos += 1
            n += 1
            st.steps += 1
            st.attended += len(active) * n
            logits = self.step(bufs, feed.to(dev), last_pos.unsqueeze(1).to(dev), mask[:, :n])
            bufs.length = n
        st.new_tokens += sum(len(r.new) for r in rows)
        return ended

    def _prefill_groups(self, lengths: list[int]) -> list[slice]:
        """Consecutive groups of rows (lengths sorted longest first) encoded together: a group
        pads to its first row, so it ends where padding would exceed PREFILL_PAD of its row's
        length; the HF step encodes the whole batch at once (its cache object spans it)."""
        if self.step.prefill_rows is None:
            return [slice(0, len(lengths))]
        groups, start = [], 0
        for i in range(1, len(lengths) + 1):
            if i == len(lengths) or lengths[i] < (1 - PREFILL_PAD) * lengths[start] \
                    or i - start >= self.step.prefill_rows:
                groups.append(slice(start, i))
                start = i
        return groups

    def _finish(self, row: _Row, bufs: KVBuffers, slot: int, mask: torch.Tensor,
                n: int) -> tuple[_Row, Result]:
        carried = None
        if row.request.keep:
            # The buffers hold the prompt and every picked token but the last (never fed).
            columns = mask[slot, :n].nonzero().squeeze(1)
            tokens = row.request.prompt + row.new[:-1]
            if len(columns) != len(tokens):  # pragma: no cover - an internal invariant
                raise RuntimeError(f"the cache holds {len(columns)} tokens of a row, expected "
                                   f"{len(tokens)}")
            carried = Carried(tokens, bufs.row_kv(slot, columns))
        return row, Result(tokens=list(row.new), reused=row.reuse, carried=carried)

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float,
              generator: torch.Generator | None) -> list[int]:
        scores = logits.to(dtype=torch.float32)
        if temperature <= 0:
            return scores.argmax(dim=-1).tolist()
        probs = torch.softmax(scores / temperature, dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).tolist()
