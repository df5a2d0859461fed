# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)
# Pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
TRITON_PIN := triton==3.9.0
DEEPCTR_PIN := deepctr-torch==0.3.0

# Triton 3.6, the release a stock CUDA image ships, for the GPU compile report only (no GPU needed): installed
# on first use with pip --target into a git-ignored folder beside the pinned 3.9 and put first on PYTHONPATH.
# Not part of `make test`. REPORT_ARGS="--quick --check" compiles the CI set (~4 min); the default, the full
# report (~16 min on 2 cores).
TRITON36_PIN := triton==3.6.0
TRITON36_DIR ?= .triton36
REPORT_ARGS ?= --check

.PHONY: setup demo test bench clean compile-report-triton36

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) $(TRITON_PIN)
	$(PY) -m pip install -q -e '.[test,plot]' $(TORCH_PIN) $(TRITON_PIN)
	# deepctr-torch pins old deps; install it alone and give it its real imports.
	$(PY) -m pip install -q --no-deps $(DEEPCTR_PIN)
	$(PY) -m pip install -q tqdm scikit-learn requests
	# the C++ CPU op of the local activation unit, compiled once into ~/.cache/din_kernels (or $$DIN_KERNELS_CACHE)
	$(PY) -m din_kernels.build
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) -m din compare --data movielens --variants base,din,din-mba --epochs 3 --batch-size 1024 --mba-lambda 0.1 --seeds 1-3 --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-columns=min,median,mean,rounds

compile-report-triton36: $(STAMP)
	test -f $(TRITON36_DIR)/triton/__init__.py || $(PY) -m pip install -q --no-deps --target $(TRITON36_DIR) $(TRITON36_PIN)
	PYTHONPATH=$(TRITON36_DIR) $(PY) -c "import sys, triton; sys.exit(triton.__version__ != '3.6.0' and 'not triton 3.6.0 in $(TRITON36_DIR): ' + triton.__version__)"
	PYTHONPATH=$(TRITON36_DIR) $(PY) benchmarks/gpu_compile_report.py $(REPORT_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks runs
