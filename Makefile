# `make demo` and `make test` set everything up on a fresh machine (a .venv beside this file).
# torch goes in first, pinned by constraints.txt to the CPU build these machines carry; on a GPU
# machine install your CUDA torch first and then `pip install -e .` without the constraints.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo sweep sweep-prior test test-all test-engines test-lowest clean

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

# Data efficiency (README "Data efficiency"): SFT vs Visual-RFT, k = 1..16 per class x 3 seeds, one
# cached base; each preset writes runs/PRESET/{table.md,table.json,sweep.png,report.html}.
# Rerunning resumes. SWEEP_PRESETS=sweep_shift runs only the domain-shift preset.
# One thread, as the README's tables were measured: the warm-up base, and so every number, changes
# with the thread count (SWEEP_THREADS=2 is faster on an idle machine but measures another base).
SWEEP_PRESETS ?= sweep_shift sweep_digits
SWEEP_THREADS ?= 1
sweep: setup
	for preset in $(SWEEP_PRESETS); do \
	  OMP_NUM_THREADS=$(SWEEP_THREADS) $(VENV)/bin/visual-rft sweep --out runs/$$preset configs/$$preset.yaml || exit 1; done

# When does RFT beat SFT (README "Data efficiency"): SFT, RFT and No-Thinking RFT from a 300-step and a
# 1500-step warm-up base, k = 1, 4, 16 x 3 seeds, each preset into runs/PRESET_prior (~1 h per preset, one thread).
PRIOR_ARGS = "sweep.ks=[1,4,16]" "sweep.methods=[sft,rft,rft_nothink]" "sweep.base_steps=[300,1500]"
sweep-prior: setup
	for preset in $(SWEEP_PRESETS); do \
	  OMP_NUM_THREADS=$(SWEEP_THREADS) $(VENV)/bin/visual-rft sweep --out runs/$${preset}_prior configs/$$preset.yaml \
	    $(PRIOR_ARGS) || exit 1; done

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

# The engines launched on 2 CPU processes: DeepSpeed ZeRO-2/3 against 1-process runs (tests/test_deepspeed.py)
# and accelerate's ddp.yaml / fsdp.yaml (tests/test_launch_configs.py); how long: README "Layout" (the first
# launch JIT-builds DeepSpeed's shm op, cached in ~/.cache/torch_extensions).
test-engines: setup
	$(PY) -m pytest -q -m deepspeed

# The model-facing tests under the lowest transformers the package declares (versions.py), in a
# second venv: the same torch pin, every other pin but transformers from constraints.txt.
TRANSFORMERS_LOWEST ?= 5.17.0
LOW_VENV ?= .venv-lowest
$(LOW_VENV)/.installed: pyproject.toml constraints.txt
	test -x $(LOW_VENV)/bin/python || python3 -m venv $(LOW_VENV)
	$(LOW_VENV)/bin/python -m pip install -q --upgrade pip
	grep -v '^transformers==' constraints.txt > $(LOW_VENV)/constraints.txt
	$(LOW_VENV)/bin/python -m pip install -q -c $(LOW_VENV)/constraints.txt torch
	$(LOW_VENV)/bin/python -m pip install -q -c $(LOW_VENV)/constraints.txt -e ".[dev]" "transformers==$(TRANSFORMERS_LOWEST)"
	touch $@

test-lowest: $(LOW_VENV)/.installed
	$(LOW_VENV)/bin/python -m pytest -q tests/test_models.py tests/test_rl_equivalence.py tests/test_families.py

clean:
	rm -rf runs .pytest_cache
