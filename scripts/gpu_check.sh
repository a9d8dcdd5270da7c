#!/usr/bin/env bash
# GPU checks, in under 8 minutes on one GPU: the `gpu`-marked tests, the quickstart recipe on CUDA (bf16 on the
# GPU, MFU against the known peak), and the core benchmark (plain Trainer vs EffTrainer, AdamW vs Lion).
#   bash scripts/gpu_check.sh            (results under $OUT, default runs/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi -L || { echo "no GPU"; exit 1; }
$PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
$PY -c "import flash_attn" 2>/dev/null && echo "flash-attn installed" || echo "flash-attn not installed"
status=0
$PY -m pytest -q -rs -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 || status=1
$PY -m hf_efftrain train recipes/quickstart.yaml --output-dir "$OUT/quickstart" > "$OUT/quickstart.log" 2>&1 || status=1
tail -14 "$OUT/quickstart.log"
$PY benchmarks/core_overhead.py --out "$OUT/core_overhead" > "$OUT/core_overhead.log" 2>&1 || status=1
tail -12 "$OUT/core_overhead.log"
exit $status
