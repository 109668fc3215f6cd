from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.kafka.bootstrap import KafkaNotConfigured, resolve_bootstrap
from infra.runfile import RunningInstance, write_running_instance
from infra.settings import (
    APP_ID_MAX_LENGTH,
    BASE_URL_MAX_LENGTH,
    SettingsError,
    as_environ,
    documented_settings,
    load_settings,
    mask,
)
from pipeline.app import TABLES
from pipeline.retention import changelog_topic


def test_defaults_are_documented_and_embedded() -> None:
    settings = load_settings({"OCPI_DATA_DIR": "/srv/ocpi"})
    assert settings.kafka.embedded and settings.kafka.is_tansu
    assert settings.clickhouse_dsn == "chdb:///srv/ocpi/clickhouse"
    assert settings.kafka.topic_for("sessions") == "ocpi.sessions.v1"
    assert settings.http.base_url == "http://127.0.0.1:8080"
    variables = {row[1] for row in documented_settings()}
    assert set(as_environ(settings)) == variables


@pytest.mark.parametrize(("variable", "value"), [
    ("OCPI_HTTP_PORT", "eighty"),
    ("OCPI_HTTP_PORT", "70000"),
    ("OCPI_TOPIC_PARTITIONS", "0"),
    ("OCPI_KAFKA_BOOTSTRAP", "no-port"),
    ("OCPI_KAFKA_BOOTSTRAP", " , "),  # no server, yet not empty: neither the embedded broker nor a cluster
    ("OCPI_KAFKA_BOOTSTRAP", "kafka:0"),
    ("OCPI_KAFKA_BOOTSTRAP", "kafka:99999"),
    ("OCPI_CLICKHOUSE_DSN", "postgres://x"),
    # Read as a host and a path: the store opened at /clickhouse, or in the working directory.
    ("OCPI_CLICKHOUSE_DSN", "chdb://data/clickhouse"),
    ("OCPI_CLICKHOUSE_DSN", "chdb://"),
    ("OCPI_CLICKHOUSE_DSN", "chdb:data"),
    # No host: clickhouse-connect connected to localhost.
    ("OCPI_CLICKHOUSE_DSN", "http:/ch:8123"),
    ("OCPI_CLICKHOUSE_DSN", "http://"),
    ("OCPI_CLICKHOUSE_DSN", "https://ocpi:pw@:8123"),
    ("OCPI_CLICKHOUSE_DSN", "http://ch:port"),
    ("OCPI_CLICKHOUSE_DSN", "http://ch:99999"),
    # `migrate` ended in a ClickHouse syntax error's traceback; the clients took "" for the default database.
    ("OCPI_CLICKHOUSE_DATABASE", ""),
    ("OCPI_CLICKHOUSE_DATABASE", "oc`pi"),
    ("OCPI_CLICKHOUSE_DATABASE", "ocpi prod"),
    ("OCPI_PUBLIC_URL", "ftp://example.com"),
    # Our endpoint URLs are OCPI_PUBLIC_URL + path, advertised to partners: https://:443/ocpi/..., a port that is
    # none, or the path appended to a query or fragment (https://x/?a=1/ocpi/emsp/...) reach no receiver.
    ("OCPI_PUBLIC_URL", "https://:443"),
    ("OCPI_PUBLIC_URL", "https://ocpi.example.com:99999"),
    ("OCPI_PUBLIC_URL", "https://ocpi.example.com:44x"),
    ("OCPI_PUBLIC_URL", "https://ocpi.example.com/?tenant=1"),
    ("OCPI_PUBLIC_URL", "https://ocpi.example.com#top"),
    # Sent in a CDR POST's Location header, which holds ASCII only: every CDR was stored, then answered 500/3000
    # (the header could not be encoded), resent for ever; a space or a character beyond ASCII is no URL either.
    ("OCPI_PUBLIC_URL", "https://ocpi.example.com/Ω"),
    ("OCPI_PUBLIC_URL", "https://ocpi.bücher.example"),
    ("OCPI_PUBLIC_URL", "https://ocpi.example.com/my prefix"),
    ("OCPI_PARTY_WEBSITE", "https://:443"),
    # Not a host: every endpoint URL we advertise was http://:8080/... or http://http://...
    ("OCPI_HTTP_HOST", ""),
    ("OCPI_DATA_DIR", ""),  # the working directory
    ("OCPI_DATA_DIR", " "),
    ("OCPI_HTTP_HOST", "http://0.0.0.0"),
    ("OCPI_HTTP_HOST", "0.0.0.0 "),
    ("OCPI_TOPIC_SESSIONS", "bad topic!"),
    # Kafka refuses these names; as the app id, ".." made the Faust state dir OCPI_DATA_DIR/faust/.. (the data dir).
    ("OCPI_TOPIC_CDRS", "."),
    ("OCPI_TOPIC_CDRS", ".."),
    ("OCPI_PIPELINE_APP_ID", ".."),
    ("OCPI_PIPELINE_APP_ID", "."),
    ("OCPI_PIPELINE_APP_ID", "a" * 225),  # its changelogs' names would pass Kafka's 249 characters
    ("OCPI_TOPIC_SESSIONS", "séances"),  # str.isalnum() takes any script's letters; Kafka only ASCII
    ("OCPI_KAFKA_FLAVOR", "redpanda"),
    ("OCPI_KAFKA_SEND_TIMEOUT", "-1"),
    ("OCPI_KAFKA_SEND_TIMEOUT", "inf"),  # a wait that never ends
    # The producers' request timeout in whole ms: a 32-bit integer on the wire (aiokafka's sender died on every send,
    # each push answered 3000), and 0 below a millisecond (every request timed out at once).
    ("OCPI_KAFKA_SEND_TIMEOUT", "3000000"),
    ("OCPI_KAFKA_SEND_TIMEOUT", "0.0004"),
    ("OCPI_PIPELINE_PARK_TTL", "nan"),  # passes any comparison
    ("OCPI_PIPELINE_SWEEP_INTERVAL", "nan"),
    # A deadline this far out overflows datetime when the first event is parked or a token replaced.
    ("OCPI_PIPELINE_PARK_TTL", "1e12"),
    ("OCPI_TOKEN_GRACE", "1e12"),
    ("OCPI_RECONCILE_TIME_TOLERANCE", "1e12"),
    # Each session is indexed under every hour within it: a year took 40 ms and 17,500 state keys per session.
    ("OCPI_RECONCILE_TIME_TOLERANCE", "86401"),
    ("OCPI_RETENTION_RAW_DAYS", "0"),
    ("OCPI_RETENTION_HISTORY_DAYS", "36501"),
    ("OCPI_RETENTION_PSEUDONYMISE_DAYS", "1e9"),
    ("OCPI_RETENTION_BILLING_YEARS", "101"),
    ("OCPI_TOKEN_PARTIES", "NL-EMS"),  # CC/PID, as the CLI's --party
    ("OCPI_TOKEN_PARTIES", "NL/EMS,NLD/EMS"),
    ("OCPI_TOKEN_PARTIES", "NL/EMS,"),
    # Letters whose Unicode upper case is ASCII ("\ufb00" is FF, dotless i is I): another party than the one written
    ("OCPI_TOKEN_PARTIES", "NL/E\ufb00"),
    ("OCPI_TOKEN_PARTIES", "nl/em\u0131"),
    # str.isdigit() takes a superscript (int() then failed: a ValueError traceback) and other scripts' digits (kept
    # as written for the Kafka clients).
    ("OCPI_KAFKA_BOOTSTRAP", "kafka:90\u00b2"),
    ("OCPI_KAFKA_BOOTSTRAP", "kafka:\u0669\u0660\u0669\u0662"),
])
def test_a_wrong_value_fails_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings({variable: value})


