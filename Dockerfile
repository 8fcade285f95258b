# One image for every Python service: the orchestrator and the three participants.
# compose.yaml picks the process with `command:`; the default runs the orchestrator.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SAGA_DATA_DIR=/data

# An unprivileged user owns the data directory; nothing runs as root.
RUN groupadd --system --gid 10001 saga \
    && useradd --system --uid 10001 --gid saga --no-create-home --shell /usr/sbin/nologin saga \
    && mkdir -p /data \
    && chown saga:saga /data

WORKDIR /app

# Metadata first, then one COPY per package: `COPY a/ b/ dest/` would flatten the directories.
COPY pyproject.toml README.md ./
COPY messages/ ./messages/
COPY orchestrator/ ./orchestrator/
COPY workers/ ./workers/
COPY scripts/ ./scripts/

RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info

USER saga

CMD ["python", "-m", "orchestrator", "run"]
