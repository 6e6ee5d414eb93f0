# syntax=docker/dockerfile:1
# One image for the gateway (`loraserve gateway`) and the Ray head and workers (KubeRay starts
# `ray start` in it and Serve imports serving.application from it), with the gRPC stubs built in.
#
#   docker build --build-arg VARIANT=cuda -t loraserve:0.1.0-cuda .   # GPU nodes
#   docker build --build-arg VARIANT=cpu  -t loraserve:0.1.0-cpu .    # CPU-only clusters, dev
#
# The chart's image.variant picks the tag suffix. The cuda variant carries CUDA's libraries in
# PyTorch's wheels; the node needs only the NVIDIA driver (the GPU operator's container toolkit).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cuda
ARG TORCH_VERSION=2.13.0
# Where the cpu variant's PyTorch comes from: PyTorch's CPU-only wheel index (no CUDA libraries).
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/loraserve
ENV PATH=/opt/loraserve/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN case "${VARIANT}" in \
      cpu) pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX_URL}" ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *) echo "VARIANT must be cpu or cuda, not ${VARIANT}" >&2; exit 1 ;; \
    esac
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY clients/python ./clients/python
COPY core ./core
COPY entrypoints ./entrypoints
COPY gateway ./gateway
COPY serving ./serving
COPY storage ./storage
# The client's build generates loraserve/v1 from proto/ (clients/python/setup.py); fail here if the stubs are not in,
# or if the client's `loraserve` does not find the server's commands (entry points of the server distribution).
RUN pip install ./clients/python . \
    && python -c "import loraserve.v1.worker_pb2_grpc, serving.application, gateway.server, entrypoints.cli" \
    && loraserve gateway --help >/dev/null \
    && command -v ray

FROM ${PYTHON_IMAGE}
ARG VARIANT=cuda
LABEL org.opencontainers.image.title="loraserve" \
      org.opencontainers.image.description="loraserve gateway and Ray Serve workers (${VARIANT})"
# wget: KubeRay's probes on the Ray pods call the Ray health endpoints with it. Not pinned: the
# Debian release is pinned by the base image and its security updates should come in.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/ray ray \
    && mkdir -p /data \
    && chown ray:ray /data
COPY --from=build /opt/loraserve /opt/loraserve
ENV PATH=/opt/loraserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    LORASERVE_DATA_DIR=/data
USER 1000:1000
WORKDIR /home/ray
# gateway gRPC and HTTP; Ray GCS, dashboard, client; Serve HTTP and gRPC proxies; metrics
EXPOSE 50051 8080 6379 8265 10001 8000 9000 9500
CMD ["loraserve", "gateway"]
