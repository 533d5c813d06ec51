# syntax=docker/dockerfile:1
# One Dockerfile for every Hilum process; the command picks one. torch (the `ai` extra) only
# where models run, in the build the machine needs:
#
#   docker build -t hilum --build-arg TORCH_INDEX_URL= .      # dimse, web, db upgrade: no torch
#   docker build -t hilum-worker .                            # CPU build of torch (the default)
#   docker build -t hilum-gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # the GPU worker
#
# PyTorch's own wheel indexes hold one build each (CPU, or one CUDA version): the index chosen
# here decides which torch the image gets. torch is installed first and alone, so that the `ai`
# extra's looser `torch>=2.13` is already met and pip never pulls another build behind our back.
ARG PYTHON_VERSION=3.11
# The OHIF viewer served at /viewer: its pinned package fetched with npm in a stage of its own
# (no Node.js in the image); `hilum viewer install` below checks it against the SHA-512 pinned
# in web/ohif.py and unpacks it. Keep OHIF_VERSION equal to web/ohif.py's (the build fails
# otherwise).
ARG OHIF_VERSION=3.12.10

FROM node:22-bookworm-slim AS ohif
ARG OHIF_VERSION
RUN mkdir /ohif && cd /ohif && npm pack "@ohif/app@${OHIF_VERSION}"

FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi

# The source tree less what .dockerignore leaves out (tests, benchmarks, .env, local data).
COPY . /src
RUN if [ -n "${TORCH_INDEX_URL}" ]; then pip install "/src[ai]"; else pip install /src; fi \
    && rm -rf /src

ARG OHIF_VERSION
COPY --from=ohif /ohif/ /tmp/ohif/
RUN hilum viewer install --dir /opt/hilum/ohif --tarball "/tmp/ohif/ohif-app-${OHIF_VERSION}.tgz" \
    && rm -rf /tmp/ohif
ENV HILUM_WEB__OHIF_DIR=/opt/hilum/ohif

# Hilum never runs as root. /var/lib/hilum is its data_dir: temporary files of incoming data
# sets (and, for `hilum serve` alone, the embedded SQLite index and blobs). A named volume
# mounted there starts with this ownership.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/hilum --create-home hilum
USER hilum
WORKDIR /var/lib/hilum
ENV HILUM_SERVER__DATA_DIR=/var/lib/hilum

# DIMSE, HTTP (DICOMweb, UI, /metrics), the [metrics] port of `hilum dimse` / `hilum worker`.
EXPOSE 11112 8042 9100
ENTRYPOINT ["hilum"]
CMD ["serve"]
