FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY flashsale ./flashsale
COPY gateway ./gateway
COPY stack ./stack
COPY consumers ./consumers
COPY lua ./lua
COPY loadtests ./loadtests
# The services run as an unprivileged user that owns its data folder (the gateway's
# metrics directory, the consumer's heartbeat). Compose mounts a named volume there,
# which Docker initialises from this folder, ownership included.
RUN pip install --no-cache-dir -c constraints.txt . \
 && useradd --system --uid 10001 --home-dir /var/lib/flashsale --shell /usr/sbin/nologin flashsale \
 && mkdir -p /var/lib/flashsale \
 && chown flashsale:flashsale /var/lib/flashsale
ENV FLASHSALE_DATA_DIR=/var/lib/flashsale
VOLUME ["/var/lib/flashsale"]
USER flashsale
