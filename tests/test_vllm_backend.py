"""The vLLM backend: prompts built and cut exactly as the transformers backend's (checked on CPU,
without vllm), and on a GPU one engine per process serving every adapter of a round through
LoRARequests, with the transformers backend's greedy replies (marked gpu; skipped here)."""

from __future__ import annotations

import importlib.util

import pytest

LONG = [{"role": "user", "content": "Tell me about gardens. " * 40},
        {"role": "assistant", "content": "Gardens are nice."},
        {"role": "user", "content": "Answer in one word: capital of France?"}]
SHORT = [{"role": "user", "content": "Hello there."}]


def test_prompts_are_cut_as_the_transformers_backend_cuts_them(tiny_trained_model_dir):
    from mosaic.training.inference import prompt_ids
    from mosaic.training.models import load_tokenizer
    from mosaic.training.transformers_backend import GenerationStats, TransformersBackend
    from mosaic.training.vllm_backend import max_positions

    backend = TransformersBackend(tiny_trained_model_dir, threads=1)
    # vLLM's backend reads the limit from the model's config, as transformers does.
    assert max_positions(tiny_trained_model_dir) == backend.max_positions == 256
    full = backend.encode([LONG, SHORT])
    assert len(full[0]) > 256 - 8 and len(full[1]) < 256 - 8

    tok = load_tokenizer(tiny_trained_model_dir)
    ids, cut = prompt_ids(tok, [LONG, SHORT], max_new_tokens=8, max_positions=256)
    assert cut == 1
    assert ids[0] == full[0][-(256 - 8):]  # the end kept: latest turns and assistant header
    assert ids[1] == full[1]
    stats = GenerationStats()
    assert backend._prompts([LONG, SHORT], 8, stats) == ids and stats.truncated_prompts == 1
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        prompt_ids(tok, [SHORT], max_new_tokens=256, max_positions=256)
    # The cut prompt still generates (within the model's positions).
    assert len(backend.generate([LONG], max_new_tokens=8)) == 1


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (CUDA)")
def test_one_engine_serves_every_adapter_with_the_transformers_replies(tiny_trained_model_dir,
                                                                      tmp_path):
    from conftest import tiny_chat_rows

    from mosaic.config import TrainingConfig
    from mosaic.training.train import train_adapter
    from mosaic.training.transformers_backend import TransformersBackend
    from mosaic.training import vllm_backend
    from mosaic.training.vllm_backend import VLLMBackend, release_engines

    adapters = []
    for k, lr in enumerate((5e-3, 2e-2)):
        train_adapter(tiny_chat_rows(16), base_model=tiny_trained_model_dir,
                      adapter_dir=tmp_path / f"a{k}", max_length=64, progress=False,
                      training=TrainingConfig(batch_size=8, learning_rate=lr, lora_r=8))
        adapters.append(tmp_path / f"a{k}")
    prompts = [SHORT, LONG, [{"role": "user", "content": "How do I shoot a photo at night?"}]]
    try:
        base = VLLMBackend(tiny_trained_model_dir, dtype="float32")
        first = VLLMBackend(tiny_trained_model_dir, adapter_dir=adapters[0], dtype="float32")
        second = VLLMBackend(tiny_trained_model_dir, adapter_dir=adapters[1], dtype="float32")
        assert base.engine is first.engine is second.engine  # one engine for the round
        assert first.lora_request.lora_int_id != second.lora_request.lora_int_id
        for backend, adapter in ((base, None), (first, adapters[0]), (second, adapters[1])):
            ref = TransformersBackend(tiny_trained_model_dir, adapter_dir=adapter,
                                      device="cuda", dtype="float32")
            assert backend.generate(prompts, max_new_tokens=8) == ref.generate(
                prompts, max_new_tokens=8)
    finally:
        assert release_engines()
    assert vllm_backend._ENGINE is None
