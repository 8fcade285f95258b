"""amqps:// with a CA file: the services and clients verify the broker's certificate.

The machine's RabbitMQ listens without TLS, so a small TLS-terminating proxy in front of it
plays the broker's TLS listener: our clients do the real handshake and verification.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.integration.stack import Stack
from tests.integration.test_saga_flows import ORDER

pytestmark = pytest.mark.broker


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
    cert, key = directory / "broker.pem", directory / "broker.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def tls_proxy(amqp_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(amqps URL of the test's vhost through the proxy, CA file that verifies it)."""
    assert shutil.which("openssl"), "openssl is needed to make a test certificate"
    cert, key = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    upstream = urlsplit(amqp_url)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
                tls = context.wrap_socket(client, server_side=True)
            except OSError:
                return
            broker = socket.create_connection((upstream.hostname, upstream.port or 5672))
            for a, b in ((tls, broker), (broker, tls)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    netloc = f"{upstream.username}:{upstream.password}@127.0.0.1:{port}"
    try:
        yield urlunsplit(("amqps", netloc, upstream.path, "", "")), cert
    finally:
        listener.close()


def test_services_and_clients_speak_amqps_with_a_ca_file(
    stack: Stack, tls_proxy: tuple[str, Path]
) -> None:
    url, ca_file = tls_proxy
    stack.env.update(SAGA_AMQP_URL=url, SAGA_CA_FILE=str(ca_file))
    stack.worker("all", "--stock", "item-1=10")
    stack.orchestrator()

    code, result = stack.place_order(*ORDER, "--amount", "25.00")

    assert code == 0, result
    assert result["status"] == "COMPLETED"


def test_a_broker_the_ca_does_not_vouch_for_is_refused(
    stack: Stack, tls_proxy: tuple[str, Path]
) -> None:
    url, _ = tls_proxy
    code, result = stack.place_order(*ORDER, "--amount", "25.00", "--url", url, timeout=5)
    assert code == 2
    assert "cannot reach RabbitMQ" in result["stderr"]
    assert "CERTIFICATE_VERIFY_FAILED" in result["stderr"]
