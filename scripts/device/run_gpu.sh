#!/usr/bin/env bash
# The prepared GPU run of issue #18 (docs/GPU.md): two device-tool calls in quick succession on one machine.
#
#   bash scripts/device/run_gpu.sh stage   # call 1, carry .device/weights/part-0: keeps that part on the machine
#   bash scripts/device/run_gpu.sh all     # call 2, carry .device/weights/part-1 .device/data .whl:
#                                          #   weights reassembled + checked, inference bench, GPU ladder
#
# Everything it prints goes to $OUT/run.log as well; the benches write their JSON + markdown into $OUT
# (6 files: run.log, weights.json, gpu_inference.{json,md}, gpu_ladder.{json,md}). Budget knobs (env):
# SECONDS_PER_RUNG (default 70), INFERENCE_TIMEOUT (180 s), TOTAL_S (570 s: what the whole call may take).
set -u -o pipefail
MODE="${1:-all}"
OUT="${OUT:-/tmp/ast-gpu-out}"
STASH="${AST_STASH:-/tmp/ast-stash}"
CACHE="${AST_CACHE_DIR:-/tmp/ast-cache}"
SECONDS_PER_RUNG="${SECONDS_PER_RUNG:-70}"
INFERENCE_TIMEOUT="${INFERENCE_TIMEOUT:-180}"
TOTAL_S="${TOTAL_S:-570}"
mkdir -p "$OUT" "$STASH"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1 AST_CACHE_DIR="$CACHE"
PY="${PY:-python3}"
START=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

echo "== $(date -u '+%F %T UTC') mode=$MODE commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
$PY -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'

case "$MODE" in
stage)
    # call 1: keep part-0 where call 2 (same machine, within its 30 s warm window) finds it
    $PY scripts/device/pack_weights.py stash .device/weights/part-0 --to "$STASH" || exit 1
    ls -la "$STASH"
    exit 0 ;;
all) ;;
*) echo "usage: run_gpu.sh stage|all"; exit 2 ;;
esac

# wheels the image lacks: gguf (GGUF reader), pydantic (the params files), torchao (FP8 2:4, optional)
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" || { echo "wheel install failed"; exit 1; }
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "no .whl carried: gguf/pydantic must already be there"
fi
$PY -c 'import gguf, pydantic; print("gguf", gguf.__version__ if hasattr(gguf, "__version__") else "ok", "pydantic", pydantic.VERSION)' || echo "WARNING: gguf/pydantic import failed"

# 1. the weights: part-1 carried now, part-0 stashed by call 1; sha256 of each part and the whole; converted
#    by ast_core.embedded and compared with the CPU conversion's tensor digest
WEIGHTS_OK=0
if $PY scripts/device/pack_weights.py unpack .device/weights/part-1 "$STASH" .device/weights/part-0 \
        --cache "$CACHE" --report "$OUT/weights.json"; then
    WEIGHTS_OK=1
else
    echo "WEIGHTS NOT ASSEMBLED: the ladder cannot run on this call (the inference bench needs no weights)"
fi

# 2. inference: random weights, both model shapes, every variant (self-limited by a timeout)
timeout -s INT "$INFERENCE_TIMEOUT" $PY -m bench.gpu_inference --out-dir "$OUT" \
    || echo "gpu_inference exited $? (results so far are in $OUT/gpu_inference.json)"

# 3. the ladder on the real weights, in what is left of the call
REMAIN=$(left)
if [ "$WEIGHTS_OK" = 1 ] && [ "$REMAIN" -lt 120 ]; then
    echo "== ladder skipped: only ${REMAIN} s left of TOTAL_S=${TOTAL_S}"
elif [ "$WEIGHTS_OK" = 1 ]; then
    echo "== ladder: ${REMAIN} s left, ${SECONDS_PER_RUNG} s per rung"
    timeout -s INT "$REMAIN" $PY -m bench.gpu_ladder run --data .device/data --model embedded:smollm2-135m \
        --device cuda --seconds-per-rung "$SECONDS_PER_RUNG" --out-dir "$OUT" \
        || echo "gpu_ladder exited $? (rungs finished so far are in $OUT/gpu_ladder.json)"
fi
echo "== done in $(( $(date +%s) - START )) s"
ls -la "$OUT"
