"""The accelerate launcher: the same LoRA trained as 2 ranks under torchrun (gloo, CPU) and in
process with the same global batch gives close losses, the same step count and an adapter of the
same format that the evaluate path loads."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_chat_rows

from mosaic.config import ConfigError, TrainingConfig, load_config
from mosaic.training.settings import batch_split, trainer_settings

# Data order differs between 1 and 2 ranks (each rank takes every other length-grouped
# micro-batch), so the losses agree to within data-order noise, not bit for bit.
LOSS_TOLERANCE = 0.15  # relative, on the last logged loss


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
    from mosaic.training.train import train_adapter
    from mosaic.training.transformers_backend import TransformersBackend

    rows = tiny_chat_rows(48)
    base = TrainingConfig(batch_size=8, learning_rate=5e-3, epochs=1, seed=0)
    results = {}
    for name, training in (("inprocess", base),
                           ("ranks", base.model_copy(update={"launcher": "accelerate",
                                                             "processes": 2}))):
        results[name] = train_adapter(rows, base_model=tiny_trained_model_dir,
                                      adapter_dir=tmp_path / name, training=training,
                                      max_length=64, progress=False, threads=1)
    one, two = results["inprocess"], results["ranks"]
    assert one.steps == two.steps == 6  # 48 rows / global batch 8, on both
    assert one.train_rows == two.train_rows and one.train_tokens == two.train_tokens
    assert one.final_loss and two.final_loss
    assert abs(one.final_loss - two.final_loss) <= LOSS_TOLERANCE * one.final_loss, (
        one.final_loss, two.final_loss)

    # The same folder layout and adapter config, loadable by the evaluate path's backend.
    names = {p.name for p in (tmp_path / "inprocess").iterdir()}
    assert names == {p.name for p in (tmp_path / "ranks").iterdir()}
    configs = [json.loads((tmp_path / name / "adapter_config.json").read_text())
               for name in ("inprocess", "ranks")]
    for c in configs:
        # peft writes its module set as a list in set order, which string hashing makes
        # differ from one process to the next.
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1], {k: (configs[0].get(k), configs[1].get(k))
                                      for k in set(configs[0]) | set(configs[1])
                                      if configs[0].get(k) != configs[1].get(k)}
    assert json.loads((tmp_path / "ranks" / "train_result.json").read_text())["steps"] == 6
    for name in ("inprocess", "ranks"):
        backend = TransformersBackend(tiny_trained_model_dir, adapter_dir=tmp_path / name,
                                      threads=1)
        replies = backend.generate([[{"role": "user", "content": "Hello there."}]],
                                   max_new_tokens=6)
        assert len(replies) == 1


def _pairs(n: int) -> list[dict]:
    """`n` preference pairs (a refusal chosen over the tiny chats' answers)."""
    from test_training import _dpo_rows

    return [r for r in _dpo_rows(2 * n) if r["chosen"] != r["rejected"]][:n]


@pytest.mark.slow
@pytest.mark.parametrize("packed", [True, False], ids=["packed-pairs", "trl-layout"])
def test_two_gloo_ranks_train_the_same_dpo_lora_as_one_process(packed, tiny_trained_model_dir,
                                                               tmp_path):
    from mosaic.training.train import train_adapter

    rows = _pairs(32)
    base = TrainingConfig(batch_size=8, dpo_learning_rate=5e-3, epochs=1, seed=0,
                          dpo_packed=packed)
    results = {}
    for name, training in (("inprocess", base),
                           ("ranks", base.model_copy(update={"launcher": "accelerate",
                                                             "processes": 2}))):
        results[name] = train_adapter(rows, base_model=tiny_trained_model_dir,
                                      adapter_dir=tmp_path / name, training=training,
                                      max_length=64, method="dpo", progress=False, threads=1)
    one, two = results["inprocess"], results["ranks"]
    assert one.steps == two.steps == 4, (one.steps, two.steps)
    print(one.final_loss, two.final_loss)