def test_valid_clickhouse_dsns_are_taken() -> None:
    for dsn in ("chdb:///srv/ocpi/clickhouse", "http://ocpi:pw@ch:8123", "https://ch.example.com", "http://[::1]:8123"):
        assert load_settings({"OCPI_CLICKHOUSE_DSN": dsn}).clickhouse_dsn == dsn


@pytest.mark.parametrize("dsn", [
    "http://ocpi:s3cr3t/x+y=@clickhouse:8123",  # a base64 password: '/' ends the host part
    "http://ocpi:s3cr3t#x@clickhouse:8123",
    "http://ocpi:s3cr3t?x@clickhouse:8123",
    "http://ocpi:s3cr3t@clickhouse:99999",
    "https://ocpi:s3cr3t@:8123",
    "ftp://ocpi:s3cr3t@clickhouse:21",
])
def test_a_wrong_clickhouse_dsn_fails_without_showing_its_password(dsn: str) -> None:
    """The DSN holds the store's password (`settings` shows it as ****): the message of a DSN refused at start,
    printed to the terminal and to `docker compose logs`, gave it in clear."""
    with pytest.raises(SettingsError, match="OCPI_CLICKHOUSE_DSN") as error:
        load_settings({"OCPI_CLICKHOUSE_DSN": dsn})
    assert "s3cr3t" not in str(error.value)
    assert "ocpi:****@" in str(error.value)


