#!/usr/bin/env bash
# Here, before a GPU run: the wheels the GPU machine's image lacks, and timm at our version (its
# python3 is 3.12 with torch, torchvision, timm, numpy, pillow, aiohttp, psutil, matplotlib,
# prometheus-client, nvidia-ml-py; see the device tool's KINDS.md), at the versions of this
# checkout's .venv, into .whl/ (ignored by git, carried by the run: `carry: [".whl"]`). Then run
# scripts/gpu-run.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
# pip freeze writes some names with "_" for "-": matched either way.
NEEDED='timm|litserve|fastapi|starlette|uvicorn|pyzmq|python.multipart|httptools|pydantic|pydantic.core|annotated.types|annotated.doc|typing.inspection|typing.extensions|opentelemetry.api|importlib.metadata|efficientnet.lite0.pytorch.model'
mapfile -t PINS < <(.venv/bin/pip freeze | grep -i -E "^($NEEDED)==")
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "${PINS[@]}"
ls .whl && du -sh .whl
