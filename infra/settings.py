"""One settings module for every service, read from environment variables with documented defaults.

Each section is a frozen dataclass; each field names its variable, default and meaning in its metadata, so
the README table and `ocpi-pipeline settings` are generated from this file and cannot drift from it.
A wrong value fails at start with a `SettingsError` that names the variable.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

from ocpi.identity import ci_normalize
from ocpi.model import CDR, max_length


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the environment variable."""


def _setting(env: str, default: str, doc: str, *, secret: bool = False) -> Any:
    return field(metadata={"env": env, "default": default, "doc": doc, "secret": secret})


# An OCPI party as our settings take it: ISO 3166-1 alpha-2 and a 3-character party id, upper-case.
_COUNTRY_CODE: Final = "[A-Z]{2}"
_PARTY_ID: Final = "[A-Z0-9]{3}"


def _parse_token_parties(env: str, raw: str) -> str:
    """`CC/PID,CC/PID` (any case, blanks around each), kept upper-cased and without blanks: CiStrings, and the form a
    child process reads again (`as_environ`). ASCII letters only are upper-cased (`ci_normalize`, as the CDR's are
    compared): str.upper() would turn a non-ASCII letter into another party's (the ligature ff into FF)."""
    if not raw.strip():
        return ""
    parties = [ci_normalize(part.strip()) for part in raw.split(",")]
    wrong = [part for part in parties if not re.fullmatch(f"{_COUNTRY_CODE}/{_PARTY_ID}", part)]
    if wrong:
        raise SettingsError(f"{env}={raw!r}: {', '.join(map(repr, wrong))} is not a party CC/PID (two letters, a "
                            "slash, three letters or digits: NL/EMS)")
    return ",".join(parties)


def token_party_pairs(setting: str) -> frozenset[tuple[str, str]]:
    """The (country code, party id) pairs of an `OCPI_TOKEN_PARTIES` value as `load_settings` keeps it."""
    return frozenset(tuple(part.split("/")) for part in setting.split(",") if part)  # type: ignore[misc]


def _parse_port(env: str, raw: str) -> int:
    port = _parse_int(env, raw)
    if not 0 < port < 65536:
        raise SettingsError(f"{env}={raw!r}: a TCP port is between 1 and 65535")
    return port


