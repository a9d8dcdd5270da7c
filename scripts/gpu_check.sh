#!/usr/bin/env bash
# GPU checks, in under 8 minutes on one GPU: the `gpu`-marked tests, the quickstart recipe on CUDA (bf16 on the
# GPU, MFU against the known peak), and the core benchmark (plain Trainer vs EffTrainer, AdamW vs Lion).
#   make setup && bash scripts/gpu_check.sh     (or `make gpu-check`; results under $OUT, default runs/gpu_check)
# It runs everything with the python of the environment `make setup` creates: .venv/bin/python (VENV=DIR as in
# the Makefile picks another one), from the repository root wherever it is started.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${VENV:-.venv}/bin/python
[ -x "$PY" ] || { echo "no $PY: run \`make setup\` first"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L || { echo "no GPU"; exit 1; }
mkdir -p "$OUT"
$PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
$PY -c "import flash_attn" 2>/dev/null && echo "flash-attn installed" || echo "flash-attn not installed"
status=0
$PY -m pytest -q -rs -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 || status=1
$PY -m hf_efftrain train recipes/quickstart.yaml --output-dir "$OUT/quickstart" > "$OUT/quickstart.log" 2>&1 || status=1
tail -14 "$OUT/quickstart.log"
$PY -m hf_efftrain bench benchmarks/core_overhead.yaml --out "$OUT/core_overhead" > "$OUT/core_overhead.log" 2>&1 || status=1
tail -16 "$OUT/core_overhead.log"
exit $status
