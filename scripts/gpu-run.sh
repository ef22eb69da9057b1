#!/usr/bin/env bash
# Issue 16's GPU run, on the lent machine, in under 10 minutes: first, here, scripts/gpu-wheels.sh;
# then the device tool's `run` with command "bash scripts/gpu-run.sh", carry [".whl"], timeout_s
# 600. Everything goes to $OUT (the tool brings back at most 8 files, two folders down): run.log,
# and results.json + results.md (+ the throughput plot) of each bench run.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-run}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__, torch.cuda.get_device_name())"

# 1. What touches CUDA that CI cannot run: nvJPEG's decode against the CPU path (under a minute).
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_classifier.py -k "device"

# 2. mambaout_base fp16, each lever on top of the rung before it (about 6 minutes): decode (4 CPU
#    threads, fast decode), gpu-decode (+ nvJPEG), overlap (+ the next batch decoded meanwhile).
BENCH=(python3 -m timmserve bench --random-weights --rounds 1 --duration 4 --warmup 1 --client-processes 2 --no-progress)
timeout 420 "${BENCH[@]}" --model mambaout_base --ladder baseline,decode,gpu-decode,overlap \
    --concurrency 1,8,32,64 --out "$OUT/mambaout_base"

# 3. resnet50, the second point: best (whatever time is left).
timeout 100 "${BENCH[@]}" --model resnet50 --ladder best --concurrency 1,8,32,64 --out "$OUT/resnet50"

# Within what comes back: drop the plots but one.
find "$OUT" -name '*.png' ! -path '*/mambaout_base/throughput.png' -delete
ls -R "$OUT"
