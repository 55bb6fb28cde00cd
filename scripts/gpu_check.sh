#!/usr/bin/env bash
# GPU check (issue 12): the device tests and the bf16 benchmark on a CUDA machine, within
# 8 minutes. Run from the repository root after the README's install:
#     bash scripts/gpu_check.sh            # writes gpu_check_out/ (bench.json, logs)
# The tests parametrise over the devices present, so on a GPU machine they cover cuda too.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
python - <<'PY' | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**30, "GiB")
PY
timeout 240 python -m pytest -q -p no:cacheprovider \
    tests/test_precision.py tests/core/test_memory.py tests/methods/test_trainer.py \
    2>&1 | tee "$OUT/tests.txt" | tail -5
timeout 230 melbo-lens bench --device cuda --dtype bfloat16 --naive-steps 40 --timed-steps 5 \
    --power-steps 10 --diversity-vectors 4 --slots 32 --reference-slots 4 --no-compile \
    --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
