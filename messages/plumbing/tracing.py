"""W3C trace context through AMQP headers, with the OpenTelemetry API.

Without an OpenTelemetry SDK configured nothing is recorded, but the `traceparent` header
still travels request -> commands -> replies, so every log line of a saga names one trace
id; install and configure an SDK and exporter, and the same calls produce real spans.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

_tracer = trace.get_tracer("rabbit-saga")
HEADER = "traceparent"


def new_traceparent() -> str:
    """A fresh trace for a request that arrives without one (sampled flag set)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


@contextmanager
def consuming(headers: Mapping[str, object] | None, name: str) -> Iterator[None]:
    """Handle a delivery inside a span that continues the sender's trace."""
    carrier = {k: v for k, v in (headers or {}).items() if isinstance(v, str)}
    parent = propagate.extract(carrier)
    with _tracer.start_as_current_span(name, context=parent, kind=SpanKind.CONSUMER):
        yield


def continuing(traceparent: str | None, name: str) -> AbstractContextManager[None]:
    """Work on a saga outside any delivery (a deadline, a confirm) inside the saga's trace."""
    return consuming({HEADER: traceparent} if traceparent else None, name)


def outgoing() -> dict[str, str]:
    """Headers that carry the current trace to the next service."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def current_trace_id() -> str | None:
    """The trace id of the current span, for log lines; None outside any trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
