# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Subprocess-heavy tests oversubscribe two cores; one thread per process keeps them from stalling.
export OMP_NUM_THREADS ?= 1

.PHONY: test test-slow demo clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The whole suite; tests marked slow are skipped (run them with `make test-slow`).
test: $(VENV)/.installed
	$(PY) -m pytest -q tests

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q --runslow tests

clean:
	rm -rf $(VENV) demo
