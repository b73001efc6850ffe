# tidegate edge gateway, minimal image. Not built in this repository's CI: the development
# machine has no Docker engine (docs/deployment.md "Docker"). Build and run:
#   docker build -t tidegate .
#   docker run -d --name tidegate \
#     -v /etc/tidegate:/etc/tidegate:ro -v tidegate-data:/var/lib/tidegate \
#     -p 1883:1883 -p 8883:8883 --stop-timeout 45 --ulimit nofile=65536:65536 tidegate
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TIDEGATE_DATA_DIR=/var/lib/tidegate \
    TIDEGATE_ADMIN_PORT=8181

# A system user without a login shell, with a fixed id (volumes and host files can be
# chowned to 10001 before the first start); the data volume belongs to it.
RUN groupadd --system --gid 10001 tidegate \
    && useradd --system --uid 10001 --gid tidegate --home-dir /var/lib/tidegate --shell /usr/sbin/nologin tidegate \
    && install -d -o tidegate -g tidegate -m 0750 /var/lib/tidegate \
    && install -d -m 0755 /etc/tidegate

# Same layout as the systemd install: a venv in /opt/tidegate/.venv.
RUN python -m venv /opt/tidegate/.venv
ENV PATH=/opt/tidegate/.venv/bin:$PATH

WORKDIR /opt/tidegate/src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY edge ./edge
COPY bridge ./bridge
COPY device_sim ./device_sim
RUN pip install .

USER 10001:10001
# MQTT (TCP, TLS) and the admin API. The admin API binds 127.0.0.1 by default, which inside
# a container is the container itself: publish 8181 only after setting [admin] host.
EXPOSE 1883 8883 8181
# The buffer: keep it on a volume, or a new container starts with an empty buffer and the
# messages of the old one are lost.
VOLUME ["/var/lib/tidegate"]
# The gateway flushes and exits within gateway.shutdown_deadline_s on SIGTERM; give
# `docker stop` more than that (--stop-timeout 45).
STOPSIGNAL SIGTERM
# Alive = the admin API answers /healthz (from inside the container: loopback works).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TIDEGATE_ADMIN_PORT', '8181'), timeout=4)"]

ENTRYPOINT ["tidegate"]
CMD ["run", "-c", "/etc/tidegate/gateway.toml"]