def test_valid_public_urls_and_websites_are_taken() -> None:
    for url in ("https://ocpi.example.com", "https://ocpi.example.com/prefix", "http://[::1]:8080"):
        assert load_settings({"OCPI_PUBLIC_URL": url + "/"}).http.base_url == url
    website = "https://example.com/?lang=en"  # a website may have a query: nothing is appended to it
    assert load_settings({"OCPI_PARTY_WEBSITE": website}).party.website == website


def test_the_send_timeout_may_be_as_long_as_kafka_s_timeouts() -> None:
    assert load_settings({"OCPI_KAFKA_SEND_TIMEOUT": "2147483.647"}).kafka.send_timeout_s == 2147483.647
    assert load_settings({"OCPI_KAFKA_SEND_TIMEOUT": "0.001"}).kafka.send_timeout_s == 0.001


def test_the_time_tolerance_may_be_a_day() -> None:
    assert load_settings({"OCPI_RECONCILE_TIME_TOLERANCE": "86400"}).pipeline.time_tolerance_s == 86400.0


def test_retention_ages_are_bounded() -> None:
    most = load_settings({"OCPI_RETENTION_RAW_DAYS": "36500", "OCPI_RETENTION_HISTORY_DAYS": "36500",
                          "OCPI_RETENTION_PSEUDONYMISE_DAYS": "36500", "OCPI_RETENTION_BILLING_YEARS": "100"})
    assert (most.retention.raw_days, most.retention.billing_years) == (36500, 100)
    with pytest.raises(SettingsError, match="OCPI_RETENTION_BILLING_YEARS='90000': expected an integer from 1 to 100"):
        load_settings({"OCPI_RETENTION_BILLING_YEARS": "90000"})


def test_a_short_pseudonym_key_fails_at_load_without_showing_it() -> None:
    with pytest.raises(SettingsError, match="OCPI_PSEUDONYM_KEY: the key has 15 bytes, expected at least 16") as error:
        load_settings({"OCPI_PSEUDONYM_KEY": "secret-but-15-b"})
    assert "secret" not in str(error.value)
    assert load_settings({"OCPI_PSEUDONYM_KEY": "é" * 8}).retention.pseudonym_key == "é" * 8  # bytes, not characters
    assert load_settings({}).retention.pseudonym_key == ""  # generated into the data directory


