# The two quick-start commands (see README): `make sandbox` and `make test`.
VENV ?= .venv
CONFIG ?= configs/sandbox.yaml

.PHONY: setup sandbox test bench clean

setup:
	@bash scripts/setup.sh

sandbox: setup
	$(VENV)/bin/mosaic run $(CONFIG)

test: setup
	$(VENV)/bin/python -m pytest

bench: setup
	$(VENV)/bin/python bench/build_dataset_bench.py

clean:
	rm -rf runs .cache build dist *.egg-info
