"""docker-compose.yml (not run here: no Docker engine) checked for what its services need to keep their data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

# Where the apache/kafka image keeps the log (topics, consumer offsets, the KRaft metadata) unless KAFKA_LOG_DIRS
# says otherwise: its configureDefaults fills every unset KAFKA_* variable, this one with a directory of the
# container's own file system, although the image declares /var/lib/kafka/data as its volume.
APACHE_KAFKA_IMAGE_LOG_DIRS = "/tmp/kraft-combined-logs"  # noqa: S108  (the image's path, not ours)


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def mounted(service: dict[str, Any]) -> list[str]:
    return [str(volume).split(":")[1] for volume in service.get("volumes", [])]


def test_kafka_keeps_its_log_on_its_volume() -> None:
    """Accepted pushes the worker has not written yet exist only in the module topics: a log in the container's
    own file system is gone with the container (`docker compose down`, a new image), and with it those pushes,
    the state changelogs and the group's offsets."""
    kafka = compose()["services"]["kafka"]
    log_dirs = str(kafka["environment"].get("KAFKA_LOG_DIRS", APACHE_KAFKA_IMAGE_LOG_DIRS))
    for log_dir in log_dirs.split(","):
        assert any(log_dir == target or log_dir.startswith(target.rstrip("/") + "/") for target in mounted(kafka)), (
            f"Kafka writes its log to {log_dir}, on no volume of the service ({mounted(kafka)})")


def test_no_secret_falls_back_to_a_well_known_value() -> None:
    """`docker compose up` without CLICKHOUSE_PASSWORD started ClickHouse (published on every host interface)
    with the password `change-me`, which anybody can read here: the billing data, readable and writable."""
    text = (ROOT / "docker-compose.yml").read_text()
    defaults = re.findall(r"\$\{(\w*(?:PASSWORD|TOKEN|SECRET|KEY)\w*):?-([^}]*)\}", text)
    assert [(name, value) for name, value in defaults if value] == []


@pytest.mark.parametrize("service", ["clickhouse", "grafana"])
def test_the_operators_services_are_published_on_the_loopback_interface_only(service: str) -> None:
    """The store and the dashboards are the operator's (Grafana and the receivers reach ClickHouse on the compose
    network). Grafana was published on every interface with its default admin
    login, and its data source reads the billing store."""
    ports = [str(port) for port in compose()["services"][service].get("ports", [])]
    assert ports and all(port.startswith("127.0.0.1:") for port in ports), ports


def test_grafana_has_no_default_admin_password() -> None:
    grafana = compose()["services"]["grafana"]["environment"]
    assert grafana.get("GF_SECURITY_ADMIN_PASSWORD", "").startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_long_running_services_are_restarted() -> None:
    """The worker exits by design and counts on its supervisor to start it again: code 75 when it is stopped or
    fenced with a batch unwritten (a ClickHouse outage longer than Faust's poll interval), 70 when a batch fails;
    Faust also stops it on a partition still locked after 30 s. Under compose the supervisor is Docker's restart
    policy, and no service had one: the first such exit left the pipeline down (pushes piling up in Kafka, the
    dashboards frozen), and after a reboot of the host nothing came back. One-shot services (`migrate`, which
    the others wait for to complete) must not be restarted."""
    services = compose()["services"]
    one_shot = {name for service in services.values() for name, dep in service.get("depends_on", {}).items()
                if dep.get("condition") == "service_completed_successfully"}
    assert one_shot == {"migrate"}
    for name, service in services.items():
        if name in one_shot:
            assert service.get("restart", "no") == "no", name
        else:
            assert service.get("restart") in ("always", "unless-stopped"), f"{name} is never restarted"


# The characters a URL's userinfo carries as they are (RFC 3986 "unreserved"): any other one is percent-decoded by
# clickhouse-connect (`%41` is `A`) or ends the userinfo for urlparse ('/', '?', '#').
URL_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"


