"""infra.kafka.bootstrap.reachable: the quick TCP check `serve` and `retention` make before talking to Kafka."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from infra.kafka.bootstrap import reachable
from infra.settings import load_settings


@pytest.fixture
def ipv6_listener() -> Iterator[int]:
    try:
        server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        server.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    server.listen()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_a_bracketed_ipv6_bootstrap_that_answers_is_reachable(ipv6_listener: int) -> None:
    """`[::1]:9092` is a valid OCPI_KAFKA_BOOTSTRAP (the Kafka clients take it): taken for a Kafka that does not
    answer, `serve` skipped creating the receivers' topics (the broker then creates them on the first push with its
    own defaults) and `retention apply` refused."""
    bootstrap = f"[::1]:{ipv6_listener}"
    assert load_settings({"OCPI_KAFKA_BOOTSTRAP": bootstrap}).kafka.bootstrap == bootstrap
    assert reachable(bootstrap)
    assert reachable(f"127.0.0.1:1,{bootstrap}")


def test_a_closed_port_is_not_reachable(ipv6_listener: int) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    assert not reachable(f"127.0.0.1:{port}")
    assert not reachable("not-a-host-port")
