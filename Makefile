# The README's two commands are `make run` and `make test`; everything else is a helper behind them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
REPO   ?= model_repository
MODEL  ?= vit-digits
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: setup run convert serve test lint bench clean

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

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/normfuse bench all --repo .bench/repo --out BENCHMARKS.md

clean:
	rm -rf $(REPO) .bench .pytest_cache
