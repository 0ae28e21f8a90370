# delt-ext: `make test` and `make demo` work on a fresh machine (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Pinned: these CUDA builds of torch also run on CPU-only machines.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
DEPENDENCIES ?= pybind11 ninja numpy tqdm matplotlib pytest pytest-benchmark pytest-xdist ruff \
	mkdocs-material mkdocstrings-python clang-format==23.1.5
# The documentation site and the linters (`make docs`, `make lint`); clang-format pinned, as its
# output changes between major versions.
TOOL_DEPENDENCIES ?= mkdocs-material mkdocstrings-python clang-format==23.1.5 ruff

# cpp_extension guesses CUDA_HOME from `which nvcc`, which can be a wrapper script; prefer the
# toolkit's own folder when it exists.
ifeq ($(origin CUDA_HOME), undefined)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME := /usr/local/cuda
endif
endif

SOURCES := setup.py pyproject.toml $(shell find csrc delt_ext python -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: all venv install test test-fast test-cpu-only bench bench-installed gpu-check gpu-check-dry \
	demo fashion-mnist docs lint tools clean

all: test

$(VENV)/.deps-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_PACKAGES) $(DEPENDENCIES)
	touch $@

venv: $(VENV)/.deps-stamp

# Non-editable install: tests import the installed package, as users do. --no-build-isolation
# compiles against the torch installed above instead of downloading another one.
$(VENV)/.install-stamp: $(VENV)/.deps-stamp $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps .
	touch $@

install: $(VENV)/.install-stamp

# pytest (not `python -m pytest`): the repository root stays off sys.path, so the installed
# package is the one under test.
# Test files run in parallel over TEST_WORKERS processes (pytest-xdist; `auto`: one per CPU),
# each file whole on one worker (--dist loadfile: its module fixtures built once).
# TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= auto
PYTEST_PARALLEL = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: install
	$(VENV)/bin/pytest tests $(PYTEST_PARALLEL)

test-fast: install
	$(VENV)/bin/pytest tests -m "not slow" $(PYTEST_PARALLEL)

# The CPU-only build (FORCE_ONLY_CPU=1) in a scratch folder, and the tests that depend on it
# (its "built without CUDA" error); CI runs it beside `make test`.
CPU_ONLY_BUILD := build/cpu-only
test-cpu-only: venv
	FORCE_ONLY_CPU=1 $(PY) setup.py --quiet build --build-base $(CPU_ONLY_BUILD) --build-lib $(CPU_ONLY_BUILD)/lib
	PYTHONPATH=$(CURDIR)/$(CPU_ONLY_BUILD)/lib $(VENV)/bin/pytest tests/test_bn_stat.py tests/test_augment.py -q \
		-k "cpu_only or build_info or opcheck or matches_sre2l"

# Every benchmark in one run, so that ratios compare like with like; the tables of
# benchmarks/README.md are printed by benchmarks/report.py from the JSON.
bench: install
	$(MAKE) bench-installed BENCH_PYTEST=$(VENV)/bin/pytest BENCH_PYTHON=$(PY)

# The same run against a package already installed in BENCH_PYTHON's environment, without the
# .venv (the lent GPU machine: no network; `make gpu-check` runs it with BENCH_ARGS="-k cuda").
BENCH_PYTHON ?= $(PYTHON)
BENCH_PYTEST ?= $(BENCH_PYTHON) -m pytest
BENCH_JSON ?= .benchmarks/latest.json
BENCH_ARGS ?=
bench-installed:
	mkdir -p $(dir $(BENCH_JSON))
	PYTHONSAFEPATH=1 $(BENCH_PYTEST) benchmarks --benchmark-only \
		--benchmark-columns=min,median,mean,stddev,rounds --benchmark-json=$(BENCH_JSON) $(BENCH_ARGS)
	$(BENCH_PYTHON) benchmarks/report.py $(BENCH_JSON)

# The prepared check for a lent GPU machine (docs/gpu-check.md): build against that machine's
# torch, CUDA tests, compute-sanitizer, benchmarks; logs and a summary under GPU_CHECK_OUT
# (default: $OUT, which the device tool sets, else out/gpu-check).
GPU_CHECK_OUT ?= $(or $(OUT),out/gpu-check)
gpu-check:
	$(PYTHON) tools/gpu_check.py $(GPU_CHECK_OUT)

# The same script on this CPU with every GPU step replaced by a check that its commands and files
# exist and parse (seconds; .ci/run runs it so that the script does not rot).
gpu-check-dry: install
	$(PY) tools/gpu_check.py --dry out/gpu-check-dry

# The main job: Fashion-MNIST through `delt distill` (teacher, selection, DELT IPC 10, eval,
# diversity, and the random-real baseline; `delt demo`), outputs
# under $(DEMO_OUT). The data comes from Debian's dataset-fashion-mnist package.
FASHION_MNIST_ROOT ?= /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo

fashion-mnist:
	@if [ -e $(FASHION_MNIST_ROOT)/train-images-idx3-ubyte.gz ] || [ -e $(FASHION_MNIST_ROOT)/train-images-idx3-ubyte ]; then \
		echo "Fashion-MNIST: $(FASHION_MNIST_ROOT)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && apt-get install -y dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing from $(FASHION_MNIST_ROOT). Install it with" >&2; \
		echo "  sudo apt-get install dataset-fashion-mnist" >&2; \
		echo "or point FASHION_MNIST_ROOT at a folder holding its four IDX files." >&2; \
		exit 1; \
	fi

demo: install fashion-mnist
	$(VENV)/bin/delt demo --out $(DEMO_OUT) --data-root $(FASHION_MNIST_ROOT)

# A .venv made before the tools joined DEPENDENCIES gets them here (once).
$(VENV)/.tools-stamp: $(VENV)/.deps-stamp
	$(PIP) install $(TOOL_DEPENDENCIES)
	touch $@

tools: $(VENV)/.tools-stamp

# The documentation site (mkdocs.yml, docs/) into site/, warnings as errors: broken links,
# missing anchors, pages left out of the navigation, unresolved API references. The API pages
# are read from the sources statically: no build of the extension is needed.
docs: tools
	@# Not --quiet: it hides the warnings from --strict, which then passes whatever they say.
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

PYTHON_SOURCES := setup.py delt_ext python tests benchmarks tools
CXX_SOURCES = $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \))

lint: tools
	$(VENV)/bin/ruff check $(PYTHON_SOURCES)
	$(VENV)/bin/ruff format --check $(PYTHON_SOURCES)
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

clean:
	rm -rf build dist site *.egg-info $(VENV)/.install-stamp
