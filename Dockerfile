# The production image: the service only (no load tests, no tests, no build tools).
# Stage 1 installs the project into a virtualenv; stage 2 copies that virtualenv alone.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY flashsale ./flashsale
COPY gateway ./gateway
COPY stack ./stack
COPY consumers ./consumers
COPY lua ./lua
RUN python -m venv /opt/flashsale \
 && /opt/flashsale/bin/pip install --no-cache-dir --disable-pip-version-check -c constraints.txt .

FROM python:3.11-slim
COPY --from=build /opt/flashsale /opt/flashsale
# The services run as an unprivileged user that owns its data folder (the gateway's
# metrics directory, the consumer's heartbeat). Compose mounts a volume there, which
# Docker initialises from this folder, ownership included.
RUN useradd --system --uid 10001 --home-dir /var/lib/flashsale --shell /usr/sbin/nologin flashsale \
 && mkdir -p /var/lib/flashsale \
 && chown flashsale:flashsale /var/lib/flashsale
ENV PATH=/opt/flashsale/bin:$PATH \
    FLASHSALE_DATA_DIR=/var/lib/flashsale
VOLUME ["/var/lib/flashsale"]
USER flashsale
EXPOSE 8080
# The gateway's liveness (compose gives the consumers a check of their own: the heartbeat).
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=6 \
  CMD ["python", "-c", "import os, sys, urllib.request as u; port = os.environ.get('FLASHSALE_HTTP_PORT', '8080'); sys.exit(0 if u.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=3).status == 200 else 1)"]
CMD ["flashsale", "serve"]
