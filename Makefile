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

# `make gpu-check`: the one prepared command for a CUDA machine (docs/design.md, Performance). It uses what
# is there: the machine's own python3 with torch and triton (GPU_PYTHON; no .venv, nothing installed) and
# PYTHONPATH=src. It runs the GPU tests (tests/test_triton_variants.py tests/test_triton.py -k gpu: the Triton
# kernels against the float64 reference in fp16/bf16, forward and backward, the attention variants, the auto
# choice), then benchmarks/gpu_check.py under
# GPU_BUDGET seconds (ceilings, correctness, speed, decode bandwidth, overhead), and prints its Markdown
# summary, then the decoding table of benchmarks/decode.py on CUDA (needs transformers there; measured, never
# failing the check). Measured on an H200 with a cold Triton cache: the 19 GPU tests 156 s (before the 2 of
# test_triton_variants.py, not yet measured: about 6 more kernels to compile), the phases 60-80 s;
# the decoding table is about 1-2 minutes (not yet measured there). The limits below cap a run at
# GPU_TEST_TIMEOUT + GPU_BUDGET + 60 s of grace + DECODE_TIMEOUT = 10.3 minutes; a typical one about 7.
# The tests get SIGINT at their limit, so pytest still prints what passed and what failed.
# Where things go: OUT (default benchmarks/results/, tracked) receives only the results,
# gpu-check-<device>.json, gpu-check-<device>.md and decode-<device>.json; the logs (pytest-gpu.log,
# gpu-check.log, summary.md, decode.log)
# and triton-cache.tgz (TRITON_CACHE archived, to reuse the compiled kernels elsewhere) go to GPU_LOGS
# (default gpu-check-out/, git-ignored), so a run leaves no logs or binaries among the tracked results.
# Exit status: non-zero when a GPU test fails (or none ran, or they timed out) or gpu_check.py fails (a
# correctness row off the rule, a crashed phase, its timeout); without CUDA one line saying so, then the
# plan it would run with each phase's budget (gpu_check.py --dry-run, which imports no torch), then 0 (the
# probe's status 3 is gpu_check.py's PROBE_NOTHING_TO_RUN).
OUT ?= benchmarks/results
GPU_LOGS ?= gpu-check-out
GPU_PYTHON ?= python3
GPU_TEST_TIMEOUT ?= 240
GPU_BUDGET ?= 200
DECODE_TIMEOUT ?= 120
TRITON_CACHE ?= $(CURDIR)/.triton-cache
GPU_ENV := PYTHONPATH=src MULTIHEAD_TRITON_CONFIGS=few TRITON_CACHE_DIR=$(TRITON_CACHE)
gpu-check:
	@$(GPU_ENV) $(GPU_PYTHON) benchmarks/gpu_check.py --probe; probe=$$?; \
	if [ $$probe -eq 3 ]; then $(GPU_PYTHON) benchmarks/gpu_check.py --dry-run --budget $(GPU_BUDGET); exit 0; \
	elif [ $$probe -ne 0 ]; then exit $$probe; fi; \
	mkdir -p $(OUT) $(GPU_LOGS); \
	echo "gpu-check: GPU tests, tests/test_triton_variants.py tests/test_triton.py -k gpu, at most $(GPU_TEST_TIMEOUT) s"; \
	$(GPU_ENV) timeout -s INT -k 10 $(GPU_TEST_TIMEOUT) $(GPU_PYTHON) -m pytest -q -p no:cacheprovider -rfE \
		tests/test_triton_variants.py tests/test_triton.py -k gpu > $(GPU_LOGS)/pytest-gpu.log 2>&1; tests=$$?; \
	tail -n 15 $(GPU_LOGS)/pytest-gpu.log; \
	echo "gpu-check: benchmarks/gpu_check.py, budget $(GPU_BUDGET) s"; \
	$(GPU_ENV) timeout -k 10 $$(( $(GPU_BUDGET) + 60 )) $(GPU_PYTHON) benchmarks/gpu_check.py \
		--budget $(GPU_BUDGET) --out $(OUT) > $(GPU_LOGS)/summary.md 2> $(GPU_LOGS)/gpu-check.log; bench=$$?; \
	cat $(GPU_LOGS)/summary.md; [ $$bench -eq 0 ] || tail -n 5 $(GPU_LOGS)/gpu-check.log; \
	echo "gpu-check: decoding tokens/s, eager vs compiled (CUDA graphs) vs transformers, at most $(DECODE_TIMEOUT) s"; \
	$(GPU_ENV) timeout -k 10 $(DECODE_TIMEOUT) $(GPU_PYTHON) benchmarks/decode.py --device cuda --tables speed \
		--out $(OUT) > $(GPU_LOGS)/decode.log 2>&1 && tail -n 12 $(GPU_LOGS)/decode.log \
		|| echo "gpu-check: decoding table not measured (exit $$?, $(GPU_LOGS)/decode.log); it does not fail the check"; \
	[ ! -d $(TRITON_CACHE) ] || tar czf $(GPU_LOGS)/triton-cache.tgz -C $(TRITON_CACHE) .; \
	echo "gpu-check: GPU tests exit $$tests, gpu_check.py exit $$bench; results in $(OUT), logs in $(GPU_LOGS)"; \
	[ $$tests -eq 0 ] && [ $$bench -eq 0 ]

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
