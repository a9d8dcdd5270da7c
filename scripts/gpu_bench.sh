#!/usr/bin/env bash
# One-shot GPU benchmark, under 8 minutes on one H200 (issue 14): a ~1.1B Llama from config in bf16 on 2048-token
# rows, the stock Trainer vs the fastest and the lowest-memory recipe (benchmarks/gpu_1b.yaml), and where token
# dropping pays (benchmarks/gpu_token_dropping.yaml). Tokens/s, MFU against the data-sheet peak, peak CUDA memory and
# the planner's prediction, per row; tables in benchmarks/results/gpu/ (summary.md: machine, versions, both tables).
#   bash scripts/gpu_bench.sh              # on the GPU machine (after scripts/gpu_wheels.sh here, carrying .whl)
#   bash scripts/gpu_bench.sh --cpu-smoke  # the same matrices shrunk to a 3-layer model, a few steps, on the CPU
#                                          # (tests/e2e/test_gpu_bench.py runs it, so this script cannot rot)
# PY picks the python (default: .venv/bin/python, else python3); OUT the results folder.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
case "${1:-}" in
  --cpu-smoke) smoke=1 ;;
  "") ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac
if [ -z "${PY:-}" ]; then
  PY=${VENV:-.venv}/bin/python
  [ -x "$PY" ] || PY=python3
fi
if [ -d .whl ] && [ $smoke = 0 ]; then  # the GPU machine's image lacks datasets and pydantic (scripts/gpu_wheels.sh)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "could not install .whl/*.whl"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

overrides=()
if [ $smoke = 1 ]; then
  OUT=${OUT:-runs/gpu_bench_smoke}
  # What only a GPU makes affordable is shrunk; every technique and training setting of the rows stays.
  overrides=(
    --quick
    --set "model.config_overrides={hidden_size: 64, num_hidden_layers: 3, num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 128, vocab_size: 4096, max_position_embeddings: 128}"
    --set data.max_length=64 --set data.max_train_samples=64 --set data.max_eval_samples=4
    --set training.per_device_train_batch_size=2 --set training.max_steps=2 --set training.dataloader_num_workers=0
    --set "training.torch_compile=${SMOKE_COMPILE:-false}"  # inductor on 2 CPU cores: tests/e2e/test_compile.py
  )
else
  OUT=${OUT:-benchmarks/results/gpu}
  nvidia-smi -L || { echo "no GPU (use --cpu-smoke on a machine without one)"; exit 1; }
fi
mkdir -p "$OUT"
summary="$OUT/summary.md"
{
  echo "# scripts/gpu_bench.sh$([ $smoke = 1 ] && echo ' --cpu-smoke')"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo cpu)"
  echo "- $($PY -c 'import torch, transformers; print("torch", torch.__version__, "/ transformers", transformers.__version__)')"
  echo "- liger-kernel: $($PY -c 'import importlib.metadata as m; print(m.version("liger-kernel"))' 2>/dev/null || echo 'not installed')"
} > "$summary"
status=0
# Each matrix gets a hard limit; SIGINT makes the bench write what its finished rows measured.
for spec in gpu_1b:330 gpu_token_dropping:140; do
  name=${spec%%:*}; limit=${spec##*:}
  [ $smoke = 1 ] && limit=600
  echo "== $name (limit ${limit}s)"
  timeout -s INT -k 20 "$limit" $PY -m hf_efftrain bench "benchmarks/$name.yaml" --out "$OUT/$name" \
    "${overrides[@]}" > "$OUT/$name.log" 2>&1 || { status=1; echo "$name failed: see $OUT/$name.log"; }
  tail -25 "$OUT/$name.log"
  if [ -f "$OUT/$name/results.md" ]; then
    { echo; echo "## $name"; echo; cat "$OUT/$name/results.md"; } >> "$summary"
  else
    status=1
  fi
done
echo "summary: $summary"
exit $status
