# The README's two commands: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs, torch first:
# `pip install torch==2.13.0` takes a local CPU wheel on these machines, while
# an unpinned torch pulled in by a dependency would fetch several GB of CUDA.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test bench gpu-check install-demo install-test clean

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

# On a GPU machine (its own python3 with torch and triton; no .venv there): the GPU tests, then
# benchmarks/gpu_check.py under a time budget; logs, results and the Triton cache (an archive) in $(OUT).
OUT ?= gpu-check-out
GPU_BUDGET ?= 240
GPU_ENV := PYTHONPATH=src MULTIHEAD_TRITON_CONFIGS=few TRITON_CACHE_DIR=$(CURDIR)/.triton-cache
gpu-check:
	mkdir -p $(OUT)
	-$(GPU_ENV) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py -k gpu -rf \
		> $(OUT)/pytest-gpu.log 2>&1; tail -5 $(OUT)/pytest-gpu.log
	$(GPU_ENV) python3 benchmarks/gpu_check.py --budget $(GPU_BUDGET) --out $(OUT) > $(OUT)/gpu-check.log 2>&1; \
		grep -v '^ \|^{\|^}' $(OUT)/gpu-check.log
	tar czf $(OUT)/triton-cache.tgz .triton-cache

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
