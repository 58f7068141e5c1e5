# syntax=docker/dockerfile:1
# The connection sidecar image: a venv with the sidecar and its dependencies, on a slim
# Python base, running as uid 10001. No HEALTHCHECK: Kubernetes probes the status port
# (/healthz, /readyz on 15020), and a Docker healthcheck would only duplicate that.
ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: build the wheel and install it, with its dependencies, into /opt/sidecar ---
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# A C compiler for mypyc (setup.py compiles the request path) and libnghttp2's headers for
# the compiled HTTP/2 binding (sidecar/http/_nghttp2_api); this stage only. Unpinned:
# it builds one wheel against the base image's own Python and libc, and is discarded.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libnghttp2-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/sidecar
COPY pyproject.toml setup.py README.md ./
COPY sidecar ./sidecar
# The dependencies' versions come from pyproject.toml; every one ships manylinux wheels.
# The sidecar's own wheel is compiled, and the check refuses an image that fell back to pure
# Python (`-I`: the installed package, not the sources in the working directory). Bytecode
# is compiled here, once, because the runtime root filesystem is read-only.
RUN /opt/sidecar/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/sidecar/bin/pip install --no-cache-dir /wheels/*.whl \
    && /opt/sidecar/bin/python -m compileall -q /opt/sidecar \
    && /opt/sidecar/bin/sidecar --help > /dev/null \
    && /opt/sidecar/bin/python -I -c "from sidecar._build import compiled; assert compiled()" \
    && /opt/sidecar/bin/python -I -c "from sidecar.http import _nghttp2; assert _nghttp2.MODE == 'api'"
# libnghttp2 itself (the HTTP/2 engine's C library) travels inside the venv, so the runtime
# stage needs no package manager; LD_LIBRARY_PATH below points the loader at it.
RUN mkdir -p /opt/sidecar/lib \
    && cp -L /usr/lib/*-linux-gnu/libnghttp2.so.14 /opt/sidecar/lib/

# --- runtime: the venv only; no pip cache, no sources, no build tools ---
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="connection-sidecar" \
      org.opencontainers.image.description="A per-pod Kubernetes egress proxy: pooled, health-checked, TLS-resuming, drain-safe." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/connection-sidecar" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin sidecar
COPY --from=builder /opt/sidecar /opt/sidecar
ENV PATH=/opt/sidecar/bin:$PATH \
    LD_LIBRARY_PATH=/opt/sidecar/lib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A numeric user, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
WORKDIR /tmp
# 15001 egress (loopback), 15000 admin (loopback), 15020 status (/healthz, /readyz, /metrics).
EXPOSE 15001 15000 15020
ENTRYPOINT ["sidecar"]
CMD ["run"]
