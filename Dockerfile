# timmserve image. CPU (default):
#   docker build -t timmserve .
# GPU (CUDA runtime base; run with --gpus all):
#   docker build -t timmserve:cuda --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 .
# Weights: the built-in model is offline; bake a hub model in with --build-arg MODEL=resnet50.a1_in1k,
# or mount a checkpoint/model folder and pass --model / --checkpoint at run time.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG MODEL=""
# Optional extras, e.g. EXTRAS=ray for `--engine ray` and the KubeRay example.
ARG EXTRAS=""
ARG TORCH_PAIR="torch==2.14.1 torchvision==0.29.1"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/home/timmserve/.cache/huggingface

# The CUDA base has no Python of its own.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv curl \
        && rm -rf /var/lib/apt/lists/*; \
    elif ! command -v curl >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 timmserve

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ${TORCH_PAIR} \
    && /opt/venv/bin/pip install ".${EXTRAS:+[$EXTRAS]}"
ENV PATH=/opt/venv/bin:$PATH

USER timmserve
# Bake hub weights into the image's cache when MODEL is given (downloads at build time only).
RUN if [ -n "$MODEL" ]; then python3 -c "import timm; timm.create_model('$MODEL', pretrained=True)"; fi
ENV TIMMSERVE_MODEL=${MODEL}

EXPOSE 8000
# timmserve maps SIGTERM to a clean shutdown of every process.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
# Listen on all interfaces inside the container; publish the port to choose who can reach it.
ENTRYPOINT ["/bin/sh", "-c", "exec timmserve serve --host 0.0.0.0 --port 8000 ${TIMMSERVE_MODEL:+--model $TIMMSERVE_MODEL} \"$@\"", "--"]
