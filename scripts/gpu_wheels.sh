#!/usr/bin/env bash
# Fetch, here (where pip reaches PyPI), the wheels the GPU machine lacks, into .whl/ (git-ignored through
# .git/info/exclude): its image has torch, accelerate, peft and tokenizers but not datasets or pydantic, and nothing
# can be fetched there. scripts/gpu_bench.sh installs them from .whl/ into /tmp/site when the folder is there.
# Versions: those of this environment's .venv (what the tests ran with); liger-kernel for the fused_kernels technique.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=$($PY - <<'PY'
import importlib.metadata as m
names = ["datasets", "dill", "multiprocess", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
         "transformers", "huggingface_hub", "fsspec", "xxhash"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
PY
)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl $pins "liger-kernel>=0.5"
du -sh .whl && ls .whl
