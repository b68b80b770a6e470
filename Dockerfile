# llm-sidecar: a small, non-root image. Dependencies are pinned in constraints.txt.
# Python 3.13: aiohttp runs request handlers as eager tasks there (3.12+), which halved
# p99 at 32 concurrent calls in benchmarks/latency.py (12.7 ms on 3.11, 5.6 ms on 3.13).
FROM python:3.13-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY sidecar ./sidecar
RUN python -m venv /opt/llm-sidecar \
 && PIP_CONSTRAINT=/src/constraints.txt /opt/llm-sidecar/bin/pip install --no-cache-dir . \
 && find /opt/llm-sidecar -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.13-slim-bookworm
ENV PATH=/opt/llm-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/llm-sidecar /opt/llm-sidecar
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sidecar
USER 10001
EXPOSE 7878 7879
# No HEALTHCHECK: the same image runs `serve`, `scaler`, `wait` and `fake-llm`, and only
# `serve` has an admin listener to probe. Nomad checks each task with its own `check`.
ENTRYPOINT ["llm-sidecar"]
CMD ["serve"]
