"""What a round costs on CPU: the measured thread policy (training/threads.py), runtime.threads,
and training shortcuts that must leave the adapter exactly as it was."""

from __future__ import annotations

import hashlib

import pytest
from conftest import tiny_chat_rows


def test_cpu_threads_policy_and_override(monkeypatch):
    import torch

    from mosaic.training import threads
    from mosaic.training.models import SMALL_MODEL_PARAMS, cpu_threads

    before = torch.get_num_threads()
    cores = threads.usable_cores()
    # The machine as the policy reads it: idle, then busy with other processes.
    others = {"now": 0.0}
    monkeypatch.setattr(threads.CpuWatch, "others", lambda self, min_interval=0.2: others["now"])
    with cpu_threads(3_000_000, "cpu") as policy:
        assert policy.adaptive and torch.get_num_threads() == policy.threads == cores
        others["now"] = 0.9
        assert policy.recheck(force=True) == 1 and torch.get_num_threads() == 1
        others["now"] = 0.45  # in between: unchanged
        assert policy.recheck(force=True) == 1
        others["now"] = 0.1
        assert policy.recheck(force=True) == cores
    with cpu_threads(3_000_000, "cpu", threads=2) as policy:
        assert not policy.adaptive and torch.get_num_threads() == 2
        others["now"] = 0.9
        assert policy.recheck(force=True) == 2  # runtime.threads is not second-guessed
    with cpu_threads(SMALL_MODEL_PARAMS, "cpu") as policy:
        assert policy is None and torch.get_num_threads() == before  # large: torch's default
    # SmolLM2-135M (configs/real-smoke.yaml) follows the policy: on torch's default 2 threads
    # a loaded machine made its generation 7.7x slower (training/threads.py).
    with cpu_threads(134_515_008, "cpu") as policy:
        assert policy is not None and policy.adaptive
    assert threads.decode_workers(134_515_008, "cpu", None) == cores
    with cpu_threads(3_000_000, "cuda", threads=1) as policy:
        assert policy is None and torch.get_num_threads() == before  # GPUs are left alone
    assert torch.get_num_threads() == before
    assert threads.choose(None, 4, 4) == 1  # unreadable machine: one thread
    assert threads.decode_workers(3_000_000, "cpu", None) == cores
    assert threads.decode_workers(3_000_000, "cpu", 3) == 3
    assert threads.decode_workers(3_000_000, "cuda", None) == 1
    assert threads.decode_workers(SMALL_MODEL_PARAMS, "cpu", None) == 1


def test_the_cpu_watch_sees_other_processes_not_this_one(monkeypatch):
    """The arithmetic on scripted /proc readings (what other processes use is whatever the
    machine is doing, so a test on the live value would depend on the load), then the live
    readers: this process's own CPU time is what it burned, and the reading is in range."""
    import os
    import time

    from mosaic.training import threads

    readings = iter([((1000, 4000), 500.0), ((1200, 4400), 650.0),  # 200 busy, 150 ours
                     ((1400, 4800), 850.0)])  # 200 busy, all ours
    monkeypatch.setattr(threads, "_proc_stat", lambda: current["stat"])
    monkeypatch.setattr(threads, "_own_jiffies", lambda: current["own"])
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    current: dict = {}

    def step():
        current["stat"], current["own"] = next(readings)

    step()
    w = threads.CpuWatch()
    step()
    # 400 jiffies over 2 CPUs = 200 per CPU; others used 200 - 150 = 50: a quarter of a core.
    assert w.others(min_interval=0.0) == pytest.approx(0.25)
    step()
    assert w.others(min_interval=0.0) == 0.0  # all of it was this process
    current["stat"] = None
    assert w.others(min_interval=0.0) is None  # no /proc/stat: cannot tell
    monkeypatch.undo()

    if threads._proc_stat() is None:
        pytest.skip("no /proc/stat here")
    own = threads._own_jiffies()
    end = time.process_time() + 0.3  # CPU time, not wall time: the same under any load
    while time.process_time() < end:
        pass
    assert threads._own_jiffies() - own >= 0.2 * os.sysconf("SC_CLK_TCK")
    live = threads.CpuWatch().others(min_interval=0.05)
    assert live is not None and 0.0 <= live <= (os.cpu_count() or 1)


def test_runtime_threads_is_validated_and_overridable(tmp_path):
    from mosaic.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("objectives: {safety: {type: jailbreak}}\n")
    assert load_config(path).runtime.threads is None
    assert load_config(path, environ={"MOSAIC__runtime__threads": "2"}).runtime.threads == 2
    with pytest.raises(ConfigError, match="runtime.threads"):
        load_config(path, environ={"MOSAIC__runtime__threads": "0"})


@pytest.mark.slow
def test_compact_lm_head_trains_the_same_adapter(tiny_model_dir, tmp_path, monkeypatch):
    """Scoring only labelled positions in trl's fused head (training.train.compact_lm_head)
    changes no bit of the adapter."""
    from contextlib import nullcontext

    import trl

    from mosaic.config import TrainingConfig
    from mosaic.training import train as train_module
    from mosaic.training.train import train_adapter

    def adapter_digest(name: str, **kw) -> str:
        out = tmp_path / name
        train_adapter(tiny_chat_rows(24), base_model=tiny_model_dir, adapter_dir=out,
                      training=TrainingConfig(batch_size=4, learning_rate=1e-2, lora_r=4,
                                              lora_alpha=8), max_length=96, progress=False, **kw)
        return hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()

    with train_module.compact_lm_head("cpu") as applied:
        assert applied == trl.__version__.startswith("1.16.")
    with train_module.compact_lm_head("cuda") as applied:
        assert not applied  # Triton devices score compactly already
    compact = adapter_digest("compact", threads=1)
    monkeypatch.setattr(train_module, "compact_lm_head", lambda device: nullcontext(False))
    assert adapter_digest("full", threads=1) == compact
