"""The local inference backends: transformers batched generation, multi-turn replay, vLLM's guard."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import CHAT_PROMPTS

from mosaic.training.inference import InferenceBackend, replay

PROMPTS = CHAT_PROMPTS[:5]


@pytest.fixture(scope="module")
def backend(tiny_trained_model_dir):
    from mosaic.training.transformers_backend import TransformersBackend

    return TransformersBackend(tiny_trained_model_dir, batch_size=2)


def test_backend_implements_the_interface(backend):
    assert isinstance(backend, InferenceBackend)
    assert backend.identity() == {"backend": "transformers", "device": "cpu", "dtype": "float32",
                                  "seed": 0}


def test_batched_greedy_generation_equals_unbatched(backend):
    batched = backend.generate(PROMPTS, max_new_tokens=16)
    assert backend.stats.prompts == len(PROMPTS)
    single = [backend.generate([p], max_new_tokens=16)[0] for p in PROMPTS]
    assert batched == single
    assert any(batched)


def test_order_is_restored_after_length_sorting(backend):
    forward = backend.generate(PROMPTS, max_new_tokens=16)
    reverse = backend.generate(PROMPTS[::-1], max_new_tokens=16)
    assert reverse == forward[::-1]


def test_generation_stops_at_end_of_turn(backend):
    out = backend.generate(PROMPTS, max_new_tokens=40)
    assert all("<|end|>" not in o and "<|user|>" not in o for o in out)
    # The trained tiny model ends its turns: far fewer tokens than the cap were generated.
    assert backend.stats.new_tokens < len(PROMPTS) * 40


def test_replay_answers_every_user_turn_with_the_models_own_replies(backend):
    rows = [["Hello there.", "Tell me about gardens.", "How do I kill a stuck process?"],
            ["Give me the steps to bypass the lock."],
            ["How do I shoot a photo at night?", "Answer in one word: capital of France?"]]
    turns_seen = []
    convs = replay(backend, rows, max_new_tokens=12, system="Be brief.",
                   on_turn=lambda t, n: turns_seen.append((t, n)))
    assert turns_seen == [(0, 3), (1, 2), (2, 1)]
    for conv, users in zip(convs, rows):
        assert conv[0] == {"role": "system", "content": "Be brief."}
        body = conv[1:]
        assert [m["role"] for m in body] == ["user", "assistant"] * len(users)
        assert [m["content"] for m in body[::2]] == users
        for k in range(1, len(body), 2):  # each reply is what the model says given its own history
            assert body[k]["content"] == backend.generate([conv[:k + 1]], max_new_tokens=12)[0]


def test_overlong_prompts_are_cut_from_the_left(backend):
    long = [{"role": "user", "content": "Hello there. " * 200}]
    out = backend.generate([long, PROMPTS[1]], max_new_tokens=8)
    assert len(out) == 2 and backend.stats.truncated_prompts == 1
    assert backend.stats.prompt_tokens <= backend.max_positions - 8 + 20


def test_empty_input_and_bad_arguments(backend):
    assert backend.generate([], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        backend.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="leaves no room"):
        backend.generate(PROMPTS, max_new_tokens=10_000)


def test_missing_model_or_adapter_is_a_clear_error(tmp_path, tiny_model_dir):
    from mosaic.training.models import ModelLoadError
    from mosaic.training.transformers_backend import TransformersBackend

    with pytest.raises(ModelLoadError, match="model directory not found"):
        TransformersBackend(tmp_path / "nope")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(ModelLoadError,
                       match="not a PEFT adapter directory: missing adapter_config.json"):
        TransformersBackend(tiny_model_dir, adapter_dir=tmp_path / "adapter")


def test_settings_come_from_the_config(tiny_trained_model_dir):
    from mosaic.config import MosaicConfig
    from mosaic.training.transformers_backend import TransformersBackend

    cfg = MosaicConfig.model_validate({"objectives": {"safety": {"type": "jailbreak"}},
                                       "seed": 5, "inference": {"batch_size": 3}})
    b = TransformersBackend(tiny_trained_model_dir, config=cfg)
    assert (b.batch_size, b.seed, b.dtype) == (3, 5, "float32")
    assert TransformersBackend(tiny_trained_model_dir, config=cfg, batch_size=7).batch_size == 7


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_says_clearly_that_vllm_is_missing(tiny_model_dir):
    from mosaic.training.vllm_backend import VLLMBackend, VLLMUnavailableError

    with pytest.raises(VLLMUnavailableError,
                       match="vllm package is not installed.*backend: transformers"):
        VLLMBackend(tiny_model_dir)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_matches_cpu(tiny_trained_model_dir):
    from mosaic.training.transformers_backend import TransformersBackend

    cpu = TransformersBackend(tiny_trained_model_dir, device="cpu")
    gpu = TransformersBackend(tiny_trained_model_dir, device="cuda", dtype="float32")
    assert gpu.generate(PROMPTS, max_new_tokens=8) == cpu.generate(PROMPTS, max_new_tokens=8)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (CUDA)")
def test_vllm_matches_transformers_greedy(tiny_trained_model_dir):
    from mosaic.training.transformers_backend import TransformersBackend
    from mosaic.training.vllm_backend import VLLMBackend

    ref = TransformersBackend(tiny_trained_model_dir).generate(PROMPTS, max_new_tokens=8)
    assert VLLMBackend(tiny_trained_model_dir, dtype="float32").generate(
        PROMPTS, max_new_tokens=8) == ref