def test_a_short_pseudonym_key_stops_a_command_before_it_changes_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    monkeypatch.setenv("OCPI_PSEUDONYM_KEY", "too-short")
    for command in (["settings"], ["retention", "apply"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 1 and "OCPI_PSEUDONYM_KEY" in result.output, result.output
        assert "too-short" not in result.output and "Traceback" not in result.output


def test_real_kafka_turns_workarounds_off() -> None:
    settings = load_settings({"OCPI_KAFKA_BOOTSTRAP": "kafka:9092"})
    assert not settings.kafka.embedded and not settings.kafka.is_tansu
    forced = load_settings({"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:9092", "OCPI_KAFKA_FLAVOR": "tansu"})
    assert forced.kafka.is_tansu


def test_admin_token_is_random_when_unset_and_masked() -> None:
    a, b = load_settings({}), load_settings({})
    assert a.admin.token and a.admin.token != b.admin.token
    assert a.admin.token not in mask(a.admin.token)


def test_settings_command_masks_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from infra.settings import secret_variables
    from pipeline.cli import cli

    assert {"OCPI_ADMIN_TOKEN", "OCPI_PSEUDONYM_KEY"} <= secret_variables()
    monkeypatch.setenv("OCPI_ADMIN_TOKEN", "admin-secret-value-123")
    monkeypatch.setenv("OCPI_PSEUDONYM_KEY", "pseudonym-secret-value-456")
    result = CliRunner().invoke(cli, ["settings"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "ocpi.sessions.v1" in result.output and "adm…(22 chars)" in result.output  # values are shown whole
    assert "admin-secret-value-123" not in result.output
    assert "pseudonym-secret-value-456" not in result.output


def test_a_process_borrowing_a_dev_instance_s_real_kafka_does_not_take_it_for_tansu(tmp_path: Path) -> None:
    """`ocpi-pipeline dev` started with OCPI_KAFKA_BOOTSTRAP names that Kafka in its run file; a worker or job
    started next to it without a bootstrap would borrow it with `is_tansu` true (no bootstrap setting reads as
    "embedded"), and apply the Tansu workarounds to a real Kafka."""
    def instance(bootstrap: str, **embedded: bool) -> None:
        write_running_instance(tmp_path, RunningInstance(pid=os.getpid(), versions_url="", admin_url="",
                                                         clickhouse_url="", admin_token="x",
                                                         kafka_bootstrap=bootstrap, **embedded))

    borrower = load_settings({"OCPI_DATA_DIR": str(tmp_path)})
    instance("127.0.0.1:9092")  # a run file written before `kafka_embedded`: always an embedded broker
    assert resolve_bootstrap(borrower) == "127.0.0.1:9092" and borrower.kafka.is_tansu
    instance("kafka1:9092", kafka_embedded=False)
    with pytest.raises(KafkaNotConfigured, match="OCPI_KAFKA_BOOTSTRAP=kafka1:9092"):
        resolve_bootstrap(borrower)
    explicit = load_settings({"OCPI_DATA_DIR": str(tmp_path), "OCPI_KAFKA_FLAVOR": "kafka"})
    assert resolve_bootstrap(explicit) == "kafka1:9092" and not explicit.kafka.is_tansu


def test_an_ipv6_listen_address_is_bracketed_in_our_urls() -> None:
    assert load_settings({"OCPI_HTTP_HOST": "::", "OCPI_HTTP_PORT": "8080"}).http.base_url == "http://[::]:8080"
    assert load_settings({"OCPI_HTTP_HOST": "::1"}).http.base_url == "http://[::1]:8080"
    assert load_settings({"OCPI_HTTP_HOST": "0.0.0.0"}).http.base_url == "http://0.0.0.0:8080"


def test_a_wrong_database_name_stops_migrate_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    monkeypatch.setenv("OCPI_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("OCPI_CLICKHOUSE_DATABASE", "")
    result = CliRunner().invoke(cli, ["migrate"])
    assert result.exit_code == 1 and "configuration: OCPI_CLICKHOUSE_DATABASE=''" in result.output, result.output
    assert load_settings({"OCPI_CLICKHOUSE_DATABASE": "ocpi-prod_2"}).clickhouse.database == "ocpi-prod_2"


@pytest.mark.parametrize(("variable", "other"), [
    ("OCPI_TOPIC_CDRS", "ocpi.sessions.v1"),  # each module's agent dead-lettered the other module's events
    ("OCPI_TOPIC_REJECTIONS", "ocpi.cdrs.v1"),  # refused pushes (JSON) read as Avro events, pushes as refusals
    ("OCPI_TOPIC_RECONCILIATION", "ocpi.pipeline.party-facts.v1"),  # results read back as party facts
])
def test_two_topic_settings_may_not_name_one_topic(variable: str, other: str) -> None:
    with pytest.raises(SettingsError, match=f"{variable}='{other}': the topic of OCPI_TOPIC_"):
        load_settings({variable: other})


def test_the_longest_app_id_names_changelogs_kafka_takes() -> None:
    app_id = load_settings({"OCPI_PIPELINE_APP_ID": "a" * APP_ID_MAX_LENGTH}).pipeline.app_id
    assert max(len(changelog_topic(app_id, table)) for table in TABLES) == 249


@pytest.mark.parametrize("raw", ["kafka1:9092,kafka2:9092,", "kafka1:9092,,kafka2:9092", " kafka1:9092 , kafka2:9092"])
def test_a_bootstrap_list_is_taken_without_empty_entries_or_blanks(raw: str) -> None:
    """An empty entry (a trailing or doubled comma) was kept as it was, and Faust reads one as its default broker:
    the worker of a cluster's `kafka1:9092,kafka2:9092,` also bootstrapped from 127.0.0.1:9092, whatever Kafka
    answers there (a developer's local one), and could join that cluster's group."""
    import faust
    from faust.transport.drivers.aiokafka import server_list

    settings = load_settings({"OCPI_KAFKA_BOOTSTRAP": raw})
    assert settings.kafka.bootstrap == "kafka1:9092,kafka2:9092"
    app = faust.App("probe", broker=f"kafka://{settings.kafka.bootstrap}", autodiscover=False)
    assert server_list(app.conf.broker, 9092) == ["kafka1:9092", "kafka2:9092"]


def test_the_urls_we_advertise_fit_ocpi_s_url_type() -> None:
    """An OCPI URL is at most 255 characters (BusinessDetails.website, Credentials.url, Endpoint.url): a longer
    OCPI_PUBLIC_URL or OCPI_PARTY_WEBSITE was taken, and a partner that checks the type (ours does) refused our
    credentials and version details, so every handshake failed. Such a value stops the program at start now."""
    import msgspec

    from ocpi.model import BusinessDetails, Endpoint, InterfaceRole, ModuleID
    from receivers.app import create_app
    from receivers.versions import VERSIONS_PATH, served_endpoints

    base = "https://ocpi.example.com/"
    fits = base + "p" * (BASE_URL_MAX_LENGTH - len(base))  # a CDR's URL needs more room than these (test_cdrs.py)
    settings = load_settings({"OCPI_PUBLIC_URL": fits})
    for endpoint in served_endpoints(create_app(settings), settings.http.base_url):
        msgspec.convert(msgspec.to_builtins(endpoint), Endpoint)  # a Url: at most 255 characters
    assert len(settings.http.base_url + VERSIONS_PATH) <= 255
    with pytest.raises(SettingsError, match="OCPI_PUBLIC_URL"):
        load_settings({"OCPI_PUBLIC_URL": fits + "p"})
    with pytest.raises(SettingsError, match="OCPI_HTTP_HOST"):
        load_settings({"OCPI_HTTP_HOST": "h" * (BASE_URL_MAX_LENGTH - len("http://:8080") + 1)})
    path = "/ocpi/emsp/2.2.1/locations"
    with pytest.raises(msgspec.ValidationError):  # what a partner makes of an endpoint URL one character too long
        msgspec.convert({"identifier": ModuleID.LOCATIONS.value, "role": InterfaceRole.RECEIVER.value,
                         "url": base + "p" * (256 - len(base) - len(path)) + path}, Endpoint)

    website = "https://example.com/" + "w" * (255 - len("https://example.com/"))
    assert load_settings({"OCPI_PARTY_WEBSITE": website}).party.website == website
    msgspec.convert({"name": "ocpi-pipeline", "website": website}, BusinessDetails)
    with pytest.raises(SettingsError, match="OCPI_PARTY_WEBSITE"):
        load_settings({"OCPI_PARTY_WEBSITE": website + "w"})


@pytest.mark.parametrize("website", ["https://example.com/a\tb", "https://example.com/\x85", "https://exa mple.com/"])
def test_a_website_is_a_url_of_printable_ascii(website: str) -> None:
    """A tab (which urlparse drops before it parses) or a C1 control character in OCPI_PARTY_WEBSITE was taken and
    sent in our BusinessDetails, whose string type has no control characters: a partner that checks it (ours
    does) refused our credentials. An OCPI URL is a URI: printable ASCII without spaces."""
    with pytest.raises(SettingsError, match="OCPI_PARTY_WEBSITE"):
        load_settings({"OCPI_PARTY_WEBSITE": website})
    assert load_settings({"OCPI_PARTY_WEBSITE": "https://xn--bcher-kva.de/%C3%BC"}).party.website


@pytest.mark.parametrize(("variable", "most"), [("OCPI_KAFKA_REPLICATION_FACTOR", 2**15 - 1),
                                                ("OCPI_TOPIC_PARTITIONS", 2**31 - 1)])
def test_topic_sizes_fit_kafka_s_create_topics_request(variable: str, most: int) -> None:
    """A CreateTopics request carries the replication factor as a 16-bit and the partition count as a 32-bit
    integer: a larger value was taken, and `dev`, `serve` and the worker ended in a struct.error traceback when they
    created the topics."""
    assert load_settings({variable: str(most)})
    with pytest.raises(SettingsError, match=f"{variable}='{most + 1}'"):
        load_settings({variable: str(most + 1)})


def test_token_parties_are_read_as_the_cli_spells_a_party_in_any_case() -> None:
    from pipeline.stage import StageRules

    assert load_settings({}).pipeline.token_parties == ""  # not checked
    settings = load_settings({"OCPI_TOKEN_PARTIES": " nl/ems , BE/Em1"})
    assert settings.pipeline.token_parties == "NL/EMS,BE/EM1"
    rules = StageRules.from_settings(settings.pipeline, send_timeout_s=settings.kafka.send_timeout_s)
    assert rules.token_parties == frozenset({("NL", "EMS"), ("BE", "EM1")})
    assert load_settings(as_environ(settings)).pipeline.token_parties == "NL/EMS,BE/EM1"  # a child process's