def _parse_int(env: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{env}={raw!r}: expected an integer") from None


def _parse_positive_int(env: str, raw: str) -> int:
    value = _parse_int(env, raw)
    if value < 1:
        raise SettingsError(f"{env}={raw!r}: expected an integer >= 1")
    return value


def _parse_non_negative_int(env: str, raw: str) -> int:
    value = _parse_int(env, raw)
    if value < 0:
        raise SettingsError(f"{env}={raw!r}: expected an integer >= 0")
    return value


# A CreateTopics request carries the partition count as a 32-bit and the replication factor as a 16-bit integer:
# beyond them creating the topics ended in a struct.error traceback.
MAX_TOPIC_PARTITIONS: Final = 2**31 - 1
MAX_REPLICATION_FACTOR: Final = 2**15 - 1


def _parse_replication_factor(env: str, raw: str) -> int:
    value = _parse_non_negative_int(env, raw)
    if value > MAX_REPLICATION_FACTOR:
        raise SettingsError(f"{env}={raw!r}: expected an integer from 0 to {MAX_REPLICATION_FACTOR}")
    return value


# Retention ages: no policy keeps data a century, and a bound keeps every TTL well inside ClickHouse's DateTime64
# range (to 2299) and every age inside Python's datetime arithmetic.
MAX_RETENTION_DAYS = 36_500
MAX_RETENTION_YEARS = 100


def _parse_int_up_to(env: str, raw: str, most: int) -> int:
    value = _parse_int(env, raw)
    if not 1 <= value <= most:
        raise SettingsError(f"{env}={raw!r}: expected an integer from 1 to {most}")
    return value


# The HMAC key's least length (`pipeline.retention.Pseudonymizer`).
MIN_PSEUDONYM_KEY_BYTES = 16


def _parse_pseudonym_key(env: str, raw: str) -> str:
    """A secret: the message gives its length, never its value."""
    size = len(raw.encode())
    if 0 < size < MIN_PSEUDONYM_KEY_BYTES:
        raise SettingsError(f"{env}: the key has {size} bytes, expected at least {MIN_PSEUDONYM_KEY_BYTES} "
                            "(or empty: one is generated)")
    return raw


# Every float setting is a duration in seconds. A bound of a century keeps each deadline computed from one (a
# receive time plus a grace, a park TTL, a token grace) inside datetime's and ClickHouse's ranges: 1e12 seconds
# would overflow datetime arithmetic when the first event is parked or a token is replaced.
MAX_SECONDS = 100 * 366 * 86_400


def _parse_float(env: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{env}={raw!r}: expected a number") from None
    if not math.isfinite(value) or value <= 0:  # nan would pass `<= 0` and inf never ends a wait
        raise SettingsError(f"{env}={raw!r}: expected a finite number > 0")
    return _at_most_a_century(env, raw, value)


def _at_most_a_century(env: str, raw: str, seconds: float) -> float:
    if seconds > MAX_SECONDS:
        raise SettingsError(f"{env}={raw!r}: expected at most {MAX_SECONDS} seconds (a century)")
    return seconds


# The producers' request timeout is the send timeout in whole milliseconds (`infra.kafka.publisher`,
# `pipeline.jobs.kafka_io`), which a produce request carries as a 32-bit integer: above it aiokafka's sender died on
# every send (each push answered 3000 for ever), and below 1 ms it was 0, every request timed out at once.
MAX_KAFKA_TIMEOUT_S = (2**31 - 1) / 1000


def _parse_kafka_timeout(env: str, raw: str) -> float:
    value = _parse_float(env, raw)
    if not 0.001 <= value <= MAX_KAFKA_TIMEOUT_S:
        raise SettingsError(f"{env}={raw!r}: expected seconds from 0.001 to {MAX_KAFKA_TIMEOUT_S} (Kafka's "
                            "timeouts are 32-bit milliseconds)")
    return value


def _parse_http_url(env: str, raw: str) -> str:
    parsed = urlparse(raw)
    try:
        valid = parsed.scheme in ("http", "https") and bool(parsed.hostname) and parsed.port != 0
    except ValueError:  # a port that is no number, or out of range
        valid = False
    if not valid:
        raise SettingsError(f"{env}={raw!r}: expected an absolute http(s) URL")
    return raw.rstrip("/")


# OCPI's URL type is at most 255 characters (Credentials.url, Endpoint.url, BusinessDetails.website): a partner that
# checks it (ours does) refuses our credentials and version details with a longer one. Our endpoint URLs are the base
# URL and a path of at most ENDPOINT_PATH_MAX_LENGTH (`receivers.versions.served_endpoints`). The longest URL we hand
# out is a CDR's, in the Location header of its POST answer (an OCPI URL too, 10 §3.1): the base URL and
# `/ocpi/emsp/2.2.1/cdrs/{country_code}/{party_id}/{cdr_id}` (`receivers.cdrs.cdr_url`), each of those three a
# CiString as long as the model lets it be, percent-encoded, so up to 3 characters each.
URL_MAX_LENGTH: Final = 255
ENDPOINT_PATH_MAX_LENGTH: Final = len("/ocpi/emsp/2.2.1/locations")
CDR_PATH_MAX_LENGTH: Final = len("/ocpi/emsp/2.2.1/cdrs") + 3 + 3 * sum(
    max_length(CDR, field) for field in ("country_code", "party_id", "id"))
BASE_URL_MAX_LENGTH: Final = URL_MAX_LENGTH - max(ENDPOINT_PATH_MAX_LENGTH, CDR_PATH_MAX_LENGTH)


def _parse_ascii_url(env: str, raw: str) -> str:
    """An absolute http(s) URL of printable ASCII: a URI (RFC 3986) holds nothing else, a control character is refused
    in any OCPI string, and a CDR POST answers with our URL in its Location header, which cannot carry anything else
    (the CDR would be stored, then its answer fail with 500/3000, and the CDR be resent)."""
    url = _parse_http_url(env, raw)
    if not _URI_CHARACTERS.fullmatch(url):
        raise SettingsError(f"{env}={raw!r}: expected a URL of printable ASCII without spaces: a host name in "
                            "punycode (xn--...), anything else in the path percent-encoded (%20, %C3%BC)")
    return url


def _parse_website(env: str, raw: str) -> str:
    url = _parse_ascii_url(env, raw)
    if len(url) > URL_MAX_LENGTH:
        raise SettingsError(f"{env}: {len(url)} characters; an OCPI URL has at most {URL_MAX_LENGTH}")
    return url


def _parse_base_url(env: str, raw: str) -> str:
    """The base our endpoint URLs are made of (base + path): a query or fragment would end up before the path."""
    url = _parse_ascii_url(env, raw)
    if len(url) > BASE_URL_MAX_LENGTH:
        raise SettingsError(f"{env}: {len(url)} characters; at most {BASE_URL_MAX_LENGTH}, so that the URLs we hand "
                            f"out (this and a path of up to {CDR_PATH_MAX_LENGTH}: a CDR's, in its POST answer) stay "
                            f"within OCPI's {URL_MAX_LENGTH}")
    if "?" in url or "#" in url:
        raise SettingsError(f"{env}={raw!r}: expected a base URL without a query or fragment (the endpoints' paths "
                            "are appended to it)")
    return url


_URI_CHARACTERS = re.compile(r"[!-~]+")


def _parse_non_negative_float(env: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{env}={raw!r}: expected a number") from None
    if not math.isfinite(value) or value < 0:
        raise SettingsError(f"{env}={raw!r}: expected a number >= 0")
    return _at_most_a_century(env, raw, value)


# The reconciliation time tolerance: every session is indexed under each hour of start within it
# (`pipeline.matching.session_token_keys`), so its state and CPU grow with it (a year: 17,500 keys and ~40 ms per
# session). A day already matches a CDR to any session of its token and location that day.
MAX_TIME_TOLERANCE_S = 86400.0


def _parse_time_tolerance(env: str, raw: str) -> float:
    value = _parse_non_negative_float(env, raw)
    if value > MAX_TIME_TOLERANCE_S:
        raise SettingsError(f"{env}={raw!r}: expected at most {MAX_TIME_TOLERANCE_S:.0f} seconds (a day)")
    return value


def _parse_non_negative_decimal(env: str, raw: str) -> Decimal:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise SettingsError(f"{env}={raw!r}: expected a decimal number") from None
    if not value.is_finite() or value < 0:
        raise SettingsError(f"{env}={raw!r}: expected a decimal number >= 0")
    return value


def _parse_pattern(env: str, raw: str, pattern: str, what: str) -> str:
    if not re.fullmatch(pattern, raw):
        raise SettingsError(f"{env}={raw!r}: expected {what}")
    return raw


def _parse_bootstrap(env: str, raw: str) -> str:
    raw = raw.strip()
    servers = [server.strip() for server in raw.split(",") if server.strip()]
    if raw and not servers:  # " , ": not empty, so not the embedded broker, and no cluster either
        raise SettingsError(f"{env}={raw!r}: expected host:port[,host:port...] or empty for embedded")
    for server in servers:
        host, sep, port = server.rpartition(":")
        # ASCII digits only: str.isdigit() takes a superscript (which int() refuses) and other scripts' digits.
        if not sep or not host or not re.fullmatch("[0-9]+", port) or not 0 < int(port) < 65536:
            raise SettingsError(f"{env}={raw!r}: expected host:port[,host:port...] or empty for embedded")
    # The list as the clients should read it: Faust took an empty entry (`k1:9092,k2:9092,`) for its default broker,
    # 127.0.0.1:9092, and bootstrapped from whatever Kafka answered there too.
    return ",".join(servers)


def _parse_dsn(env: str, raw: str) -> str:
    parsed = urlparse(raw)
    if parsed.scheme == "chdb":
        # chdb://data/clickhouse read `data` as a host and opened /clickhouse; chdb:// opened the working directory.
        valid = not parsed.netloc and parsed.path.startswith("/") and parsed.path.strip("/") != ""
    elif parsed.scheme in ("http", "https", "clickhouse", "clickhouses"):
        # Without a host (http://, http:/host:8123) clickhouse-connect connects to localhost.
        try:
            valid = bool(parsed.hostname) and (parsed.port is None or parsed.port > 0)
        except ValueError:  # a port that is no number, or out of range
            valid = False
    else:
        valid = False
    if not valid:
        raise SettingsError(f"{env}={_without_password(raw)!r}: expected chdb:///abs/path or "
                            "http(s)://user:pass@host:port")
    return raw


def _without_password(dsn: str) -> str:
    """`dsn` with the password of its user shown as ****, also where it does not parse (a '/' or '#' in the password
    ends the host part for `urlparse`): up to the last '@' after the scheme."""
    scheme, sep, rest = dsn.partition("://")
    userinfo, at, location = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}{sep}{user}:****@{location}" if sep and at and colon else dsn


def _parse_topic(env: str, raw: str) -> str:
    # "." and "..": Kafka refuses them as topic names; as the app id they are a directory of the state's path
    # (OCPI_DATA_DIR/faust/..), whose removal without changelogs (`drop_state_without_changelog`) took the data dir.
    # isascii: str.isalnum() is true for letters of every script, which Kafka refuses.
    if (not raw or len(raw) > 249 or raw in (".", "..")
            or not all((c.isascii() and c.isalnum()) or c in "._-" for c in raw)):
        raise SettingsError(f"{env}={raw!r}: a Kafka topic name is 1-249 of [A-Za-z0-9._-], not . or ..")
    return raw


# The app id names the state changelogs, `<app id>-location-state-changelog` the longest (pipeline.retention.
# changelog_topic), and Kafka's topic names end at 249 characters.
APP_ID_MAX_LENGTH: Final = 249 - len("-location-state-changelog")


def _parse_app_id(env: str, raw: str) -> str:
    _parse_topic(env, raw)
    if len(raw) > APP_ID_MAX_LENGTH:
        raise SettingsError(f"{env}: {len(raw)} characters; at most {APP_ID_MAX_LENGTH}, so that the state "
                            "changelogs it names stay within Kafka's 249")
    return raw


def _parse_choice(env: str, raw: str, choices: tuple[str, ...]) -> str:
    if raw not in choices:
        raise SettingsError(f"{env}={raw!r}: expected one of {', '.join(choices)}")
    return raw


def _parse_str(env: str, raw: str) -> str:
    return raw


@dataclass(frozen=True)
class KafkaSettings:
    """Kafka: where events go, and the topics they go to."""

    bootstrap: str = _setting(
        "OCPI_KAFKA_BOOTSTRAP", "",
        "host:port list of a Kafka cluster; empty starts the embedded Tansu broker",
    )
    topic_locations: str = _setting("OCPI_TOPIC_LOCATIONS", "ocpi.locations.v1", "topic of Locations pushes")
    topic_sessions: str = _setting("OCPI_TOPIC_SESSIONS", "ocpi.sessions.v1", "topic of Sessions pushes")
    topic_cdrs: str = _setting("OCPI_TOPIC_CDRS", "ocpi.cdrs.v1", "topic of CDR pushes")
    topic_rejections: str = _setting(
        "OCPI_TOPIC_REJECTIONS", "ocpi.rejections.v1",
        "topic of refused pushes (JSON, fire-and-forget), for the partner health report",
    )
    partitions: int = _setting("OCPI_TOPIC_PARTITIONS", "4",
                               "partitions of every topic we create (a state changelog: its source topic's count)")
    replication_factor: int = _setting(
        "OCPI_KAFKA_REPLICATION_FACTOR", "0",
        "replicas of every topic we create (state changelogs too); 0 = min(3, the cluster's brokers)",
    )
    send_timeout_s: float = _setting(
        "OCPI_KAFKA_SEND_TIMEOUT", "10",
        "seconds a push waits for the broker's ack before answering 3000, and a pulled event at most; the deadline "
        "sweeps wait as long past a deadline (and a parked event's wait ends by another push only as long past it), "
        "so set one value for every process (0.001 to 2147483.647)",
    )
    flavor: str = _setting(
        "OCPI_KAFKA_FLAVOR", "auto", "kafka | tansu | auto (tansu when embedded): selects broker workarounds"
    )

    @property
    def embedded(self) -> bool:
        return not self.bootstrap

    @property
    def is_tansu(self) -> bool:
        """Whether the Tansu workarounds of `infra.kafka.compat` apply."""
        return self.flavor == "tansu" or (self.flavor == "auto" and self.embedded)

    def topic_for(self, module: str) -> str:
        """The topic of an OCPI module identifier (`locations`, `sessions`, `cdrs`)."""
        return {"locations": self.topic_locations, "sessions": self.topic_sessions, "cdrs": self.topic_cdrs}[
            module
        ]

    @property
    def module_topics(self) -> tuple[str, ...]:
        return (self.topic_locations, self.topic_sessions, self.topic_cdrs)


@dataclass(frozen=True)
class ClickHouseSettings:
    """ClickHouse: the analytics store."""

    dsn: str = _setting(
        "OCPI_CLICKHOUSE_DSN",
        "",
        "chdb:///abs/path (embedded) or http://user:pass@host:8123 (user and password percent-encoded); empty = "
        "chdb:// under the data dir",
    )
    database: str = _setting(
        "OCPI_CLICKHOUSE_DATABASE", "ocpi", "database that holds our tables (letters, digits, _ and -)"
    )


@dataclass(frozen=True)
class HttpSettings:
    """The OCPI receivers' HTTP server and the URLs it advertises."""

    host: str = _setting("OCPI_HTTP_HOST", "127.0.0.1", "interface the receivers listen on")
    port: int = _setting("OCPI_HTTP_PORT", "8080", "port the receivers listen on")
    public_url: str = _setting(
        "OCPI_PUBLIC_URL", "",
        "base URL partners reach us at, in ASCII (a punycode host, a percent-encoded path), at most "
        f"{BASE_URL_MAX_LENGTH} characters (our endpoint URLs and a CDR's URL, it and a path, are OCPI URLs: "
        f"{URL_MAX_LENGTH} at most); empty = http://HOST:PORT (used in OCPI endpoint URLs). The receivers serve "
        "/ocpi/... at their root: a path in it (https://host/gateway) is for a proxy in front that strips it",
    )

    @property
    def base_url(self) -> str:
        return self.public_url or local_url(self.host, self.port)


def local_url(host: str, port: int) -> str:
    """`http://host:port`, an IPv6 address in brackets (OCPI_HTTP_HOST=:: listens on every IPv6 interface)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True)
class StorageSettings:
    """Local state: the embedded ClickHouse, Faust tables, run files."""

    data_dir: str = _setting(
        "OCPI_DATA_DIR", "./data", "directory for embedded ClickHouse, Faust state and run files"
    )

    @property
    def path(self) -> Path:
        return Path(self.data_dir).resolve()


def private_dir(path: Path) -> Path:
    """`path` as a directory, created readable by its owner only (0700, and so are the parents it creates) if it
    does not exist: the data dir holds the embedded store (the partners' records, with the tokens we call them
    with in clear), the Faust state (token uids, contract ids) and the logs. The parents too: the store's
    directory is `OCPI_DATA_DIR/clickhouse`, and `migrate` on a fresh data dir created the data dir itself with
    the umask's mode. An existing directory keeps its mode, which is the operator's choice."""
    missing = [path, *(parent for parent in path.parents if not parent.exists())]
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True, mode=0o700)
    return path


@dataclass(frozen=True)
class AdminSettings:
    """The ClickHouse shim of a running `dev`/`demo`, through which other processes reach its embedded store."""

    token: str = _setting(
        "OCPI_ADMIN_TOKEN",
        "",
        "token of the ClickHouse shim through which `dev`/`demo` serve their embedded store; empty = random per run"
        " (written to the run file)",
        secret=True,
    )


@dataclass(frozen=True)
class PartySettings:
    """Our own OCPI party: the CredentialsRole we present to partners in the credentials handshake."""

    country_code: str = _setting(
        "OCPI_PARTY_COUNTRY_CODE", "NL", "ISO 3166-1 alpha-2 country code of our party"
    )
    party_id: str = _setting("OCPI_PARTY_ID", "OPP", "our OCPI party id (3 characters A-Z/0-9)")
    name: str = _setting("OCPI_PARTY_NAME", "ocpi-pipeline", "business name in our credentials roles")
    role: str = _setting(
        "OCPI_PARTY_ROLE", "EMSP", "our OCPI role in the credentials roles: EMSP, CPO, HUB, NSP, ..."
    )
    website: str = _setting("OCPI_PARTY_WEBSITE", "",
                            f"website in our business details, in ASCII (a punycode host, a percent-encoded path), at "
                            f"most {URL_MAX_LENGTH} characters; empty = left out")


@dataclass(frozen=True)
class PartnersSettings:
    """How we talk to partners: outgoing OCPI calls and credentials token rotation."""

    outbound_timeout_s: float = _setting(
        "OCPI_OUTBOUND_TIMEOUT", "10", "seconds an outgoing OCPI call (handshake callback, CLI) may take"
    )
    token_grace_s: float = _setting(
        "OCPI_TOKEN_GRACE", "0", "seconds a partner's replaced token keeps working after a credentials PUT"
    )


@dataclass(frozen=True)
class PipelineSettings:
    """The Faust worker: its identity, internal topics, ordering and reconciliation rules."""

    app_id: str = _setting(
        "OCPI_PIPELINE_APP_ID", "ocpi-pipeline",
        "Faust app id: consumer group and prefix of the state changelogs (a new id reprocesses everything)",
    )
    topic_party_facts: str = _setting(
        "OCPI_TOPIC_PARTY_FACTS", "ocpi.pipeline.party-facts.v1",
        "internal topic: session and CDR facts keyed by CPO party, for reconciliation and credit links",
    )
    topic_reconciliation: str = _setting(
        "OCPI_TOPIC_RECONCILIATION", "ocpi.reconciliation.v1",
        "topic the reconciliation results are published to (JSON, one object per `reconciliation` row, key"
        " CC/PID/SUBJECT/ID, a `/` or `%` in CC or PID written `%2F` / `%25`)",
    )
    batch_max: int = _setting("OCPI_PIPELINE_BATCH", "5000", "most Kafka records one agent handles per batch")
    park_ttl_s: float = _setting(
        "OCPI_PIPELINE_PARK_TTL", "300",
        "seconds a PATCH (or EVSE/Connector push) for an unknown object waits for its PUT before it is an orphan",
    )
    park_max: int = _setting(
        "OCPI_PIPELINE_PARK_MAX", "32", "parked events per object; beyond that a new one is an orphan at once"
    )
    session_idle_s: float = _setting(
        "OCPI_PIPELINE_SESSION_IDLE", "14400",
        "seconds without an update after which a PENDING or ACTIVE session is flagged idle (a `DUPLICATE` is no "
        "update)",
    )
    clock_skew_s: float = _setting(
        "OCPI_PIPELINE_CLOCK_SKEW", "300",
        "seconds a Location or Session push's last_updated may be ahead of its receipt before it is flagged "
        "(FUTURE_LAST_UPDATED; CDRs have no stale rule to break)",
    )
    token_parties: str = _setting(
        "OCPI_TOKEN_PARTIES", "",
        "the eMSP parties whose tokens we bill, CC/PID separated by commas (NL/EMS,BE/EMS): a CDR of another's "
        "token is flagged CDR_OF_ANOTHER_EMSP and not billed (kept out of `billable_lines`), a Session "
        "SESSION_OF_ANOTHER_EMSP; empty = not checked (a hub "
        "carries every eMSP's tokens)",
    )
    cdr_grace_s: float = _setting(
        "OCPI_RECONCILE_CDR_GRACE", "86400",
        "seconds after a session completed before a missing CDR is flagged",
    )
    session_grace_s: float = _setting(
        "OCPI_RECONCILE_SESSION_GRACE", "3600",
        "seconds a CDR waits for its session, and a credit CDR for the CDR it credits, before being flagged",
    )
    energy_tolerance: Decimal = _setting(  # noqa: RUF009 - field metadata, not a shared mutable default
        "OCPI_RECONCILE_ENERGY_TOLERANCE", "0.01",
        "kWh a CDR (a session's CDRs together) may differ from its session and still match",
    )
    cost_tolerance: Decimal = _setting(  # noqa: RUF009 - field metadata, not a shared mutable default
        "OCPI_RECONCILE_COST_TOLERANCE", "0.01",
        "cost (excl. VAT) a CDR (a session's CDRs together) may differ from its session and still match",
    )
    time_tolerance_s: float = _setting(
        "OCPI_RECONCILE_TIME_TOLERANCE", "300",
        "seconds a CDR's start/end may differ from its session's and still match (at most 86400). A session is "
        "indexed under the start hours the tolerance covered when it was indexed, so a raised tolerance reaches "
        "across an hour boundary only for sessions indexed (or whose start changed) after the change",
    )
    sweep_interval_s: float = _setting(
        "OCPI_PIPELINE_SWEEP_INTERVAL", "30",
        "seconds between the worker's deadline sweeps (idle sessions, orphans, missing CDRs, retention)",
    )


@dataclass(frozen=True)
class RetentionSettings:
    """How long each class of data is kept (see README, "Retention")."""

    raw_days: int = _setting(
        "OCPI_RETENTION_RAW_DAYS", "30",
        "days raw events, dead letters and our Kafka topics are kept (raw events hold personal data in clear: longer "
        "than `OCPI_RETENTION_PSEUDONYMISE_DAYS`, the worker warns at start, and `retention report` says so)",
    )
    history_days: int = _setting(
        "OCPI_RETENTION_HISTORY_DAYS", "365",
        "days status histories, anomalies and refused pushes (rejections) are kept",
    )
    pseudonymise_days: int = _setting(
        "OCPI_RETENTION_PSEUDONYMISE_DAYS", "90",
        "days after which token uid, contract id, authorization reference and visual number are pseudonymised",
    )
    billing_years: int = _setting(
        "OCPI_RETENTION_BILLING_YEARS", "7", "years CDRs, sessions, credit links and reconciliation are kept"
    )
    pseudonym_key: str = _setting(
        "OCPI_PSEUDONYM_KEY", "",
        "secret key of the pseudonymisation HMAC (at least 16 bytes); empty = generated once into DATA_DIR/secrets",
        secret=True,
    )


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings
    clickhouse: ClickHouseSettings
    http: HttpSettings
    storage: StorageSettings
    admin: AdminSettings
    party: PartySettings
    partners: PartnersSettings
    pipeline: PipelineSettings
    retention: RetentionSettings

    @property
    def clickhouse_dsn(self) -> str:
        """The DSN in effect: the configured one, or chdb:// under the data directory."""
        return self.clickhouse.dsn or f"chdb://{self.storage.path / 'clickhouse'}"

    @property
    def clickhouse_embedded(self) -> bool:
        return self.clickhouse_dsn.startswith("chdb://")

    def with_overrides(self, **sections: Any) -> Settings:
        """A copy with whole sections or single fields replaced, e.g. ``kafka={"bootstrap": "h:1"}``."""
        changed = {name: replace(getattr(self, name), **values) for name, values in sections.items()}
        return replace(self, **changed)


_SECTIONS: tuple[type, ...] = (
    KafkaSettings, ClickHouseSettings, HttpSettings, StorageSettings, AdminSettings,
    PartySettings, PartnersSettings, PipelineSettings, RetentionSettings,
)
_SECTION_NAMES = ("kafka", "clickhouse", "http", "storage", "admin", "party", "partners", "pipeline", "retention")
_ROLES = ("CPO", "EMSP", "HUB", "NAP", "NSP", "OTHER", "SCSP")
_FIELD_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "OCPI_KAFKA_BOOTSTRAP": _parse_bootstrap,
    "OCPI_TOPIC_LOCATIONS": _parse_topic,
    "OCPI_TOPIC_SESSIONS": _parse_topic,
    "OCPI_TOPIC_CDRS": _parse_topic,
    "OCPI_TOPIC_REJECTIONS": _parse_topic,
    "OCPI_TOPIC_PARTITIONS": lambda env, raw: _parse_int_up_to(env, raw, MAX_TOPIC_PARTITIONS),
    "OCPI_KAFKA_REPLICATION_FACTOR": _parse_replication_factor,
    "OCPI_KAFKA_SEND_TIMEOUT": _parse_kafka_timeout,
    "OCPI_KAFKA_FLAVOR": lambda env, raw: _parse_choice(env, raw, ("auto", "kafka", "tansu")),
    # A name or an address, which our endpoint URLs are made of when OCPI_PUBLIC_URL is empty (`local_url`).
    "OCPI_HTTP_HOST": lambda env, raw: _parse_pattern(env, raw, r"[A-Za-z0-9.:%_-]+",
                                                      "a host name or an IP address (no scheme, no port)"),
    "OCPI_HTTP_PORT": _parse_port,
    "OCPI_PUBLIC_URL": lambda env, raw: _parse_base_url(env, raw) if raw else raw,
    # Empty was Path(""): the working directory, where the store, the secrets and the run files then went.
    "OCPI_DATA_DIR": lambda env, raw: _parse_pattern(env, raw, r"(?s).*\S.*", "a directory (relative: to the "
                                                     "working directory)"),
    "OCPI_CLICKHOUSE_DSN": lambda env, raw: _parse_dsn(env, raw) if raw else raw,
    # Quoted in backticks in our SQL: empty, a backtick or a control character broke `migrate` with a traceback, and
    # the clients took an empty name for the server's default database.
    "OCPI_CLICKHOUSE_DATABASE": lambda env, raw: _parse_pattern(env, raw, "[A-Za-z0-9_-]+",
                                                                "letters, digits, _ and - only"),
    "OCPI_PARTY_COUNTRY_CODE": lambda env, raw: _parse_pattern(env, raw, _COUNTRY_CODE, "two capital letters"),
    "OCPI_PARTY_ID": lambda env, raw: _parse_pattern(env, raw, _PARTY_ID, "three characters A-Z/0-9"),
    "OCPI_PARTY_NAME": lambda env, raw: _parse_pattern(env, raw, r"[^\x00-\x1f\x7f-\x9f]{1,100}",
                                                       "1-100 characters without control characters"),
    "OCPI_PARTY_ROLE": lambda env, raw: _parse_choice(env, raw, _ROLES),
    "OCPI_PARTY_WEBSITE": lambda env, raw: _parse_website(env, raw) if raw else raw,
    "OCPI_OUTBOUND_TIMEOUT": _parse_float,
    "OCPI_TOKEN_GRACE": _parse_non_negative_float,
    "OCPI_PIPELINE_APP_ID": _parse_app_id,
    "OCPI_TOPIC_PARTY_FACTS": _parse_topic,
    "OCPI_TOPIC_RECONCILIATION": _parse_topic,
    "OCPI_PIPELINE_BATCH": _parse_positive_int,
    "OCPI_PIPELINE_PARK_TTL": _parse_float,
    "OCPI_PIPELINE_PARK_MAX": _parse_positive_int,
    "OCPI_PIPELINE_SESSION_IDLE": _parse_float,
    "OCPI_PIPELINE_CLOCK_SKEW": _parse_float,
    "OCPI_TOKEN_PARTIES": _parse_token_parties,
    "OCPI_RECONCILE_CDR_GRACE": _parse_float,
    "OCPI_RECONCILE_SESSION_GRACE": _parse_float,
    "OCPI_RECONCILE_ENERGY_TOLERANCE": _parse_non_negative_decimal,
    "OCPI_RECONCILE_COST_TOLERANCE": _parse_non_negative_decimal,
    "OCPI_RECONCILE_TIME_TOLERANCE": _parse_time_tolerance,
    "OCPI_PIPELINE_SWEEP_INTERVAL": _parse_float,
    "OCPI_RETENTION_RAW_DAYS": lambda env, raw: _parse_int_up_to(env, raw, MAX_RETENTION_DAYS),
    "OCPI_RETENTION_HISTORY_DAYS": lambda env, raw: _parse_int_up_to(env, raw, MAX_RETENTION_DAYS),
    "OCPI_RETENTION_PSEUDONYMISE_DAYS": lambda env, raw: _parse_int_up_to(env, raw, MAX_RETENTION_DAYS),
    "OCPI_RETENTION_BILLING_YEARS": lambda env, raw: _parse_int_up_to(env, raw, MAX_RETENTION_YEARS),
    "OCPI_PSEUDONYM_KEY": _parse_pseudonym_key,
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every section from `environ` (default: the process environment)."""
    env = os.environ if environ is None else environ
    sections = {}
    for name, cls in zip(_SECTION_NAMES, _SECTIONS, strict=True):
        values = {}
        for f in fields(cls):
            var, raw = f.metadata["env"], env.get(f.metadata["env"], f.metadata["default"])
            values[f.name] = _FIELD_PARSERS.get(var, _parse_str)(var, raw)
        sections[name] = cls(**values)
    settings = Settings(**sections)
    _check_distinct_topics(settings)
    if len(settings.http.base_url) > BASE_URL_MAX_LENGTH:  # http://HOST:PORT, OCPI_PUBLIC_URL being empty
        raise SettingsError(f"OCPI_HTTP_HOST: our endpoint and CDR URLs on {settings.http.base_url} could be longer "
                            f"than OCPI's {URL_MAX_LENGTH} characters; set OCPI_PUBLIC_URL")
    if not settings.admin.token:
        # A random token still protects the shim; `dev` writes it to the run file for the CLI.
        settings = settings.with_overrides(admin={"token": secrets.token_urlsafe(24)})
    return settings


def _check_distinct_topics(settings: Settings) -> None:
    """Each topic carries one kind of record: a module's Avro events, refused pushes, party facts or results (JSON).
    On a shared topic each consumer reads the other's records too (dead letters that are not, facts that are results),
    and the rejections agent reads the pushes."""
    topics = {"OCPI_TOPIC_LOCATIONS": settings.kafka.topic_locations,
              "OCPI_TOPIC_SESSIONS": settings.kafka.topic_sessions, "OCPI_TOPIC_CDRS": settings.kafka.topic_cdrs,
              "OCPI_TOPIC_REJECTIONS": settings.kafka.topic_rejections,
              "OCPI_TOPIC_PARTY_FACTS": settings.pipeline.topic_party_facts,
              "OCPI_TOPIC_RECONCILIATION": settings.pipeline.topic_reconciliation}
    seen: dict[str, str] = {}
    for env, topic in topics.items():
        if topic in seen:
            raise SettingsError(f"{env}={topic!r}: the topic of {seen[topic]} too; every topic setting needs a topic "
                                "of its own")
        seen[topic] = env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


def documented_settings() -> list[tuple[str, str, str, str]]:
    """(section, variable, default, meaning) for every setting: the source of README's table."""
    rows = []
    for cls in _SECTIONS:
        for f in fields(cls):
            rows.append((cls.__name__.removesuffix("Settings"), f.metadata["env"], f.metadata["default"],
                         f.metadata["doc"]))
    return rows


def secret_variables() -> frozenset[str]:
    """The variables whose values are secrets: shown masked, never in clear."""
    return frozenset(f.metadata["env"] for cls in _SECTIONS for f in fields(cls) if f.metadata["secret"])


def as_environ(settings: Settings) -> dict[str, str]:
    """The settings as environment variables, to hand to a child process."""
    env = {}
    for name, cls in zip(_SECTION_NAMES, _SECTIONS, strict=True):
        section = getattr(settings, name)
        for f in fields(cls):
            env[f.metadata["env"]] = str(getattr(section, f.name))
    return env


def mask(secret: str) -> str:
    """Show a secret's shape, never its value (tokens in logs, CLI output and errors)."""
    if not secret:
        return ""
    return f"{secret[:3]}…({len(secret)} chars)" if len(secret) > 8 else "****"
