#!/usr/bin/env bash
# The device check, as one prepared script for a lent CUDA machine (see docs/GPU.md):
#   kernel tests on CUDA, then bench/gpu_kernels.py (per-shape speed table + end-to-end forward).
# Results go to $OUT (the device tool) or bench/results/gpu/ when run by hand.
# The machine has torch + transformers but not this project's other dependencies,
# and no embedded weights: carry .gpu/cache (tokenizer + config only) for the tiny models.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
[ -d .gpu/cache ] && export AST_CACHE_DIR="$PWD/.gpu/cache"
PY="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
$PY -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/pytest_kernels.log"
$PY bench/gpu_kernels.py --out-dir "$OUT" --iters "${ITERS:-50}" 2>&1 | tee "$OUT/gpu_kernels.log"
