"""Prometheus metrics every service shares, and the endpoint that serves them."""

from __future__ import annotations

import errno
import logging

from prometheus_client import Counter, start_http_server

from messages.errors import ConfigurationError

log = logging.getLogger(__name__)

DEAD_LETTERED = Counter(
    "saga_dead_lettered",
    "Messages moved to a dead-letter queue, by the queue they came from and why",
    ["queue", "reason"],
)


def serve(port: int) -> None:
    """Expose /metrics on ``port`` (0: do nothing); ConfigurationError if it cannot be had."""
    if not port:
        return
    try:
        start_http_server(port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"metrics port {port} is in use (SAGA_METRICS_PORT): another process "
                "listens on it; pick a free port, or 0 to serve no metrics"
            ) from exc
        raise ConfigurationError(
            f"metrics port {port} cannot be opened (SAGA_METRICS_PORT): {exc.strerror or exc}"
        ) from exc
    log.info("metrics on http://0.0.0.0:%d/metrics", port)
