# hcx-server: HyperCLOVA X SEED Vision Instruct 3B behind REST, MCP and an OpenAI-compatible API.
#
#   docker build -t hcx-server .                      # GPU-ready image (CUDA build of torch)
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v "$PWD/models:/models" hcx-server
#
# The build_and_run_linux.sh / build_and_run_windows.ps1 scripts do this for you.
#
# Build args:
#   BASE_IMAGE   Any Debian/Ubuntu-like image. The default is the official slim Python image:
#                PyPI's Linux torch wheel brings its own CUDA 12 user-space libraries
#                (the nvidia-* wheels), so a CUDA base image would only add a second copy of
#                them; the GPU driver comes from the host through `--gpus all`
#                (NVIDIA Container Toolkit). If the base has no python3 (e.g.
#                nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04), Python is installed with apt.
#   TORCH_REQUIREMENT   What pip installs for torch, before the other requirements (default
#                the pin of requirements.txt). For a CPU-only image give the CPU wheel, e.g. a
#                file under .docker-build/ (copied to /build/) or "torch==2.13.0" together with
#                PIP_EXTRA_ARGS="--index-url <your CPU wheel index>".
#   PIP_EXTRA_ARGS      Extra arguments for every pip install (index, --cert, ...).
#   INSTALL_REMOTE_CODE_DEPS  1 (default): also install requirements-remote-code.txt
#                (timm, einops, torchvision), which the real model's remote code needs.
#                0: leave them out (CPU test images with a tiny model).
#   INSTALL_COMPILER    1 (default): install g++ so that CPUs with AVX2 or AVX-512 build the
#                fast one-row decode kernels (kernels/*.cpp, bf16 and int8) once at first start
#                (GENERATION_BACKEND=auto/gemv, ~1.8x decode, see BENCHMARKS.md); 0: leave it
#                out (CPU decode then runs torch's kernels).
#   APP_UID / APP_GID   The non-root user the server runs as (default 1000:1000).
#
# .docker-build/ (git-ignored, optional) is copied into the dependency stage only: local
# wheels or a CA bundle for the build. It never reaches the final image.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
ARG APP_UID=1000
ARG APP_GID=1000
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/hcx
# Python (only if the base lacks it) and the non-root user. A base whose uid APP_UID is
# taken already (ubuntu:24.04 has "ubuntu" = 1000) keeps that user: USER below is numeric.
# HOME is writable for any uid (like /tmp): build_and_run_linux.sh runs the container as
# the calling user (--user UID:GID) so that downloaded model files belong to them.
RUN set -eu; \
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    getent group "$APP_GID" >/dev/null || groupadd --gid "$APP_GID" hcx; \
    getent passwd "$APP_UID" >/dev/null \
        || useradd --uid "$APP_UID" --gid "$APP_GID" --no-create-home --home-dir /home/hcx \
            --shell /usr/sbin/nologin hcx; \
    mkdir -p /home/hcx /models; \
    chown "$APP_UID:$APP_GID" /home/hcx /models; \
    chmod 1777 /home/hcx; \
    chmod 0775 /models

# ---------------------------------------------------------------------------------------
# Dependencies: their own stage and layers, so editing the source never reinstalls them.
FROM base AS deps
ARG TORCH_REQUIREMENT="torch==2.13.0"
ARG PIP_EXTRA_ARGS=""
ARG INSTALL_REMOTE_CODE_DEPS=1
# torch first and alone: the biggest layer, kept when other pins or the source change.
# ".docker-buil[d]" is optional (the glob matches nothing when the folder is absent);
# .dockerignore is only there so that the COPY always has a source.
COPY .dockerignore .docker-buil[d] /build/
RUN set -eu; \
    python3 -m venv /opt/venv; \
    pip install $PIP_EXTRA_ARGS "$TORCH_REQUIREMENT"
COPY requirements.txt requirements-remote-code.txt /build/
RUN set -eu; \
    reqs="-r /build/requirements.txt"; \
    if [ "$INSTALL_REMOTE_CODE_DEPS" = "1" ]; then reqs="$reqs -r /build/requirements-remote-code.txt"; fi; \
    pip install $PIP_EXTRA_ARGS $reqs; \
    pip check; \
    python -c "import torch, transformers, flask, gunicorn, PIL, click, dotenv, huggingface_hub, httpx; from transformers import AutoProcessor; print('torch', torch.__version__, 'transformers', transformers.__version__)"; \
    rm -rf /root/.cache

# ---------------------------------------------------------------------------------------
FROM base
ARG APP_UID=1000
ARG APP_GID=1000
ARG INSTALL_COMPILER=1
RUN set -eu; \
    if [ "$INSTALL_COMPILER" = "1" ] && ! command -v g++ >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++; \
        rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=deps /opt/venv /opt/venv
# The project itself (py-modules server and cli, the benchmarks package, the playground page
# static/ installed as hcx_server_static, the CPU kernels' sources kernels/ as hcx_server_kernels,
# console script hcx-cli), no dependencies.
COPY pyproject.toml README.m[d] server.py cli.py /tmp/src/
COPY benchmarks /tmp/src/benchmarks/
COPY static /tmp/src/static/
COPY kernels /tmp/src/kernels/
RUN set -eu; \
    [ -f /tmp/src/README.md ] || : >/tmp/src/README.md; \
    pip install --no-deps --no-build-isolation /tmp/src; \
    rm -rf /tmp/src /root/.cache; \
    hcx-cli --help >/dev/null

# MODEL_PATH: an empty or missing folder under /models is filled by the first run (download).
# HOST_MODEL_DIR=/models: the cache folder when MODEL_PATH is a hub id.
# HOST/PORT: where `hcx-cli serve` listens inside the container.
ENV MODEL_PATH=/models/HyperCLOVAX-SEED-Vision-Instruct-3B \
    HOST_MODEL_DIR=/models \
    HOST=0.0.0.0 \
    PORT=8000
VOLUME ["/models"]
WORKDIR /home/hcx
USER ${APP_UID}:${APP_GID}
EXPOSE 8000
# 503 while loading (or failed) -> unhealthy; the long start period covers the first download.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=8)"]
CMD ["hcx-cli", "serve"]
