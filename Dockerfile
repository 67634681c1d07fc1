# The llmrelay image: every `llmrelay` command (worker, monitor, mock-provider,
# submit, ...). docker-compose.yml builds it for its workers:
#   docker build -t llmrelay .
#   docker run --rm -v "$PWD/llmrelay.example.yaml:/etc/llmrelay/llmrelay.yaml:ro" \
#     -e LLMRELAY_NATS_URL=nats://HOST:4222 llmrelay worker --pool mock-a \
#     --config /etc/llmrelay/llmrelay.yaml
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install from a copy of the sources, then drop it: the image runs the
# installed package only.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY workers ./workers
COPY gateway ./gateway
COPY devstack ./devstack
COPY cli ./cli
RUN pip install . && rm -rf /src

# `llmrelay up` and `llmrelay demo` look for ./nats.conf; the example config
# is there to try things out.
WORKDIR /app
COPY nats.conf llmrelay.example.yaml ./
RUN useradd --system --uid 10001 --home-dir /app llmrelay && chown llmrelay /app
USER llmrelay

ENTRYPOINT ["llmrelay"]
CMD ["--help"]