def test_the_clickhouse_password_reaches_clickhouse_as_the_server_has_it() -> None:
    """One CLICKHOUSE_PASSWORD is ClickHouse's own (and Grafana's) as it is, and goes unencoded into
    OCPI_CLICKHOUSE_DSN, whose password is percent-decoded when we connect: a password with '%' signed the
    pipeline in with another one (authentication failed), one with '/', '?' or '#' (half of `openssl rand
    -base64` passwords have a '/') was no DSN, and `migrate` stopped at start. The file says which passwords
    work, and those pass through the DSN unchanged."""
    from clickhouse_connect.driver import _parse_connection_params

    from infra.settings import load_settings

    text = (ROOT / "docker-compose.yml").read_text()
    header = text.split("\nname:")[0]
    assert "CLICKHOUSE_PASSWORD" in header and "letters, digits, - . _ ~" in header, header
    template = compose()["x-app-env"]["OCPI_CLICKHOUSE_DSN"]
    dsn = template.replace("${CLICKHOUSE_PASSWORD:?set CLICKHOUSE_PASSWORD}", URL_SAFE)
    assert "$" not in dsn
    settings = load_settings({"OCPI_CLICKHOUSE_DSN": dsn})
    _host, user, password, _port, _db, _interface = _parse_connection_params(
        None, None, "", None, None, None, False, settings.clickhouse.dsn, {})
    assert (user, password) == ("ocpi", URL_SAFE)
    assert compose()["services"]["clickhouse"]["environment"]["CLICKHOUSE_USER"] == "ocpi"


def test_every_ocpi_variable_a_service_is_given_is_a_setting() -> None:
    """A variable the settings module does not read (a renamed setting, a typo) is ignored without a word: the
    service would run on that setting's default, an embedded broker or store instead of the cluster's."""
    from infra.settings import documented_settings, load_settings

    known = {var for _s, var, _d, _m in documented_settings()} | {"OCPI_TANSU_LOG"}
    given: dict[str, str] = {}
    for service in compose()["services"].values():
        given |= {k: str(v) for k, v in (service.get("environment") or {}).items() if k.startswith("OCPI_")}
    assert given and not set(given) - known, sorted(set(given) - known)
    # And every value, a default filled in where it has one (a required password: any safe one), is taken.
    def filled(value: str) -> str:
        return re.sub(r"\$\{\w+(:?[-?])([^}]*)\}", lambda m: m.group(2) if m.group(1).endswith("-") else "pw", value)

    load_settings({k: filled(v) for k, v in given.items()})


