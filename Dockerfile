# syntax=docker/dockerfile:1
# hybridserve images, one Dockerfile for both:
#   docker build -t hybridserve:cpu .                                                 (slim, CPU torch)
#   docker build --build-arg VARIANT=gpu -t hybridserve:gpu .                         (CUDA runtime, CUDA torch)
#   docker build --build-arg VARIANT=gpu --build-arg WITH_TENSORRT=true -t hybridserve:gpu-trt .
# Run: docker run --shm-size=2g -p 8000:8000 -p 9000:9000 -p 8080:8080 -v hs-cache:/cache hybridserve:cpu
# Own models: mount a repository folder at /models (-v $PWD/my-models:/models:ro).
# On Kubernetes the same image runs the Ray nodes of a KubeRay RayService (see docs/deploy.md).

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- wheels of the two packages
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clients/pyproject.toml clients/pyproject.toml
COPY clients/hybridserve_client clients/hybridserve_client
COPY server server
COPY models models
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./clients .

# ---------------------------------------------------------------- CPU base: slim Python, CPU torch
FROM ${PYTHON_IMAGE} AS base-cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# wget: KubeRay's default probes run it in the Ray containers.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# ---------------------------------------------------------------- GPU base: CUDA runtime, CUDA torch
FROM ${CUDA_IMAGE} AS base-gpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG WITH_TENSORRT=false
ARG TORCH_TENSORRT_VERSION=2.14.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's Python follows the base image tag (pinned apt versions break on every point release);
# wget: KubeRay's default probes run it. Ubuntu's own user takes uid 1000: it goes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates wget \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && (groupdel ubuntu 2>/dev/null || true) \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && if [ "${WITH_TENSORRT}" = "true" ]; then \
        /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
            "torch-tensorrt==${TORCH_TENSORRT_VERSION}"; \
    fi

# ---------------------------------------------------------------- the image: either base + hybridserve
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HYBRIDSERVE_REPOSITORY=/models \
    HYBRIDSERVE_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    TRITON_CACHE_DIR=/cache/triton
COPY --from=wheels /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && groupadd --gid 1000 hybridserve \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin hybridserve \
    && mkdir -p /cache \
    && chown hybridserve:hybridserve /cache
# The built-in model repository; a volume mounted at /models replaces it.
COPY models/repository /models
COPY --chmod=755 deploy/docker/entrypoint.sh /usr/local/bin/hybridserve-entrypoint
VOLUME ["/cache"]
USER 1000:1000
WORKDIR /home/hybridserve
# HTTP, gRPC, Prometheus metrics (Ray's metrics agent)
EXPOSE 8000 9000 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["/usr/local/bin/hybridserve-entrypoint"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--grpc-port", "9000"]
