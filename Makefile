# `make demo` and `make test` set up .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,dev,demo,openvino
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test lint install clean triton mutate

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check toolkit tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

# Deliberate bugs in the modules the proof rests on, each run against its tests (not part of `make test`:
# ~30 min on 2 CPUs); writes benchmarks/results/mutate-<cpu>.md
mutate: $(STAMP)
	$(BIN)/python benchmarks/mutate.py

# A CPU Triton Inference Server for tests/test_triton_server.py (artifacts/triton; its tests skip without it)
triton: $(STAMP)
	bash .ci/build-triton.sh

demo: $(STAMP)
	$(BIN)/rtk demo

clean:
	rm -rf $(VENV) artifacts/demo
