# The README's two commands: `make demo` and `make test`. Each bootstraps .venv when missing
# or stale (pinned installs from requirements/constraints.txt), then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowcomm-installed
EXTRAS ?= dev,hivemind,wandb,datasets,accelerate,bench
NPROC ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast lint bench bench-codecs bench-peers clean

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing lowcomm into $(VENV) (pinned; CPU torch 2.13.0 unless one is there)"
	@# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build onto CPU machines.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	GLOO_SOCKET_IFNAME=$${GLOO_SOCKET_IFNAME:-lo} $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) recipes/train_lm.py \
		--config recipes/configs/demo.toml $(ARGS)

test: $(STAMP)
	@set +e; GLOO_SOCKET_IFNAME=lo $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

test-fast: $(STAMP)
	GLOO_SOCKET_IFNAME=lo $(PY) -m pytest -m "not slow and not hivemind" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The benchmark suite (scripts/bench/suite.py): make bench ARGS="--profile smoke --rates loopback"
bench: $(STAMP)
	$(PY) -m scripts.bench.suite $(ARGS)

# Codec encode/decode bandwidth against memcpy, written to benchmarks/codecs.json and BENCHMARKS.md.
bench-codecs: $(STAMP)
	$(PY) -m scripts.bench.codecs $(ARGS)

# torchft pulls opentelemetry and more, so it lives in its own venv, never in the project's;
# the suite runs its torchft peer from there (--torchft-python).
FTVENV ?= .venv-torchft
$(FTVENV)/.installed: pyproject.toml requirements/constraints.txt
	@test -x $(FTVENV)/bin/python || $(PYTHON) -m venv $(FTVENV)
	$(FTVENV)/bin/pip install -q "torch==2.13.0" "torchft==0.2.0"
	@# lowcomm and its own dependencies (numpy, tqdm), pinned as in the project's venv.
	$(FTVENV)/bin/pip install -q -c requirements/constraints.txt -e .
	@touch $@

bench-peers: $(STAMP) $(FTVENV)/.installed
	$(FTVENV)/bin/python -m scripts.bench.peers.torchft_diloco --config recipes/configs/tiny.toml \
		--workers 2 --steps 100 --sync-every 25 --out runs/peers/torchft.jsonl
	$(PY) -m scripts.bench.peers.hivemind_optimizer --config recipes/configs/tiny.toml \
		--workers 2 --steps 100 --sync-every 25 --out runs/peers/hivemind.jsonl

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
