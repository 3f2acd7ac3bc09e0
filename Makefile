# The README's two commands: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs, torch first:
# `pip install torch==2.13.0` takes a local CPU wheel on these machines, while
# an unpinned torch pulled in by a dependency would fetch several GB of CUDA.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test bench install-demo install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, and only when the environment has none.
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	touch $@

$(VENV)/.installed-demo: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[demo]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[test]"
	touch $@

install-demo: $(VENV)/.installed-demo
install-test: $(VENV)/.installed-test

demo: install-demo
	$(VENV)/bin/multihead demo

test: install-test
	$(PY) -m pytest -n 2 -q

bench: install-test
	$(PY) benchmarks/cpu.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
