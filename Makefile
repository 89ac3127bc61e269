# `make demo` and `make test` set everything up on a fresh machine (a .venv beside this file).
# torch goes in first, pinned by constraints.txt to the CPU build these machines carry; on a GPU
# machine install your CUDA torch first and then `pip install -e .` without the constraints.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps deepforest==2.1.0  # only for its tree photos; its dependencies would pull torchvision
	touch $@

demo: setup
	$(VENV)/bin/visual-rft demo --out runs/demo

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

clean:
	rm -rf runs .pytest_cache
