#!/usr/bin/env bash
# The GPU check: one script, under 5 minutes on one CUDA GPU. Runs the CUDA tests, then the GPU
# benchmark tables (benchmarks/gpu.py), and writes everything to $OUT (default gpu-results/).
# Needs python3 with torch (CUDA build), pyyaml, safetensors, tqdm, pytest; transformers for the HF rows.
#     bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"
# CUDA tests first (and the device-independent ones of the same file): a failure is recorded, not fatal.
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_device.py -rs 2>&1 | tee "$OUT/cuda-tests.txt"
timeout 240 $PY benchmarks/gpu.py "$@" 2>&1 | tee "$OUT/gpu-tables.txt"
echo "gpu_check: results in $OUT"
