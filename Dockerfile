FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY flashsale ./flashsale
COPY gateway ./gateway
COPY consumers ./consumers
COPY lua ./lua
COPY loadtests ./loadtests
RUN pip install --no-cache-dir -c constraints.txt . && mkdir -p /var/lib/flashsale
USER nobody
