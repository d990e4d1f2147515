"""DPO pairs packed into one sequence each: the prompt runs through the model once per pair.

trl's DPOTrainer (1.16) forwards every pair as two rows, prompt + chosen and prompt + rejected,
each padded to the batch's longest: the prompt is encoded twice, in the reference pass and in
every training step, while the dataset builder budgets it once. Here a pair is one row,

    prompt[:-1]  prompt[-1]  chosen   prompt[-1]'  rejected
    0 .. P-2     P-1         P ..     P-1          P ..          <- position ids

with a 4D attention mask under which the chosen answer sees the prompt and itself, and the
rejected answer sees the prompt without its last token, a copy of that token (same id, same
position) and itself: never the chosen answer. The copy's keys, values and hidden states equal
the last prompt token's at every layer (same input, same position, same visible context), so the
rejected answer's first token is scored from the same state as in trl's layout, and every
answer token's log-probability is the one trl computes, up to float summation order. Gradients
reach the prompt's positions from both answers, as they do in trl's two rows.

The per-token outputs are then laid out as trl's (chosen rows, then rejected rows) and handed to
trl's own loss code, so the loss types, the length penalty (`ld_alpha`), the NLL term and the
logged metrics are trl's, unchanged. tests/test_packed_pairs.py compares log-probs, losses and
gradients with stock trl on a tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Segment ids of a packed row: which tokens a query may attend to (besides causality).
PAD, SHARED, CHOSEN_BRANCH, REJECTED_BRANCH = -1, 0, 1, 2
# Keys of a packed batch that are not trl's (trl's loss code reads the rest).
PACKED_KEYS = ("input_ids", "position_ids", "segment_ids", "score_labels", "answer_index",
               "answer_mask")
# Attention implementations that take a custom 4D mask (flash and flex attention do not).
MASKABLE_ATTENTION = ("sdpa", "eager")


def unsupported_reason(model: Any, args: Any) -> str | None:
    """Why the packed layout cannot stand in for trl's on this model and config (None: it can)."""
    import trl

    if not trl.__version__.startswith("1.16."):
        # The loss code is trl's own, reached through its 1.16 internals (`_compute_loss`).
        return f"trl {trl.__version__} (the packed layout is written against trl 1.16)"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    attention = getattr(config, "_attn_implementation", None)
    if attention not in MASKABLE_ATTENTION:
        return f"attention implementation {attention!r} takes no custom 4D mask"
    if not getattr(args, "precompute_ref_log_probs", False):
        # trl's per-step reference forward calls the model itself, outside the loss code
        # the packed rows are handed to.
        return "reference log-probs not precomputed"
    if getattr(args, "truncation_mode", "keep_start") != "keep_start":
        return "truncation_mode keep_end cuts each side's prompt differently"
    if getattr(args, "padding_free", False) or getattr(args, "pad_to_multiple_of", None):
        return "padding_free / pad_to_multiple_of are trl-layout options"
    peft_config = getattr(model, "peft_config", None) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return "prompt-learning adapters prepend virtual tokens"
    return None


@dataclass
class PackedPairCollator:
    """Batches tokenized pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`, optionally trl's
    `ref_chosen_logps` / `ref_rejected_logps`) as one packed row per pair, right-padded.

    Truncation is trl's `keep_start` applied to each side as trl's collator would: prompt +
    answer cut at `max_length`.
    """

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, "torch.Tensor"]:
        import torch

        rows = [_packed_row(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"],
                            self.max_length) for e in examples]
        n, width = len(rows), max(len(r.ids) for r in rows)
        answer_width = max(1, max(max(len(r.chosen_at), len(r.rejected_at)) for r in rows))
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        segment_ids = torch.full((n, width), PAD, dtype=torch.int8)
        score_labels = torch.full((n, width), -100, dtype=torch.long)
        # Where each answer token's log-prob sits in the model's shifted output (batch, width-1),
        # flattened: chosen answers in rows 0..n-1, rejected in n..2n-1, as trl lays them out.
        answer_index = torch.zeros((2 * n, answer_width), dtype=torch.long)
        answer_mask = torch.zeros((2 * n, answer_width), dtype=torch.bool)
        for i, row in enumerate(rows):
            k = len(row.ids)
            input_ids[i, :k] = torch.tensor(row.ids)
            position_ids[i, :k] = torch.tensor(row.positions)
            segment_ids[i, :k] = torch.tensor(row.segments, dtype=torch.int8)
            for side, at in ((i, row.chosen_at), (n + i, row.rejected_at)):
                if at:
                    positions = torch.tensor(at)
                    score_labels[i, positions] = input_ids[i, positions]
                    answer_index[side, :len(at)] = i * (width - 1) + positions - 1
                    answer_mask[side, :len(at)] = True
        batch = {"input_ids": input_ids, "position_ids": position_ids,
                 "segment_ids": segment_ids, "score_labels": score_labels,
                 "answer_index": answer_index, "answer_mask": answer_mask}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch


