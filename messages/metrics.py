"""Prometheus metrics every service shares, and the endpoint that serves them."""

from __future__ import annotations

import logging

from prometheus_client import Counter, start_http_server

log = logging.getLogger(__name__)

DEAD_LETTERED = Counter(
    "saga_dead_lettered",
    "Messages moved to a dead-letter queue, by the queue they came from and why",
    ["queue", "reason"],
)


def serve(port: int) -> None:
    """Expose /metrics on ``port`` (0: do nothing)."""
    if port:
        start_http_server(port)
        log.info("metrics on http://0.0.0.0:%d/metrics", port)
