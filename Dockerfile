# syntax=docker/dockerfile:1
# One image for every Hilum process (serve, dimse, web, worker, db upgrade); the command picks one.
#
#   docker build -t hilum .                                   # CPU build of torch (the default)
#   docker build -t hilum-gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # the GPU worker
#
# PyTorch's own wheel indexes hold one build each (CPU, or one CUDA version): the index chosen
# here decides which torch the image gets. torch is installed first and alone, so that Hilum's
# looser `torch>=2.13` is already met and pip never pulls another build behind our back.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The source tree less what .dockerignore leaves out (tests, benchmarks, .env, local data).
COPY . /src
RUN pip install /src && rm -rf /src

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
