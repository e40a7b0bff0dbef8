# `make demo` and `make test` build what they need. The venv is rebuilt only when the pins change.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PINS := requirements/lock.txt requirements/nodeps.txt
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo demo-full clean-venv mutation

venv: $(VENV)/.installed

# The heavy stack: only when a pin file changes.
$(VENV)/.pins: $(PINS)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps -r requirements/nodeps.txt
	touch $@

# The project itself (editable, cheap): whenever pyproject.toml changes.
$(VENV)/.installed: $(VENV)/.pins pyproject.toml
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: unit tests only, without the runs of real engines (docs/testing.md).
test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/memobert demo

# The demo with BERT+Direct (a 6-layer MiniLM) added to its table; finished stages and runs are reused.
demo-full: venv
	$(VENV)/bin/memobert demo bert_direct=true

# Mutation testing of the loss, masking, metric, protocol, prompt and selection code against the fast unit
# tests ([tool.mutmut] in pyproject.toml); a fresh mutants/ each time, so no stale verdict is reused.
mutation: venv
	$(PY) -m pip install -q -r requirements/dev.txt
	rm -rf mutants && mkdir mutants
	$(VENV)/bin/mutmut run --max-children 2 $$($(PY) benchmarks/mutation_score.py --globs) > mutants/run.log 2>&1 \
		|| { tail -40 mutants/run.log; exit 1; }
	$(PY) benchmarks/mutation_score.py

clean-venv:
	rm -rf $(VENV)
