"""The accelerate launcher: the same LoRA trained as 2 ranks under torchrun (gloo, CPU) and in
process with the same global batch gives close losses, the same step count and an adapter of the
same format that the evaluate path loads; for SFT, DPO in both pair layouts, and sft+dpo."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_chat_rows

from mosaic.config import ConfigError, TrainingConfig, load_config
from mosaic.training.settings import batch_split, trainer_settings

# Data order differs between 1 and 2 ranks (each rank takes every other length-grouped
# micro-batch), so the losses agree to within data-order noise, not bit for bit.
LOSS_TOLERANCE = 0.15  # relative, on the last logged loss
# DPO's test set (72 pairs) fits one length-grouped megabatch on 1 and on 2 ranks, so both train
# on the same global batches in the same order: what differs is float summation order (gloo's
# gradient all-reduce, per-rank loss means), seen at ~1e-7 on the loss and ~1e-6 on LoRA weights
# of size ~0.02-0.15. Reference log-probs paired with the wrong rows would move both far more.
DPO_LOSS_TOLERANCE = 1e-3  # relative, on the last logged loss
DPO_WEIGHT_ATOL = 1e-4  # absolute, on every LoRA tensor


def test_the_global_batch_is_split_over_ranks_and_accumulation_steps():
    assert batch_split(16, 2, 2) == (4, 2) and batch_split(16, 1, 1) == (16, 1)
    with pytest.raises(ValueError, match="not a multiple of 4 processes x 1"):
        batch_split(10, 4, 1)
    # In process, the trainer gets the whole global batch per step (no process group needed).
    args, _ = trainer_settings(TrainingConfig(batch_size=16), method="sft", output_dir="/tmp/x",
                               max_length=64, device="cpu", n_rows=64, n_params=1000)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (16, 1)


def test_launcher_settings_that_cannot_keep_the_global_batch_are_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("objectives: {s: {type: jailbreak}}\ntraining: {batch_size: 10, "
                   "launcher: accelerate, processes: 4}\n")
    with pytest.raises(ConfigError, match=r"training: .*multiple of processes x "
                                          r"gradient_accumulation = 4"):
        load_config(cfg, environ={})
    cfg.write_text("objectives: {s: {type: jailbreak}}\ntraining: {processes: 2}\n")
    with pytest.raises(ConfigError, match="needs launcher: accelerate"):
        load_config(cfg, environ={})


@pytest.mark.slow
def test_two_gloo_ranks_train_the_same_lora_as_one_process(tiny_trained_model_dir, tmp_path):
    rows = tiny_chat_rows(48)
    base = TrainingConfig(batch_size=8, learning_rate=5e-3, epochs=1, seed=0)
    one, two = _train_in_process_and_as_two_ranks(rows, base, tiny_trained_model_dir, tmp_path)
    assert one.steps == two.steps == 6  # 48 rows / global batch 8, on both
    assert one.train_rows == two.train_rows and one.train_tokens == two.train_tokens
    assert one.final_loss and two.final_loss
    assert abs(one.final_loss - two.final_loss) <= LOSS_TOLERANCE * one.final_loss, (
        one.final_loss, two.final_loss)

    assert json.loads((tmp_path / "ranks" / "train_result.json").read_text())["steps"] == 6
    _assert_same_adapters(tiny_trained_model_dir, tmp_path / "inprocess", tmp_path / "ranks")


def _train_in_process_and_as_two_ranks(rows, base, model_dir, tmp_path, method=None):
    """The same rows and global batch trained in process (`inprocess/`) and as 2 gloo ranks
    under torchrun (`ranks/`): their TrainResults."""
    from mosaic.training.train import train_adapter

    return tuple(
        train_adapter(rows, base_model=model_dir, adapter_dir=tmp_path / name, training=training,
                      max_length=64, method=method, progress=False, threads=1)
        for name, training in (("inprocess", base),
                               ("ranks", base.model_copy(update={"launcher": "accelerate",
                                                                 "processes": 2}))))


def _assert_same_adapters(model_dir, one_dir, two_dir) -> None:
    """Both folders hold the same files and adapter config, loadable by the evaluate path."""
    from mosaic.training.transformers_backend import TransformersBackend

    assert {p.name for p in one_dir.iterdir()} == {p.name for p in two_dir.iterdir()}
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (one_dir, two_dir)]
    for c in configs:
        # peft writes its module set as a list in set order, which string hashing makes
        # differ from one process to the next.
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1], {k: (configs[0].get(k), configs[1].get(k))
                                      for k in set(configs[0]) | set(configs[1])
                                      if configs[0].get(k) != configs[1].get(k)}
    for d in (one_dir, two_dir):
        backend = TransformersBackend(model_dir, adapter_dir=d, threads=1)
        replies = backend.generate([[{"role": "user", "content": "Hello there."}]],
                                   max_new_tokens=6)
        assert len(replies) == 1


def _pairs(n: int) -> list[dict]:
    """`n` preference pairs (a refusal chosen over the tiny chats' answers)."""
    from test_training import _dpo_rows

    return [r for r in _dpo_rows(2 * n) if r["chosen"] != r["rejected"]][:n]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "packed"), [("dpo", True), ("dpo", False), ("sft+dpo", True)],
                         ids=["dpo-packed-pairs", "dpo-trl-layout", "sft+dpo"])
def test_two_gloo_ranks_train_the_same_dpo_lora_as_one_process(method, packed,
                                                               tiny_trained_model_dir, tmp_path):
    import torch
    from test_training import _lora_tensors

    # 72 pairs: two reference-pass batches of 64 and 8, so the ranks forward different
    # batches and the uneven last one is padded for one rank and dropped again.
    rows = _pairs(72)
    base = TrainingConfig(batch_size=8, learning_rate=5e-3, dpo_learning_rate=5e-3, epochs=1,
                          seed=0, dpo_packed=packed)
    one, two = _train_in_process_and_as_two_ranks(rows, base, tiny_trained_model_dir, tmp_path,
                                                  method=method)
    stages = 2 if method == "sft+dpo" else 1
    assert one.steps == two.steps == 9 * stages  # 72 pairs / global batch 8, per stage
    assert one.train_rows == two.train_rows and one.train_tokens == two.train_tokens
    assert one.final_loss and two.final_loss
    assert abs(one.final_loss - two.final_loss) <= DPO_LOSS_TOLERANCE * one.final_loss, (
        one.final_loss, two.final_loss)
    # The same steps on the same pairs against the same reference: the same adapter.
    a, b = _lora_tensors(tmp_path / "inprocess"), _lora_tensors(tmp_path / "ranks")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=DPO_WEIGHT_ATOL), (
            key, float((a[key] - b[key]).abs().max()))
    _assert_same_adapters(tiny_trained_model_dir, tmp_path / "inprocess", tmp_path / "ranks")
