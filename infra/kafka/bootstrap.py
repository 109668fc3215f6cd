"""Which Kafka a process talks to: the configured cluster, or the embedded broker of a running `dev`."""

from __future__ import annotations

import socket

from infra.runfile import read_running_instance
from infra.settings import Settings


class KafkaNotConfigured(RuntimeError):
    """No bootstrap configured and no running instance to borrow one from."""


def resolve_bootstrap(settings: Settings) -> str:
    if settings.kafka.bootstrap:
        return settings.kafka.bootstrap
    instance = read_running_instance(settings.storage.path)
    if instance is not None:
        if not instance.kafka_embedded and settings.kafka.flavor == "auto":
            # Without a bootstrap setting, `settings.kafka.is_tansu` says "embedded Tansu": borrowing another
            # Kafka's address would apply the Tansu workarounds (infra.kafka.compat) to it.
            raise KafkaNotConfigured(f"the running `ocpi-pipeline dev` instance uses the Kafka at "
                                     f"{instance.kafka_bootstrap}, not an embedded broker: set "
                                     f"OCPI_KAFKA_BOOTSTRAP={instance.kafka_bootstrap}")
        return instance.kafka_bootstrap
    raise KafkaNotConfigured("OCPI_KAFKA_BOOTSTRAP is empty and no `ocpi-pipeline dev` instance is running; "
                             "set it, or use `ocpi-pipeline dev`, which starts an embedded broker")


def reachable(bootstrap: str, timeout: float = 2.0) -> bool:
    """Whether one of the bootstrap servers accepts a TCP connection: a quick check, so that a command learns
    that Kafka is down at once, not after the Kafka client's bootstrap timeout (about 30 s)."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        if host.startswith("[") and host.endswith("]"):  # an IPv6 address, `[::1]:9092`, as the Kafka clients take it
            host = host[1:-1]
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):  # refused, unresolvable, or not host:port
            continue
    return False
