# notifier: slim, non-root, migrates then serves. Build: docker build -t notifier .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY notifier ./notifier
# pyproject ships the top-level migrations/ folder as notifier.migrations, which `notifier migrate` runs.
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --create-home --home-dir /app notifier \
 && mkdir -p /app/data && chown notifier:notifier /app/data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER notifier
WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    DATABASE_URL=sqlite+aiosqlite:////app/data/notifier.db
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
# Migrations first (idempotent), then the server; exec so signals reach uvicorn for a graceful drain.
# X-Forwarded-For is believed only from the proxies FORWARDED_ALLOW_IPS names (unset: 127.0.0.1, i.e. nobody
# outside the container). Behind a reverse proxy: docker run -e FORWARDED_ALLOW_IPS=<the proxy's address>.
CMD ["sh", "-c", "notifier migrate && exec notifier serve --host 0.0.0.0 --port 8000"]