def test_clickhouse_is_healthy_only_when_its_clients_can_reach_it() -> None:
    """With CLICKHOUSE_DB set, the clickhouse-server image's entrypoint first runs a server that listens on
    127.0.0.1 only (`--listen_host=127.0.0.1`) to create the database, stops it, then starts the real one. A
    health check probing localhost passed on that interim server: `migrate`, started on the first healthy check,
    found nothing listening at clickhouse:8123 (connection refused, no retry), exited 1, and with it `docker
    compose up` (the receivers and the worker wait for it to complete). The check must go where the clients go:
    the host of OCPI_CLICKHOUSE_DSN, on the compose network."""
    from urllib.parse import urlparse

    services = compose()["services"]
    test = services["clickhouse"]["healthcheck"]["test"]
    command = test[-1] if isinstance(test, list) else str(test)
    urls = re.findall(r"https?://[^\s'\"|;]+", command)
    dsn = urlparse(compose()["x-app-env"]["OCPI_CLICKHOUSE_DSN"].replace("${CLICKHOUSE_PASSWORD:?set "
                                                                         "CLICKHOUSE_PASSWORD}", "pw"))
    assert urls, command
    for url in urls:
        probed = urlparse(url)
        assert (probed.hostname, probed.port) == (dsn.hostname, dsn.port), (
            f"the health check probes {url}; the pipeline connects to {dsn.hostname}:{dsn.port}")
    assert services["migrate"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"


# What `docker compose stop` (down, restart, an `up` that re-creates the container: every upgrade) waits after its
# SIGTERM before it sends SIGKILL, unless the service's stop_grace_period says otherwise.
DOCKER_STOP_GRACE_S = 10.0


def seconds(duration: str) -> float:
    """A compose duration (`45s`, `1m30s`, `2m`) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), duration
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * unit[u] for n, u in parts)


def test_a_stopping_worker_is_given_the_time_to_finish_its_batch() -> None:
    """A stopping worker finishes the batch in hand for up to `agents.STOP_GRACE_S` (30 s), then exits with
    code 70 leaving it unacked (README, "The pipeline"): its rows, its state's changelog records and its results
    go out together or the batch is read again. Docker's stop sent SIGKILL 10 s after SIGTERM, in the middle of
    that: the worker was killed mid-batch at every `docker compose stop`, restart or upgrade, not stopped."""
    from pipeline.agents import STOP_GRACE_S

    worker = compose()["services"]["worker"]
    grace = seconds(worker["stop_grace_period"]) if "stop_grace_period" in worker else DOCKER_STOP_GRACE_S
    assert grace >= STOP_GRACE_S + 15, f"the worker is killed {grace:.0f} s after SIGTERM"


def test_an_upgrade_replaces_the_worker_before_the_receivers() -> None:
    """Upgrading is migrate, then every worker, then the receivers (README, "Upgrading"): a worker reads the
    Avro revisions up to its own, and a push written with a newer one is a dead letter although the partner was
    answered 1000. `docker compose up --build` re-creates services in the order of their dependencies, and the
    receivers depended on the worker in no way: both were replaced at once, new receivers writing to an old
    worker. Depending on it (started), they are re-created after it, and stopped before it (their last pushes
    are then read by a running worker)."""
    services = compose()["services"]
    assert services["receivers"]["depends_on"].get("worker", {}).get("condition") == "service_started"
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_partners_reach_the_receivers_over_tls_only() -> None:
    """OCPI's transport is TLS with a server certificate (OCPI 2.2.1 04 §1): the Authorization header carries the
    partner's token, and the credentials exchange hands over the tokens both sides call with. The receivers speak
    plain HTTP, and were published on every host interface (18080): a partner calling them there sent its token
    in clear, and read ours in the credentials answer. They are published on the loopback interface, for the TLS
    proxy in front of them, whose https:// URL is OCPI_PUBLIC_URL; the file and README say so."""
    ports = [str(port) for port in compose()["services"]["receivers"].get("ports", [])]
    assert ports and all(port.startswith("127.0.0.1:") for port in ports), ports
    header = (ROOT / "docker-compose.yml").read_text().split("\nname:")[0]
    assert "TLS" in header and "OCPI_PUBLIC_URL" in header, header
    operations = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    assert "the receivers speak plain HTTP" in operations


def test_every_service_takes_the_pseudonymisation_key_from_the_environment() -> None:
    """README: run the jobs in the worker's container, "or set `OCPI_PSEUDONYM_KEY` for every service"; the shared
    environment did not pass it on, so setting it in the shell or `.env` did nothing. Empty (unset) keeps the key
    generated into the worker's volume."""
    shared = compose()["x-app-env"]
    assert shared.get("OCPI_PSEUDONYM_KEY") == "${OCPI_PSEUDONYM_KEY:-}"
    for name in ("migrate", "worker", "receivers"):
        service = compose()["services"][name]
        assert service["environment"].get("OCPI_PSEUDONYM_KEY") == "${OCPI_PSEUDONYM_KEY:-}", name


def test_the_worker_s_committed_offsets_outlive_the_raw_retention() -> None:
    """Kafka drops a group's committed offsets once it has had no member for `offsets.retention.minutes` (7 days by
    default). A worker stopped longer then read every topic again from its log start (the whole raw retention's
    records), and records deleted unread meanwhile went without the error that names them, nor counted as `lost`
    by `report consumer-lag` (README, Retention: raise it above the raw retention). The stack's broker kept the
    default, 7 days, under the 30 days of OCPI_RETENTION_RAW_DAYS its services run with."""
    from infra.settings import load_settings

    services = compose()["services"]
    raw_days = load_settings({k: v for k, v in compose()["x-app-env"].items()
                              if k.startswith("OCPI_RETENTION")}).retention.raw_days
    minutes = int(services["kafka"]["environment"].get("KAFKA_OFFSETS_RETENTION_MINUTES", 7 * 24 * 60))
    assert minutes > raw_days * 24 * 60, f"offsets kept {minutes / 1440:g} days, raw records {raw_days}"
