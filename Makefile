# The README's two commands are `make run` and `make test`; everything else is a helper behind them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
REPO   ?= model_repository
MODEL  ?= vit-digits
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: setup run convert serve test docker-test lint bench gpu-check clean

# One venv with the package, its test and benchmark extras. The stamp re-runs pip when pyproject changes.
# kserve's SDK comes without its dependencies (its server stack: pandas, grpcio-tools, ...): the KServe manifest
# tests read only its generated model classes, as the published shape of InferenceService and ServingRuntime.
$(BIN)/.stamp: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m pip install -q --no-deps 'kserve==0.21.0'
	touch $@

setup: $(BIN)/.stamp

# What running needs, and only that (no test or benchmark extras): `make run` installs this.
$(BIN)/.stamp-run: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

# Converts again only when REPO/MODEL is missing or stale (other source, other tool versions, changed files).
convert: $(BIN)/.stamp-run
	$(BIN)/python -m normfuse.current $(REPO)/$(MODEL) $(MODEL) || \
		$(BIN)/normfuse convert $(MODEL) --name $(MODEL) --repo $(REPO)

# The main job: convert the default model (or reuse a current conversion), then serve every servable variant
# with shadow mode on.
run: convert
	NORMFUSE_SHADOW_RATE=$${NORMFUSE_SHADOW_RATE:-0.2} $(BIN)/normfuse serve --repo $(REPO) --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no tests" && rc=0; exit $$rc

# The images built and the compose stack run with a real Docker engine (tests/deploy/test_docker.py): starts
# dockerd if none answers (root; Debian's docker.io) and stops only that one, makes the local base image once
# (debootstrap; cached), builds deploy/Dockerfile.cpu (cached layers), runs convert -> server -> Prometheus on
# loopback, tears everything down. Needs root, docker.io and debootstrap where no engine answers.
docker-test: setup
	NORMFUSE_DOCKER_TEST=1 $(BIN)/python -m pytest -q tests/deploy/test_docker.py $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/normfuse bench all --repo .bench/repo --out BENCHMARKS.md

# Fused vs unfused vs UN-folded ViT-S and GPT-2-small in torch eager, torch.compile and bf16 (issue 21): on a CUDA
# machine ≤ 8 min and BENCHMARKS.md's GPU section; without one, a tiny CPU dry run into .bench/. It needs only torch
# and transformers, so it runs with the interpreter that holds CUDA torch (the GPU image's python3) where no venv is.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(REPO) .bench .pytest_cache