@dataclass
class _Row:
    ids: list[int]
    positions: list[int]
    segments: list[int]
    chosen_at: list[int]  # packed positions of the chosen answer's tokens
    rejected_at: list[int]


def _packed_row(prompt: list[int], chosen: list[int], rejected: list[int],
                max_length: int | None) -> _Row:
    if not prompt:
        # Without a prompt token there is no state to score either answer's first token from
        # (trl leaves it unscored); chat-templated prompts always have one.
        raise ValueError("packed DPO pairs need a non-empty tokenized prompt")
    if max_length is not None:
        # trl's keep_start: prompt + answer cut at max_length, each side on its own.
        prompt = prompt[:max_length]
        chosen = chosen[:max(0, max_length - len(prompt))]
        rejected = rejected[:max(0, max_length - len(prompt))]
    p, c, r = len(prompt), len(chosen), len(rejected)
    ids = prompt + chosen + [prompt[-1]] + rejected
    positions = [*range(p + c), p - 1, *range(p, p + r)]
    segments = ([SHARED] * (p - 1) + [CHOSEN_BRANCH] * (c + 1)
                + [REJECTED_BRANCH] * (r + 1))
    return _Row(ids, positions, segments, chosen_at=list(range(p, p + c)),
                rejected_at=list(range(p + c + 1, p + c + 1 + r)))


def attention_mask(segment_ids: "torch.Tensor", dtype: "torch.dtype",
                   attention: str) -> "torch.Tensor":
    """(batch, 1, width, width) mask: causal, keys of the shared prompt or of the query's own
    branch, no padding keys; a padding query sees itself (a row with no key would be NaN).
    Boolean for SDPA, additive for eager attention."""
    import torch

    width = segment_ids.size(1)
    seg = segment_ids.long()
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()
    allowed = causal & (k != PAD) & ((k == SHARED) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool, device=seg.device)
    allowed = allowed.unsqueeze(1)
    if attention == "sdpa":
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class PackedForward:
    """Stands in for the model in trl's loss code: called as trl calls the model (trl-layout
    arguments, ignored), it runs the packed batch through the real model and returns the fused
    LM head's per-token outputs in trl's layout, (2 x pairs, answer width), zero off the
    answers. The forward runs inside the call, so trl's no-grad and adapter contexts apply."""

    def __init__(self, model: Any, batch: dict[str, "torch.Tensor"], attention: str):
        self.model, self.batch, self.attention = model, batch, attention

    def __call__(self, *_args: Any, **kwargs: Any) -> Any:
        from trl.trainer.utils import FusedCausalLMOutput

        b = self.batch
        extra = {k: kwargs[k] for k in ("output_router_logits",) if k in kwargs}
        dtype = next(p for p in self.model.parameters()).dtype
        out = self.model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                         attention_mask=attention_mask(b["segment_ids"], dtype, self.attention),
                         labels=b["score_labels"], fused_lm_head=True, use_cache=False, **extra)
        index, mask = b["answer_index"], b["answer_mask"]

        def trl_layout(x: "torch.Tensor | None") -> "torch.Tensor | None":
            if x is None:
                return None
            return x.reshape(-1)[index].masked_fill(~mask, 0)

        return FusedCausalLMOutput(
            loss=out.loss, log_probs=trl_layout(out.log_probs), entropy=trl_layout(out.entropy),
            log_sum_sq_probs=trl_layout(out.log_sum_sq_probs),
            mean_logits=trl_layout(out.mean_logits), is_top1=trl_layout(out.is_top1),
            label_mask=mask, aux_loss=out.aux_loss)


def trl_view(batch: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """The inputs trl's loss code reads, for a packed batch: `completion_mask` is the answer
    mask behind one leading column (trl shifts it by one), `input_ids` only shape the labels
    trl builds and PackedForward ignores, `attention_mask` counts the tokens the packed rows
    fed the model (trl's `num_tokens` metric sums it)."""
    import torch

    answer = batch["answer_mask"]
    lead = torch.zeros((answer.size(0), 1), dtype=torch.long, device=answer.device)
    completion = torch.cat([lead, answer.long()], dim=1)
    fed = torch.zeros_like(completion)
    fed[:answer.size(0) // 2, 0] = (batch["segment_ids"] != PAD).sum(dim=1)
    view = {"input_ids": torch.zeros_like(completion), "attention_mask": fed,
            "completion_mask": completion}
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in batch:
            view[key] = batch[key]
    return view
