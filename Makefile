# `make demo` and `make test` set up .venv on a fresh machine, then run. `make test` also sets up .venv-serve,
# the serving side alone (".[serve,cpu]": no torch), and runs the serving tests there on the bundles it built.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,dev,demo,openvino
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
SERVE_VENV := .venv-serve
SERVE_BIN := $(SERVE_VENV)/bin
SERVE_EXTRAS := serve,cpu,test-serve
SERVE_STAMP := $(SERVE_VENV)/.installed-$(subst $(comma),-,$(SERVE_EXTRAS))
# the test bundles the torch side built, which the serving run reads (artifacts/ is git-ignored)
TEST_BUNDLES := artifacts/test-bundles

.PHONY: demo test test-serving lint install clean triton mutate

%/bin/python:
	$(PYTHON) -m venv $*
	$*/bin/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

$(SERVE_STAMP): pyproject.toml | $(SERVE_BIN)/python
	$(SERVE_BIN)/python -m pip install -q -e ".[$(SERVE_EXTRAS)]"
	touch $@

# `make test`'s main run writes them (--rtk-write-bundles); built on their own only for a lone `make
# test-serving` after the toolkit changed
$(TEST_BUNDLES)/READY: $(shell find toolkit -name '*.py') tests/conftest.py tests/build_bundles.py | $(STAMP)
	$(BIN)/python -m tests.build_bundles $(TEST_BUNDLES)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check toolkit tests benchmarks

# one pytest worker a core (CI's 2): the suite is mostly one busy thread at a time. --dist loadfile keeps each
# module on one worker (tests/conftest.py joins the modules sharing a costly fixture); --no-loadscope-reorder
# keeps conftest's order, the longest units first
TEST_WORKERS ?= 2
PYTEST_WORKERS := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS) --rtk-write-bundles=$(TEST_BUNDLES)
	$(MAKE) --no-print-directory test-serving

# The serving tests where services run: a venv torch cannot be imported in (checked first, so the run cannot
# silently use it), on the bundles the torch side built
test-serving: $(SERVE_STAMP) $(TEST_BUNDLES)/READY
	@if $(SERVE_BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch is importable in $(SERVE_VENV): the serving tests must run without it" >&2; exit 1; fi
	RTK_TEST_BUNDLES=$(TEST_BUNDLES) $(SERVE_BIN)/python -m pytest -q -m serving $(PYTEST_WORKERS)

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
	rm -rf $(VENV) $(SERVE_VENV) artifacts/demo $(TEST_BUNDLES)
