"""A vhost of one's own on a shared broker, made and removed through the management API."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, urlsplit, urlunsplit

from messages.plumbing.management import ManagementApi


def vhost_url(url: str, vhost: str) -> str:
    """``url`` pointing at ``vhost`` (query parameters such as heartbeat kept).

    Of a list of node URLs (comma-separated, a SAGA_AMQP_URL), each one.
    """
    path = "/" + quote(vhost, safe="")
    nodes = (urlsplit(node.strip()) for node in url.split(","))
    return ",".join(urlunsplit((p.scheme, p.netloc, path, p.query, "")) for p in nodes)


def management_for(url: str, management_url: str | None = None) -> ManagementApi:
    """The management API of the broker at ``url``, with its credentials."""
    return ManagementApi.for_amqp_url(url, management_url)


def new_vhost_name(prefix: str) -> str:
    """A vhost name nobody else uses: ``prefix`` and a random suffix."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextmanager
def private_vhost(api: ManagementApi, url: str, prefix: str) -> Iterator[str]:
    """A fresh vhost for the duration of the block; yields its AMQP URL."""
    name = new_vhost_name(prefix)
    api.create_vhost(name)
    try:
        yield vhost_url(url, name)
    finally:
        api.delete_vhost(name)
