# edgestack: `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all venv demo test lint clean arm-env

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[export,openvino,bench,dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgestack demo --overwrite

# aarch64 Python + ONNX Runtime under qemu-user, for the ARM target's tests (idempotent:
# ~10 ms once built). Needs root the first time (apt-get, dpkg --add-architecture arm64).
arm-env: $(STAMP)
	bash scripts/setup-arm-env.sh

# the ruff version is pinned in the dev extra (pyproject.toml): the rules it passes
# ruff (pyproject [tool.ruff]) and the import contracts (pyproject [tool.importlinter])
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/lint-imports

# Two pytest workers, one file each at a time (pytest-xdist --dist loadfile: a file's module
# fixtures are built once), in collection order (--no-loadscope-reorder: tests/conftest.py
# puts the files with slow tests first, so the short files even out the end); torch at one
# thread per worker, so the two workers do not fight over the two cores.
# PYTEST_WORKERS=0 runs in one process (torch at its default threads).
PYTEST_WORKERS ?= 2

test: $(STAMP) arm-env lint
	$(if $(filter 0,$(PYTEST_WORKERS)),,OMP_NUM_THREADS=1) $(PY) -m pytest -q -n $(PYTEST_WORKERS) \
		--dist loadfile --no-loadscope-reorder \
		$(PYTEST_ARGS)

clean:
	rm -rf $(VENV) edgestack-demo .pytest_cache
