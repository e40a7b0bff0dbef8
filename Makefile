# `make demo` and `make test` build what they need. The venv is rebuilt only when the pins change.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PINS := requirements/lock.txt requirements/nodeps.txt
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo clean-venv

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

clean-venv:
	rm -rf $(VENV)
