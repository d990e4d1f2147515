"""Packed DPO pairs (training/packed_pairs.py) against trl's stock two-rows-per-pair layout on a
tiny model: the same reference log-probs, per-token policy log-probs, loss and LoRA gradients
for each configured loss, with truncation, and under eager attention; the layout itself; and
the fallback to trl's layout where packing cannot apply."""

from __future__ import annotations

import pytest
from test_dpo import _trajectory_pair, precompute_reference
from test_training import FAST, _dpo_rows

from mosaic.training.packed_pairs import (CHOSEN_BRANCH, PAD, REJECTED_BRANCH, SHARED,
                                          PackedForward, PackedPairCollator, attention_mask)
from mosaic.training.train import PreparedData, build_trainer

# float32 sums over a few dozen tokens, in another order: agreement to ~1e-6 is float noise.
ATOL = 2e-5


def _pairs() -> list[dict]:
    """Pairs of unequal lengths, one with a multi-turn prompt (trajectory)."""
    rows = [r for r in _dpo_rows(6) if r["chosen"] != r["rejected"]]
    return [_trajectory_pair(), *rows]


def _stock_and_packed(model_dir, tmp_path, training, max_length: int, rows: list[dict]):
    """Two DPO trainers on the same rows, trl's layout and the packed one, holding the same
    adapter with random LoRA B weights (so the policy differs from the reference)."""
    import torch

    from mosaic.training.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    stock, packed = (build_trainer(PreparedData(rows, 0, []), base_model=model_dir,
                                   tokenizer=tok, training=training, max_length=max_length,
                                   method="dpo", output_dir=tmp_path / str(packed),
                                   progress=False, packed=packed)
                     for packed in (False, True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in stock.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    packed.model.load_state_dict(stock.model.state_dict())
    return stock, packed


def _compare(stock, packed, attention: str = "sdpa") -> None:
    import torch

    # The reference pass (adapter off: the base model), computed once in each constructor.
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        a = torch.tensor(stock.train_dataset[key])
        b = torch.tensor(packed.train_dataset[key])
        assert a.shape == b.shape and torch.allclose(a, b, atol=ATOL), key
    assert stock.train_dataset["prompt_ids"] == packed.train_dataset["prompt_ids"]

    # Per-token log-probs of the policy on every answer token, in the same order.
    n = len(stock.train_dataset)
    sb = stock.data_collator([stock.train_dataset[i] for i in range(n)])
    pb = packed.data_collator([packed.train_dataset[i] for i in range(n)])
    labels = sb["input_ids"].masked_fill(sb["completion_mask"] == 0, -100)
    with torch.no_grad():
        stock_out = stock.model(input_ids=sb["input_ids"], attention_mask=sb["attention_mask"],
                                labels=labels, fused_lm_head=True)
        packed_out = PackedForward(packed.model, pb, attention)()
    stock_tokens = stock_out.log_probs[sb["completion_mask"][:, 1:].bool()]
    packed_tokens = packed_out.log_probs[pb["answer_mask"]]
    assert stock_tokens.numel() == packed_tokens.numel() > 0
    assert torch.allclose(stock_tokens, packed_tokens, atol=ATOL)
    # The packed rows are shorter than the two rows trl feeds per pair.
    assert pb["input_ids"].numel() < sb["input_ids"].numel()

    # The loss trl's code computes from them, and the LoRA gradients behind it.
    losses, grads = [], []
    for trainer, batch in ((stock, sb), (packed, pb)):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(float(loss))
        grads.append({k: p.grad.clone() for k, p in trainer.model.named_parameters()
                      if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], abs=ATOL)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-4, rtol=1e-3), k
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    # trl's metrics, logged from the packed outputs as from its own.
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        a, b = stock._metrics["train"][key][-1], packed._metrics["train"][key][-1]
        assert a == pytest.approx(b, abs=1e-4), key


@pytest.mark.parametrize("loss", [
    {},
    {"dpo_loss": "sigmoid_norm", "dpo_sft_weight": 0.5},
    {"dpo_loss": "ipo", "dpo_length_alpha": 0.3},
], ids=["sigmoid", "sigmoid_norm+nll", "ipo+length_penalty"])
def test_packed_pairs_match_trls_log_probs_loss_and_gradients(loss, tiny_model_dir, tmp_path):
    training = FAST.model_copy(update=loss)
    stock, packed = _stock_and_packed(tiny_model_dir, tmp_path, training, 96, _pairs())
    assert stock.packed_attention is None and packed.packed_attention == "sdpa"
    _compare(stock, packed)


def test_packed_pairs_truncate_as_trl_does(tiny_model_dir, tmp_path):
    from mosaic.training.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    prompts = [len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True,
                                           return_dict=True)["input_ids"])
               for r in _pairs()]
    # max_length drops the two longest prompts' pairs (trl drops a pair whose prompt fills
    # it, in both layouts) and cuts the longer answers of others (keep_start, each side with
    # its prompt).
    max_length = sorted(prompts)[-3] + 2
    stock, packed = _stock_and_packed(tiny_model_dir, tmp_path, FAST, max_length, _pairs())
    assert len(stock.train_dataset) == len(packed.train_dataset) == len(_pairs()) - 2
    ds = stock.train_dataset
    assert any(len(p) + max(len(c), len(r)) > max_length
               for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    _compare(stock, packed)


def test_packed_pairs_under_eager_attention(monkeypatch, tiny_model_dir, tmp_path):
    from mosaic.training import models

    real = models.load_model

    def load_eager(*args, **kwargs):
        model = real(*args, **kwargs)
        model.config._attn_implementation = "eager"  # read per forward
        return model

    monkeypatch.setattr(models, "load_model", load_eager)
    stock, packed = _stock_and_packed(tiny_model_dir, tmp_path, FAST, 96, _pairs()[:3])
    assert packed.packed_attention == "eager"
    _compare(stock, packed, attention="eager")


def test_the_packed_layout():
    batch = PackedPairCollator(pad_token_id=0)([
        {"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31]},
        {"prompt_ids": [14], "chosen_ids": [23], "rejected_ids": [32, 33]}])
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 13, 31],
                                           [14, 23, 14, 32, 33, 0, 0]]
    # The rejected side restarts at the position after the prompt, from a copy of its last token.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 1, 2, 0, 0]]
    s, c, r, p = SHARED, CHOSEN_BRANCH, REJECTED_BRANCH, PAD
    assert batch["segment_ids"].tolist() == [[s, s, c, c, c, r, r], [c, c, r, r, r, p, p]]
    assert batch["score_labels"].tolist() == [[-100, -100, -100, 21, 22, -100, 31],
                                              [-100, 23, -100, 32, 33, -100, -100]]
    # Answers as trl lays them out: chosen rows, then rejected rows; indices into the shifted
    # output (2 rows x 6 positions), flattened.
    assert batch["answer_mask"].tolist() == [[True, True], [True, False],
                                             [True, False], [True, True]]
    index = batch["answer_index"].masked_fill(~batch["answer_mask"], -1).tolist()
    assert index == [[2, 3], [6, -1], [5, -1], [6 + 2, 6 + 3]]
    mask = attention_mask(batch["segment_ids"], None, "sdpa")[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0, 0],  # last prompt token: the chosen side's
                    [1, 1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 1, 0, 0],
                    [1, 1, 0, 0, 0, 1, 0],  # its copy: the rejected side's, no chosen answer
                    [1, 1, 0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="non-empty tokenized prompt"):
        PackedPairCollator(pad_token_id=0)([{"prompt_ids": [], "chosen_ids": [1],
                                             "rejected_ids": [2]}])


def test_trls_layout_where_packing_cannot_apply(monkeypatch, tiny_model_dir, tmp_path):
    from mosaic.training.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    common = dict(base_model=tiny_model_dir, tokenizer=tok, max_length=96, method="dpo",
                  progress=False)
    off = build_trainer(PreparedData(_pairs(), 0, []), output_dir=tmp_path / "off",
                        training=FAST.model_copy(update={"dpo_packed": False}), **common)
    assert off.packed_attention is None  # the config's switch
    precompute_reference(monkeypatch, False)
    common["training"] = FAST
    trainer = build_trainer(PreparedData(_pairs(), 0, []), output_dir=tmp_path / "a", **common)
    assert trainer.packed_attention is None
    assert not isinstance(trainer.data_collator, PackedPairCollator)
    with pytest.raises(ValueError, match="reference log-probs not precomputed"):
        build_trainer(PreparedData(_pairs(), 0, []), output_dir=tmp_path / "b", packed=True,
                      **common)
