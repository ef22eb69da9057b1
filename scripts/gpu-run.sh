#!/usr/bin/env bash
# Issue 16's GPU run on the lent machine, as calls of the device tool that follow each other while
# the machine is warm (each under 10 minutes; 15 device minutes in all, the start included): first,
# here, scripts/gpu-wheels.sh; then `run` with command "bash scripts/gpu-run.sh STAGE", carry
# [".whl"], for STAGE, in this order of priority:
#   mambaout   the CUDA tests, scripts/gpu-decode-profile.py, then mambaout_base's ladder of
#              scripts/gpu-bench.toml (9 minutes)
#   resnet50   the second point: batched against gpu-decode (3 minutes)
#   compile    resnet50 again, gpu-decode eager against torch.compile's CUDA graphs (untried)
#   front-end  scripts/gpu-front-end.toml: 4 API servers (2 minutes)
# Each writes run.log and its bench's results.json and results.md to $OUT; the plots are re-made
# here with `timmserve report` (at most 8 files come back).
set -uo pipefail
STAGE=${1:?usage: gpu-run.sh mambaout|resnet50|compile|front-end}
OUT=${OUT:-/tmp/gpu-run}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, torchvision, timm, litserve; print(torch.__version__, torchvision.__version__, timm.__version__, litserve.__version__, torch.cuda.get_device_name())" || exit 1
BENCH=(python3 -m timmserve bench --config scripts/gpu-bench.toml --random-weights --no-progress)
case $STAGE in
mambaout)
    # nvJPEG's decode against the CPU path: what touches CUDA that CI cannot run.
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/unit/test_classifier.py -k "device"
    # Where the GPU-decode pipeline's time goes, stage by stage, and what two threads make of it.
    timeout 60 python3 scripts/gpu-decode-profile.py --seconds 2
    timeout 470 "${BENCH[@]}" --model mambaout_base --out "$OUT/mambaout_base"
    ;;
resnet50)
    timeout 290 "${BENCH[@]}" --model resnet50 --ladder batched,gpu-decode --out "$OUT/resnet50"
    ;;
compile)
    timeout 560 "${BENCH[@]}" --model resnet50 --ladder batched,gpu-decode,compile --out "$OUT/compile"
    ;;
front-end)
    timeout 140 python3 -m timmserve bench --config scripts/gpu-front-end.toml --random-weights --no-progress \
        --model mambaout_base --out "$OUT/front"
    ;;
*) echo "unknown stage $STAGE"; exit 2 ;;
esac
find "$OUT" -name '*.png' -delete
date -u
ls -R "$OUT"
