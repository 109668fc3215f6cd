"""Pull-model catch-up: GET a partner's Sender interface (Locations, Sessions, CDRs) into the pipeline.

OCPI makes catching up after an outage the receiver's job (04 §14): we GET the owner's list, filtered by
`last_updated`, and feed every object to the same topics and rules as a push, marked `source=PULL`.

The crawl (04 §4.2):
- The window is [date_from, date_to): `--since`, or where the completed pulls end without a gap (a one-off
  window apart from them moves nothing), up to `--until` or
  `SETTLE` (5 minutes) before the moment the crawl starts. (A crawl up to a later `--until` counts as ended
  `SETTLE` before it started, so the next window starts there, not at a date_to still to come; it is crawled
  in two parts, up to that point and then the rest, see `X-Total-Count` below.) Consecutive windows leave no
  gaps, and overlap only after such a crawl.
  Not up to now: `last_updated` is stamped by the partner's clock, which may run behind ours, and an object
  stamped just before our crawl may become visible to its GET only a moment later; a window ending at our now
  would leave such objects behind it, and the next window starts after them for good. Sessions require a
  `date_from` (09 §2.1), so their first pull needs `--since`.
- Pages are followed through `Link: <…>; rel="next"` until there is none, with the window's `date_from` and `date_to`
  put back where a link leaves them out (as the spec's own example does). URLs we build ourselves (the first page,
  re-reads) ask for `limit` objects, lowered to the server's `X-Limit` once it is known. An empty page at or past
  `X-Total-Count` (or without one, or whose link has no `offset`) is the last even with a next link (a partner that
  links on every page would otherwise lead the crawl through empty pages for ever). A next link whose `offset` lies
  past the objects the page held (a server that caps `limit` but adds the limit asked for) is read from where they
  ended instead, skipping nothing; one whose `offset` is not past the page's (back to a page read before) stops the
  crawl (PullError), which would otherwise read the same pages for ever.
- When `X-Total-Count` drops (objects updated mid-crawl leave the date_to window, shifting the ones after
  them down), the page is read again from `offset` − drop (04 §4.2's "offset − 1" for a drop of one), so no
  object is skipped (and again from further back if the re-read finds the total dropped further); the objects
  read twice are deduplicated by the pipeline. Only a date_to already past lets an updated object leave: under
  a date_to still to come it moves to the list's end, the total stays and the objects after it shift below
  offsets already read. So a window past `SETTLE` before the start is crawled up
  to that point first, then from there to its date_to (what this tail may skip, the next window reads).
- A page at another offset (at another URL, for a partner paging without one) holding exactly the objects of the page
  before it means the partner ignores `offset` (or its own paging): the crawl stops (PullError) rather than complete
  a window whose later objects it never saw. (Not when `X-Total-Count` changed: objects that left or entered the
  window can put just that page at its offset.)
- HTTP 429 and 503 (and other 5xx, timeouts, refused connections, bodies that do not decompress), OCPI
  3xxx answers and a Hub's 4002/4003 (the receiving party timed out, is not connected) are retried with
  exponential backoff and full jitter; a `Retry-After` (seconds or HTTP date) is waited out first. Other
  errors stop the crawl (2xxx: our request is wrong; 401: the partner refused our token; a next link that is
  no URL). Redirects are never followed: they could drop the Authorization header
  or hand it to another host; nor is a next link to another origin (scheme, host or port) than the endpoint's.
- Each list is decoded element by element (`ocpi.decode.decode_list`, with the partner's compatibility
  profile): invalid objects (an empty id, country_code or party_id too, as for a push: `ocpi._validate`; bytes
  that are no UTF-8, or more of them than a push body may hold, `receivers.app.MAX_BODY_BYTES`) are logged and
  recorded, the valid ones are processed (04 §4.1). Objects whose
  owner is not one of the partner's CPO roles (the owner of Locations, Sessions and CDRs, as for a push) are
  recorded and skipped (04 §6.3); a Hub's may be any party's but a party the Hub registered itself (as HUB).
  Recorded objects go to `OCPI_DATA_DIR/jobs/pull/<partner>.<module>.rejected.jsonl`, which nothing deletes: their
  personal identifiers (`retention.pseudonymised_element`: those of every object in the element, at any depth) are
  written as pseudonyms, never in clear. A page's are
  recorded once its valid objects are acknowledged, so a page read again after a failed send is recorded once.

Full sync of Locations (08 §2.1: a complete list is the new truth): a Locations crawl read without date_from (a
party's first, or `full`) to the default date_to, nothing announced left unread, every object naming its Location
and as many named as its last X-Total-Count, is a complete list; what its pages listed (`listed_identity`, invalid
objects too) is kept beside the checkpoint while it runs (`<checkpoint>.listed.jsonl`) and handed over in
`PullReport.listed`;
`stored_not_listed` finds the stored Locations of the party it no longer holds, and each gets an UNLIST event
(`infra.events.unlist_event`, dated by the list's date_to) before the crawl counts as completed
(`not_a_full_list` says why another crawl is none).

Requests carry `Authorization: Token <base64>` (the raw token for RAW_TOKEN partners), a fresh X-Request-ID,
one X-Correlation-ID per crawl, and routing headers from our party (OCPI_PARTY_*) to the partner's: its Hub role
(whose list holds every connected party's objects, 04 §10), else each of its CPO roles in turn, one crawl each
(a platform hosting several CPO parties, 03 case 3, routes a GET by OCPI-to-* and lists only the addressed
party's objects: addressed to the first alone, the others' were never pulled), else its first role.
Timeouts: OCPI_OUTBOUND_TIMEOUT, for each page's whole answer.

Checkpoint `OCPI_DATA_DIR/jobs/pull/<partner>.<module>.json` (`<partner>.<module>.<CC>-<PID>.json` per party for
a partner crawled as several; the file written while one party was crawled becomes the file of the party it records,
the first CPO party's if it records none, and is never continued by another party):
the window and the next page's URL, saved after every page whose events Kafka acknowledged, and where the
completed crawls end without a gap. An interrupted pull resumes at the page after the last acknowledged one (one
whose endpoint moved since, to another origin or path, crawls its window again at the new one); the next window
starts there.
Each party's crawl has its own window; one that fails does not keep the others from theirs. A pull of the same
partner and module started while one runs is refused (`<partner>.<module>.lock`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import hashlib
import json
import logging
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import httpx
import msgspec

from infra.clickhouse.client import select
from infra.codec import AvroCodecError, encode_event
from infra.events import build_event, unlist_event
from infra.settings import Settings
from ocpi.datetime import format_datetime
from ocpi.decode import UNPARSABLE, OcpiJsonError, OcpiValidationError, decode_list, unparsable_reason
from ocpi.identity import ObjectKey, ci_equal, ci_normalize
from ocpi.model import CDR, InterfaceRole, Location, Role, Session
from pipeline.jobs.common import (
    Checkpoint,
    JobError,
    JobProgress,
    NoProgress,
    from_iso,
    iso,
    jobs_dir,
    running_alone,
    uninterrupted,
)
from receivers.app import MAX_BODY_BYTES
from receivers.registry import Partner, PartnerStatus
from receivers.transport import COUNTRY_CODE_VALUE, PARTY_ID_VALUE

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

MAX_PAGE_BYTES: Final = 64 * 1024 * 1024
SETTLE: Final = timedelta(minutes=5)  # how far before now a window ends by default (see the module docstring)


@dataclass(frozen=True)
class ModuleKind:
    model: type[msgspec.Struct]
    payload_type: str
    level: str
    operation: str  # as the same object would arrive pushed, so the same rules apply


KINDS: Final = {
    "locations": ModuleKind(Location, "Location", "LOCATION", "PUT"),
    "sessions": ModuleKind(Session, "Session", "SESSION", "PUT"),
    "cdrs": ModuleKind(CDR, "CDR", "CDR", "POST"),
}


class PullError(JobError):
    """The crawl cannot go on; the checkpoint keeps the position, so a rerun resumes after a fix."""


class RecordSink(Protocol):
    """Where the events go: `pipeline.jobs.kafka_io.JobProducer` (acknowledged sends), a list in tests. `within`:
    the seconds within which each record must be acknowledged after it was taken from `records`."""

    async def send_all(self, records: Iterable[tuple[str, bytes, bytes]], *, within: float | None = None) -> int: ...


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_s: float = 0.5
    max_s: float = 60.0
    max_retry_after_s: float = 600.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter on an exponential ceiling; a Retry-After is waited out first (capped)."""
        jitter = random.uniform(0, min(self.max_s, self.base_s * 2**attempt))
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_s) + jitter * 0.1
        return jitter


@dataclass
class PullReport:
    partner: str
    module: str
    since: datetime | None
    until: datetime
    resumed: bool = False
    pages: int = 0
    objects: int = 0  # valid objects sent to Kafka in this run
    invalid: int = 0
    foreign: int = 0
    rereads: int = 0
    retries: int = 0
    total: int | None = None  # the last X-Total-Count seen
    unread: int = 0  # objects X-Total-Count announced past the last page (one without a next link)
    party: tuple[str, str] | None = None  # whom the GETs were addressed to (OCPI-to-*)
    # Full sync (Locations, 08 §2.1): every (country_code, party_id, id) a complete list held, read from the start
    # without date_from to the default date_to (`until`), nothing left unread; None for any other crawl.
    listed: frozenset[tuple[str, str, str]] | None = None
    not_full: str | None = None  # why a Locations crawl was no complete list (None: it was, or other modules)
    not_listed: list[tuple[str, str, str]] | None = None  # the stored ones `listed` lacks (`stored_not_listed`)
    unlisted: int = 0  # UNLIST events of `not_listed` Kafka acknowledged (none with `unlist=False`)
    parties: list[PullReport] = dataclasses.field(default_factory=list)  # one per party crawled, when several were


# Full sync: the stored Locations a complete list (`PullReport.listed`) no longer holds (`stored_not_listed`).
NotListed = Callable[[Partner, PullReport], Awaitable[list[tuple[str, str, str]]]]


@dataclass
class _Page:
    url: str
    data: bytes
    next_url: str | None
    total: int | None
    x_limit: int | None
    request_id: str
    from_party: tuple[str, str] | None
    to_party: tuple[str, str] | None


class _Envelope(msgspec.Struct):
    status_code: int
    status_message: str | None = None
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


_envelope = msgspec.json.Decoder(_Envelope)


def authorization(token: str, *, raw: bool) -> str:
    """`Token <base64 of the token>` (04 §2), or the raw token for partners whose profile says RAW_TOKEN."""
    return f"Token {token}" if raw else "Token " + base64.b64encode(token.encode()).decode("ascii")


def with_query(url: str, **params: Any) -> str:
    """`url` with the given query parameters set (others kept, None removes)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query += [(k, str(v)) for k, v in params.items() if v is not None]
    return urlunsplit(parts._replace(query=urlencode(query)))


def whole_number(value: str | None) -> int | None:
    """A partner's decimal number (a header, a query parameter), None if it is none: ASCII digits only, as HTTP and
    URLs write them (str.isdigit() takes a superscript, which int() refuses, and other scripts' digits)."""
    return int(value) if value and _DIGITS.fullmatch(value) else None


_DIGITS: Final = re.compile("[0-9]+")


def query_int(url: str, name: str) -> int | None:
    for key, value in parse_qsl(urlsplit(url).query):
        if key == name and (number := whole_number(value)) is not None:
            return number
    return None


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """A Retry-After header as seconds to wait: delta-seconds or an HTTP date; None if absent or unusable."""
    if not value:
        return None
    value = value.strip()
    if (seconds := whole_number(value)) is not None:
        return float(seconds)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max((moment - now).total_seconds(), 0.0)


_LINK_TOKEN: Final = re.compile(r"[^\s;,=\"]+")


def next_link(fields: Iterable[str]) -> str | None:
    """The target of the first link whose relation types include `next`, in Link header fields (RFC 8288 §3,
    parsed as its Appendix B does): parameter names compare case-insensitively (`Rel=next`), a parameter may
    have no value (`crossorigin`) and a quoted value may hold `;`, `,`, `=` or `<` (`title="page; 2"`), only the
    first `rel` of a link counts, and its relation types compare case-insensitively, one rel naming several
    (§2.1.1, §3.3). The target is returned as written (relative to the request's URL when relative)."""
    for field in fields:
        at, end = 0, len(field)
        while at < end:
            start = field.find("<", at)
            if start < 0:
                break
            close = field.find(">", start)
            if close < 0:
                break
            target, at = field[start + 1:close], close + 1
            rel: str | None = None
            while at < end:  # the link's parameters, up to the ',' that ends it (outside a quoted value)
                while at < end and field[at] in " \t":
                    at += 1
                if at >= end or field[at] == ",":
                    at += 1
                    break
                if field[at] != ";":  # not a parameter: skip to the next link
                    nxt = field.find(",", at)
                    at = end if nxt < 0 else nxt
                    continue
                at += 1
                while at < end and field[at] in " \t":
                    at += 1
                name_match = _LINK_TOKEN.match(field, at)
                if name_match is None:
                    continue
                name, at = name_match.group().lower(), name_match.end()
                while at < end and field[at] in " \t":
                    at += 1
                value = ""
                if at < end and field[at] == "=":
                    at += 1
                    while at < end and field[at] in " \t":
                        at += 1
                    if at < end and field[at] == '"':
                        at += 1
                        chars = []
                        while at < end and field[at] != '"':
                            if field[at] == "\\" and at + 1 < end:
                                at += 1
                            chars.append(field[at])
                            at += 1
                        value, at = "".join(chars), at + 1
                    else:
                        value_match = _LINK_TOKEN.match(field, at)
                        if value_match is not None:
                            value, at = value_match.group(), value_match.end()
                if name == "rel" and rel is None:  # a second rel is ignored (§3.3)
                    rel = value
            if rel is not None and "next" in rel.lower().split():
                return target.strip()
    return None


def _origin(url: str) -> tuple[str, str | None, int | None]:
    """(scheme, host, port) of a URL, the default port made explicit; ValueError for an invalid port."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(scheme)


def _moved(crawl: dict[str, Any], endpoint_url: str) -> bool:
    """Whether the endpoint an interrupted crawl began at is not the partner's endpoint now (a credentials update
    re-read it): another URL than the one the crawl recorded, another path of the same host too (a new version's);
    for a crawl recorded by an earlier version, which kept no endpoint, a next page at another origin."""
    if crawl.get("endpoint") is not None:
        return bool(crawl["endpoint"] != endpoint_url)
    if not crawl.get("next_url"):
        return False
    try:
        return _origin(crawl["next_url"]) != _origin(endpoint_url)
    except ValueError:  # an invalid port: not a URL the crawl could go on at
        return True


def _party(headers: httpx.Headers, side: str) -> tuple[str, str] | None:
    country, party = headers.get(f"ocpi-{side}-country-code"), headers.get(f"ocpi-{side}-party-id")
    if country and party and COUNTRY_CODE_VALUE.match(country) and PARTY_ID_VALUE.match(party):
        return country, party
    return None


def _their_parties(partner: Partner) -> list[tuple[str, str] | None]:
    """Whom the GETs are addressed to, one crawl each: a Hub's HUB role (its list holds the objects of every party
    behind it, 04 §10); else each of the partner's CPO roles (a platform hosting several CPO parties, 03 case 3,
    routes a GET by OCPI-to-* and lists only that party's objects, 04 §8); else its first role; None: no role."""
    hub = next((role for role in partner.roles if role.role is Role.HUB), None)
    if hub is not None:
        return [(hub.country_code, hub.party_id)]
    cpos: list[tuple[str, str] | None] = []
    for role in partner.roles:
        if role.role is Role.CPO and not any(
                p is not None and ci_equal(p[0], role.country_code) and ci_equal(p[1], role.party_id) for p in cpos):
            cpos.append((role.country_code, role.party_id))
    if cpos:
        return cpos
    return [(partner.roles[0].country_code, partner.roles[0].party_id)] if partner.roles else [None]


class _Crawler:
    def __init__(self, settings: Settings, partner: Partner, module: str, endpoint_url: str,
                 http: httpx.AsyncClient, retry: RetryPolicy, report: PullReport, correlation_id: str,
                 sleep: Callable[[float], Awaitable[None]], theirs: tuple[str, str] | None) -> None:
        if partner.status is not PartnerStatus.REGISTERED:  # suspended by an operator, unregistered, half-way
            raise PullError(f"partner {partner.partner_id!r} is {partner.status.value}: only a REGISTERED partner "
                            "is pulled from (`ocpi-pipeline partners resume` ends a suspension)")
        if not partner.outbound_token:
            raise PullError(f"we hold no token for partner {partner.partner_id!r} (register with it first: "
                            "`ocpi-pipeline partners register`)")
        self.partner = partner
        self.http = http
        self.retry = retry
        self.report = report
        self.sleep = sleep
        self.headers = {"Authorization": authorization(partner.outbound_token, raw=partner.profile.raw_token),
                        "X-Correlation-ID": correlation_id, "Accept": "application/json",
                        "OCPI-from-country-code": settings.party.country_code,
                        "OCPI-from-party-id": settings.party.party_id}
        if theirs is not None:
            self.headers |= {"OCPI-to-country-code": theirs[0], "OCPI-to-party-id": theirs[1]}
        self.timeout_s = settings.partners.outbound_timeout_s
        self.module = module
        self.endpoint_url = endpoint_url
        self.origin = _origin(endpoint_url)

    async def fetch(self, url: str) -> _Page:
        """GET one page, retrying what is transient (see the module docstring)."""
        try:
            httpx.Request("GET", url)  # a URL httpx cannot request (a partner's next link): no retry helps
            origin = _origin(url)
        except (httpx.InvalidURL, ValueError) as exc:
            raise PullError(f"GET {url}: not a usable URL ({exc})") from None
        if origin != self.origin:  # a partner's next link, like a redirect: our token would go to whoever is there
            raise PullError(f"GET {url}: the next link points at another origin (scheme, host or port) than the "
                            f"endpoint {self.endpoint_url}; it is not followed (our Authorization header would go "
                            "there, in clear text over http): ask the partner to fix its Link headers")
        last = ""
        for attempt in range(self.retry.max_attempts):
            request_id = str(uuid.uuid4())
            retry_after: float | None = None
            try:
                # For the whole answer: httpx's timeout bounds each wait for a chunk, so a page sent a few bytes
                # at a time would hold the crawl (and a schedule's later rounds) for as long as the partner likes.
                async with asyncio.timeout(self.timeout_s):
                    response, body = await self._get(url, request_id)
            except (httpx.TimeoutException, TimeoutError):
                last = "no answer within the timeout"
            except httpx.RequestError as exc:  # refused, reset, a body that does not decompress (DecodingError) ...
                last = f"{type(exc).__name__}: {exc}"
            else:
                page_or_reason = self._page(url, request_id, response, body)
                if isinstance(page_or_reason, _Page):
                    return page_or_reason
                last = page_or_reason
                retry_after = retry_after_seconds(response.headers.get("retry-after"), datetime.now(UTC))
            if attempt + 1 < self.retry.max_attempts:
                delay = self.retry.delay(attempt, retry_after)
                self.report.retries += 1
                log.warning("GET %s: %s; retrying in %.1fs (attempt %d of %d)", url, last, delay, attempt + 2,
                            self.retry.max_attempts)
                await self.sleep(delay)
        raise PullError(f"GET {url}: gave up after {self.retry.max_attempts} attempts; last: {last}")

    async def _get(self, url: str, request_id: str) -> tuple[httpx.Response, bytes]:
        async with self.http.stream("GET", url, headers={**self.headers, "X-Request-ID": request_id}) as response:
            size = 0
            chunks = []
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_PAGE_BYTES:
                    raise PullError(f"GET {url}: page larger than {MAX_PAGE_BYTES} bytes; use a smaller --limit")
                chunks.append(chunk)
            return response, b"".join(chunks)

    def _page(self, url: str, request_id: str, response: httpx.Response, body: bytes) -> _Page | str:
        """The page of a usable answer; the reason as a string for an answer worth retrying; raises otherwise."""
        status = response.status_code
        if response.is_redirect:
            raise PullError(f"GET {url}: redirected (HTTP {status}) to {response.headers.get('location', '?')}; "
                            "redirects are not followed (they could drop or leak the Authorization header): "
                            "fix the endpoint URL")
        if status == 401:
            raise PullError(f"GET {url}: the partner refused our token (HTTP 401)")
        try:
            envelope = _envelope.decode(body)
        except UNPARSABLE as exc:
            if status == 429 or status >= 500:
                return f"HTTP {status}"
            raise PullError(f"GET {url}: HTTP {status}, not an OCPI response envelope ({unparsable_reason(exc)})"
                            ) from None
        code, message = envelope.status_code, envelope.status_message or ""
        # 3xxx, and a Hub's 4002 (the receiver did not answer in time) and 4003 (it is not connected): transient.
        if status == 429 or status >= 500 or 3000 <= code < 4000 or code in (4002, 4003):
            return f"HTTP {status}, OCPI {code} {message}".rstrip()
        if not 1000 <= code < 2000 or status >= 300:
            raise PullError(f"GET {url}: HTTP {status}, OCPI status {code}: {message or 'no message'}")
        try:
            link = next_link(response.headers.get_list("link"))
            next_url = urljoin(url, link) if link is not None else None
        except ValueError as exc:  # urljoin of a malformed URL (an unclosed IPv6 bracket ...)
            raise PullError(f"GET {url}: the Link header's next URL is not a URL ({exc}): "
                            f"{response.headers.get('link')!r}") from None
        total = response.headers.get("x-total-count")
        x_limit = response.headers.get("x-limit")
        data = bytes(envelope.data)
        return _Page(url=url, data=b"[]" if data == b"null" else data, next_url=next_url,
                     total=whole_number(total), x_limit=whole_number(x_limit), request_id=request_id,
                     from_party=_party(response.headers, "from"), to_party=_party(response.headers, "to"))


def _checkpoint_path(settings: Settings, partner_id: str, module: str, party: tuple[str, str] | None) -> Path:
    """`<partner>.<module>.json`, or `<partner>.<module>.<CC>-<PID>.json` for one of several parties crawled."""
    if party is None:
        return jobs_dir(settings, "pull") / f"{partner_id}.{module}.json"
    # `-` joins the two parts, so within a part it is escaped too (NL/-AB and NL-/AB are two parties).
    name = "-".join(re.sub(r"[^A-Z0-9_]", lambda m: f"%{ord(m.group()):02X}", ci_normalize(part)) for part in party)
    return jobs_dir(settings, "pull") / f"{partner_id}.{module}.{name}.json"


def _recorded_party(path: Path) -> tuple[str, str] | None:
    """The party a checkpoint's crawls were addressed to, as it records it (None: it names none)."""
    try:
        state = Checkpoint(path).load()
    except JobError:
        return None
    party = state.get("party") if state else None
    if isinstance(party, list) and len(party) == 2 and all(isinstance(part, str) for part in party):
        return party[0], party[1]
    return None


def _same_party(one: tuple[str, str] | None, other: tuple[str, str] | None) -> bool:
    return one is not None and other is not None and ci_equal(one[0], other[0]) and ci_equal(one[1], other[1])


def _checkpoint(settings: Settings, partner_id: str, module: str, party: tuple[str, str] | None,
                parties: list[tuple[str, str] | None]) -> Checkpoint:
    """The checkpoint of the crawl addressed to `party`, one of `parties` (`_their_parties`). A partner crawled as
    one party keeps `<partner>.<module>.json`; one crawled as several, a file per party. The checkpoint written
    while the partner was crawled as one party (the file without party) becomes the file of the party it records
    (one that records none, written while only the first CPO party was crawled, the first party's), and a party's
    own file the partner's when it is the only one left, so that a change neither pulls again nor skips. A
    party's crawl never continues another party's window: that party's objects before its end were never pulled."""
    single = len(parties) == 1
    path = _checkpoint_path(settings, partner_id, module, None if single else party)
    shared = _checkpoint_path(settings, partner_id, module, None)
    before = None
    if single and party is not None:
        before = _checkpoint_path(settings, partner_id, module, party)
        owner = _recorded_party(path) if path.exists() else None
        if owner is not None and not _same_party(owner, party):  # another party's (its only CPO role changed)
            aside = _checkpoint_path(settings, partner_id, module, owner)
            if not aside.exists():
                log.info("the checkpoint %s is now %s", path, aside)
                path.rename(aside)
    if not single and shared.exists():
        owner = _recorded_party(shared)
        if _same_party(party, owner if owner is not None else parties[0]):
            before = shared
    if before is not None and before.exists() and not path.exists():
        log.info("the checkpoint %s is now %s", before, path)
        before.rename(path)
    return Checkpoint(path)


def rejected_path(settings: Settings, partner_id: str, module: str) -> Path:
    return jobs_dir(settings, "pull") / f"{partner_id}.{module}.rejected.jsonl"


async def pull(settings: Settings, partner: Partner, module: str, sink: RecordSink, *,
               since: datetime | None = None, until: datetime | None = None, limit: int = 100,
               relative: tuple[str | None, str | None] = (None, None), restart: bool = False,
               since_unless_completed: bool = False, retry: RetryPolicy | None = None,
               progress: JobProgress | None = None, transport: httpx.AsyncBaseTransport | None = None,
               sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, full: bool = False,
               not_listed: NotListed | None = None, unlist: bool = True) -> PullReport:
    """Crawl `partner`'s `module` Sender list once (or resume the interrupted crawl); see the module docstring.

    One crawl per party the GETs are addressed to (`_their_parties`: each CPO party of a platform hosting several),
    each with its own checkpoint and window; the report of several has theirs in `parties`, and a party whose
    crawl fails does not keep the others from theirs (the pull then fails, naming it).

    `relative`: `since`/`until` as typed when they are durations back from now (`common.relative_text`); the
    same text resumes an interrupted crawl, whose window stays the one they resolved to when it started.
    `since_unless_completed`: `since` only for a party no pull has completed for yet; the others continue where
    their completed pulls end (a schedule's rounds after the first: `since` every round would crawl the whole
    window again each time). `full`: every party's whole list, without date_from (`since` must be None).

    Full sync: a Locations crawl that is a complete list (`not_a_full_list`) has what it listed in
    `PullReport.listed`; `not_listed` (`stored_not_listed` on the store) then names the stored Locations it no longer
    holds, and, with `unlist`, an UNLIST event of each is sent before the crawl counts as completed (interrupted
    there, the rerun sends them again: the pipeline takes a second UNLIST as a duplicate).

    One pull of a partner's module at a time: a second one (a manual pull while a scheduled one crawls) would
    resume the same crawl from the checkpoint and publish every object again; it is refused."""
    lock = jobs_dir(settings, "pull") / f"{partner.partner_id}.{module}.lock"
    with running_alone(lock, f"a pull of {module} from {partner.partner_id}"):
        return await _pull(settings, partner, module, sink, since=since, until=until, limit=limit,
                           relative=relative, restart=restart, since_unless_completed=since_unless_completed,
                           retry=retry, progress=progress, transport=transport, sleep=sleep, full=full,
                           not_listed=not_listed, unlist=unlist)


async def _pull(settings: Settings, partner: Partner, module: str, sink: RecordSink, *, since: datetime | None,
                until: datetime | None, limit: int, relative: tuple[str | None, str | None], restart: bool,
                since_unless_completed: bool, retry: RetryPolicy | None, progress: JobProgress | None,
                transport: httpx.AsyncBaseTransport | None, sleep: Callable[[float], Awaitable[None]],
                full: bool, not_listed: NotListed | None, unlist: bool) -> PullReport:
    kind = KINDS.get(module)
    if kind is None:
        raise PullError(f"module {module!r} cannot be pulled; use one of {', '.join(KINDS)}")
    endpoint = partner.endpoint(module, InterfaceRole.SENDER)
    if endpoint is None:
        offered = ", ".join(f"{e.identifier} {e.role}" for e in partner.endpoints) or "no endpoints"
        raise PullError(f"partner {partner.partner_id!r} has no {module} SENDER endpoint (it offers: {offered})")
    if limit < 1:
        raise PullError("--limit must be at least 1")
    if full and (since is not None or module == "sessions"):
        raise PullError("a full pull reads the whole list, without date_from: it takes no --since, and Sessions "
                        "have none (09 §2.1)")
    progress = progress or NoProgress()
    parties = _their_parties(partner)
    reports: list[PullReport] = []
    failed: list[str] = []
    for party in parties:
        checkpoint = _checkpoint(settings, partner.partner_id, module, party, parties)
        state = checkpoint.load() or {"partner": partner.partner_id, "module": module, "completed_until": None,
                                      "crawl": None, "runs": []}
        party_since, party_relative = since, relative
        if since_unless_completed and state.get("completed_until") is not None:
            party_since, party_relative = None, (None, relative[1])
        try:
            reports.append(await _crawl(settings, partner, module, kind, endpoint.url, sink, party, checkpoint,
                                        state, since=party_since, until=until, limit=limit,
                                        relative=party_relative, restart=restart, retry=retry, progress=progress,
                                        transport=transport, sleep=sleep, full=full, not_listed=not_listed,
                                        unlist=unlist))
        except PullError as exc:
            if len(parties) == 1:
                raise
            log.warning("pull of %s from %s for %s/%s failed: %s", module, partner.partner_id, *party or ("?", "?"),
                        exc)
            failed.append(f"{'/'.join(party or ('?', '?'))}: {exc}")
    if failed:
        done = "; ".join(f"{'/'.join(r.party or ('?', '?'))}: {r.objects} objects" for r in reports)
        raise PullError(f"the pull of {module} from {partner.partner_id} failed for {len(failed)} of its "
                        f"{len(parties)} parties ({'; '.join(failed)}); pulled {done or 'nothing'}")
    if len(reports) == 1:
        return reports[0]
    return PullReport(partner.partner_id, module,
                      None if any(r.since is None for r in reports) else min(r.since for r in reports if r.since),
                      max(r.until for r in reports), resumed=any(r.resumed for r in reports),
                      pages=sum(r.pages for r in reports), objects=sum(r.objects for r in reports),
                      invalid=sum(r.invalid for r in reports), foreign=sum(r.foreign for r in reports),
                      rereads=sum(r.rereads for r in reports), retries=sum(r.retries for r in reports),
                      unread=sum(r.unread for r in reports), parties=reports)


async def _crawl(settings: Settings, partner: Partner, module: str, kind: ModuleKind, endpoint_url: str,
                 sink: RecordSink, party: tuple[str, str] | None, checkpoint: Checkpoint,
                 state: dict[str, Any], *, since: datetime | None, until: datetime | None, limit: int,
                 relative: tuple[str | None, str | None], restart: bool, retry: RetryPolicy | None,
                 progress: JobProgress, transport: httpx.AsyncBaseTransport | None,
                 sleep: Callable[[float], Awaitable[None]], full: bool = False, not_listed: NotListed | None = None,
                 unlist: bool = True) -> PullReport:
    """One party's crawl (the GETs addressed to `party`), from and into its checkpoint. `full`: the whole list,
    without date_from, whatever the completed pulls cover (an interrupted crawl of a window is abandoned)."""
    whose = f" for {'/'.join(party)}" if party is not None else ""
    if party is not None:
        state["party"] = list(party)
    crawl = state.get("crawl")
    if crawl and not restart and _moved(crawl, endpoint_url):
        # The partner's endpoint moved (a credentials update re-read it) while the crawl was interrupted: its next
        # page is at the old address, which the crawl may not follow when it is another origin (our token would go
        # there), and which at another path may be gone or another version's list. The same window is crawled
        # again, at the new address (what is read twice is deduplicated).
        log.warning("the %s endpoint of %s is now %s: the interrupted crawl (%s..%s) starts over there", module,
                    partner.partner_id, endpoint_url, crawl["since"], crawl["until"])
        since, until, restart = since or from_iso(crawl["since"]), until or from_iso(crawl["until"]), True
    wanted = (relative[0] or iso(since), relative[1] or iso(until))
    asked = (crawl.get("asked") or [crawl["since"], crawl["until"]]) if crawl else [None, None]
    if crawl and not restart and wanted[0] in (None, asked[0]) and wanted[1] in (None, asked[1]) and not (
            full and crawl["since"] is not None):
        resumed = True
    else:
        if crawl:
            log.warning("starting a new crawl; the interrupted one (%s..%s) is abandoned", crawl["since"],
                        crawl["until"])
        start = None if full else since or from_iso(state.get("completed_until"))
        if module == "sessions" and start is None:
            raise PullError(f"a first Sessions pull{whose} needs --since (date_from is required by the Sessions "
                            "Sender interface, 09 §2.1)")
        started = datetime.now(UTC)
        end = until or started - SETTLE
        if start is not None and start >= end:
            raise PullError(f"nothing to pull: the window starts at {iso(start)}, not before {iso(end)}")
        # A window past what has settled is crawled in two parts: up to the settled point, then the rest (the
        # tail). With a date_to still to come, an object updated mid-crawl stays in the window, moves to the
        # list's end and shifts the objects after it below offsets already passed (X-Total-Count does not drop):
        # in the tail that can skip only objects the next window reads again.
        settled = started - SETTLE
        tail = end > settled and (start is None or start < settled)
        first = with_query(endpoint_url, date_from=format_datetime(start) if start else None,
                           date_to=format_datetime(settled if tail else end), offset=0, limit=limit)
        crawl = {"since": iso(start), "until": iso(end), "asked": list(wanted), "endpoint": endpoint_url,
                 "next_url": first, "limit": limit,
                 "x_limit": None, "total": None, "pages": 0, "objects": 0, "correlation_id": str(uuid.uuid4()),
                 "started_at": iso(started), "tail": tail,
                 # Only a Locations list without date_from and to the default date_to can be complete (full sync).
                 "full": module == "locations" and start is None and wanted[1] is None, "nameless": 0}
        _listed_path(checkpoint).unlink(missing_ok=True)  # an abandoned crawl's
        state["crawl"] = crawl
        checkpoint.save(state)
        resumed = False
    report = PullReport(partner.partner_id, module, from_iso(crawl["since"]), datetime.fromisoformat(crawl["until"]),
                        resumed=resumed, party=party)
    progress.start(f"pull {module} from {partner.partner_id}{whose}", crawl["total"])
    progress.advance(crawl["objects"])
    timeout = httpx.Timeout(settings.partners.outbound_timeout_s)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, transport=transport) as http:
        crawler = _Crawler(settings, partner, module, endpoint_url, http, retry or RetryPolicy(), report,
                           crawl["correlation_id"], sleep, party)
        url: str | None = crawl["next_url"]
        while url or crawl.get("tail"):
            if url is None:  # the settled part is crawled: now the tail, up to date_to
                url = with_query(endpoint_url,
                                 date_from=format_datetime(datetime.fromisoformat(crawl["started_at"]) - SETTLE),
                                 date_to=format_datetime(datetime.fromisoformat(crawl["until"])), offset=0,
                                 limit=crawl["limit"])
                crawl.update(tail=False, next_url=url, total=None, previous_page=None)
                checkpoint.save(state)
            page = await crawler.fetch(url)
            offset, known = query_int(page.url, "offset") or 0, crawl["total"]
            # Again while a re-read finds the total dropped further: more objects left before it meanwhile.
            while known is not None and page.total is not None and page.total < known and offset:
                drop = known - page.total
                reread = with_query(page.url, offset=max(offset - drop, 0),
                                    limit=_page_limit(crawl, page.x_limit, query_int(page.url, "limit")))
                log.info("X-Total-Count dropped from %d to %d: reading %s again", known, page.total, reread)
                report.rereads += 1
                known = page.total
                page = await crawler.fetch(reread)
                offset = query_int(page.url, "offset") or 0
            at, digest = query_int(page.url, "offset") or 0, _page_digest(page.data)
            placed = query_int(page.url, "offset") is not None  # else the partner's links page otherwise (page=N)
            previous: dict[str, Any] = crawl.get("previous_page") or {}
            # Only while the total holds: objects that left the window (a re-read) or entered it can put just the
            # page read last at this offset. A partner that ignores offset is told apart by a page of its own.
            # Without an offset, the page's URL says where it is.
            elsewhere = bool(previous) and (
                previous["offset"] != at or (not placed and previous.get("url") not in (None, page.url)))
            if elsewhere and digest is not None and previous["digest"] == digest and page.total == crawl["total"]:
                here, there = (f"offset {at}", f"offset {previous['offset']}") if placed else \
                    (page.url, previous.get("url") or f"offset {previous['offset']}")
                raise PullError(f"GET {page.url}: the page at {here} holds exactly the objects of the page at "
                                f"{there}: the partner ignores `offset` or its own paging (04 §4.2), so the objects "
                                "after its first page cannot be crawled; the window is left incomplete")

            next_url = _with_window(page.next_url, page.url) if page.next_url is not None else None
            if next_url is not None and (page.total is None or not placed or at >= page.total) \
                    and _page_items(page.data) == 0:
                # A partner that writes a next link on every page, the last too: followed, it leads to ever higher
                # offsets of empty pages, and the crawl would never end. Nothing is left past the announced total,
                # nor, without one (which it must send), past an empty page; nor past an empty page of a partner
                # paging otherwise (`page=N`, a cursor), whose place in the list is not known.
                log.warning("GET %s: an empty page at offset %s, %s, still has a next link; taken as the last page",
                            page.url, at if placed else "?", "without X-Total-Count" if page.total is None else
                            f"at or past the {page.total} objects X-Total-Count announced" if placed else
                            "of a partner paging without offsets")
                next_url = None
            held = _page_items(page.data)
            ahead = query_int(next_url, "offset") if next_url is not None else None
            if ahead is not None and ahead <= at:
                # Back to a page read before (the first, or this one written another way): followed, the crawl
                # would read the same pages again and again, publishing their objects every time.
                raise PullError(f"GET {page.url}: the next link {next_url} goes back to offset {ahead}, not past this "
                                f"page's offset {at}: it is not followed (the crawl would read the same pages for "
                                "ever); ask the partner to fix its Link headers")
            if next_url is not None and held and ahead is not None and ahead > at + held:
                # A server that caps `limit` but writes its next link from the limit asked for (offset + limit, not
                # offset + what the page held): followed, the objects between the two would be skipped for good.
                log.warning("GET %s: the page holds objects %d to %d, but its next link starts at %d; reading from "
                            "%d instead, so none is skipped", page.url, at, at + held - 1, ahead, at + held)
                next_url = with_query(next_url, offset=at + held)

            async def step(page: _Page = page, at: int = at, digest: str | None = digest,
                           next_url: str | None = next_url) -> int:
                sent, listed, nameless = await _process(settings, partner, module, kind, page,
                                                        crawl["correlation_id"], sink, report)
                if crawl.get("full"):  # before the checkpoint: a page read again appends its objects twice, harmless
                    _append_listed(_listed_path(checkpoint), listed)
                    crawl["nameless"] = crawl.get("nameless", 0) + nameless
                report.pages += 1
                report.total = page.total
                crawl.update(total=page.total, x_limit=page.x_limit or crawl["x_limit"], next_url=next_url,
                             pages=crawl["pages"] + 1, objects=crawl["objects"] + sent,
                             previous_page={"offset": at, "url": page.url, "digest": digest}
                             if digest is not None else None)
                checkpoint.save(state)
                return sent

            sent = await uninterrupted(step())  # a page's events and its checkpoint go together
            progress.set_total(page.total)
            progress.advance(sent)
            if next_url == page.url:
                raise PullError(f"GET {page.url}: the next link points at the same page")
            url = next_url
            if url is None and page.total is not None and placed:
                # A page without a next link is the last (04 §4.2), but the partner announced more: its total or
                # its paging is wrong, and the window is taken as read. Said, not guessed past (an offset of our
                # own could be refused, or read objects its wrong total never had). Only where the page's offset is
                # known: a partner's next link may page otherwise (`page=N`), and its last page is not at offset 0.
                read_to = at + (_page_items(page.data) or 0)
                if read_to < page.total:
                    report.unread += page.total - read_to
                    log.warning("GET %s: the last page (no next link) ends at object %d of the %d X-Total-Count "
                                "announced; the %d after it were not read", page.url, read_to, page.total,
                                page.total - read_to)
    # A window asked past what had settled when the crawl started (`--until` later than now − SETTLE) is not
    # complete beyond that: objects the partner stamps after the crawl may still fall before its date_to. The
    # next window starts there (re-reading a little is harmless: the pipeline deduplicates).
    settled = datetime.fromisoformat(crawl["started_at"]) - SETTLE
    ended = datetime.fromisoformat(crawl["until"])
    if ended > settled:
        began = from_iso(crawl["since"])
        ended = settled if began is None else max(began, settled)
    # The next default window starts where everything before it was pulled: a window that began after that point
    # (a one-off --since later than it) leaves a gap the next pull must still cover, and one that ended before it
    # (an old window pulled again) takes nothing back.
    before = from_iso(state.get("completed_until"))
    began = from_iso(crawl["since"])
    if before is None or ((began is None or began <= before) and ended > before):
        state["completed_until"] = iso(ended)
    if module == "locations":
        listed = _read_listed(_listed_path(checkpoint)) if crawl.get("full") else None
        report.not_full = not_a_full_list(crawl, report.unread, listed)
        if report.not_full is None:
            report.listed = listed
            if not_listed is not None:
                report.not_listed = await not_listed(partner, report)
                if unlist and report.not_listed:
                    report.unlisted = await _send_unlists(settings, partner, report, crawl["correlation_id"], sink)
    _listed_path(checkpoint).unlink(missing_ok=True)
    state["crawl"] = None
    state["runs"] = [*state.get("runs", [])[-19:], {
        "since": crawl["since"], "until": crawl["until"], "finished_at": iso(datetime.now(UTC)),
        "pages": crawl["pages"], "objects": crawl["objects"], "total": crawl["total"]}]
    checkpoint.save(state)
    return report


def _with_window(link: str, page_url: str) -> str:
    """A next link with the window's date filters (those of the page it came from) it leaves out. It should keep
    every filter (04 §4.2), but the spec's own example shows only offset and limit: followed as it is, it leaves
    the window (a Sessions Sender refuses it, date_from being required; a list without date_to keeps an object
    updated mid-crawl, at its end, and the objects after it shift below offsets already read, unseen)."""
    present = {key for key, _ in parse_qsl(urlsplit(link).query, keep_blank_values=True)}
    missing = {key: value for key, value in parse_qsl(urlsplit(page_url).query)
               if key in ("date_from", "date_to") and key not in present}
    return with_query(link, **missing) if missing else link


def _page_items(data: bytes) -> int | None:
    """How many objects a page holds (None: no list)."""
    try:
        return len(msgspec.json.decode(data, type=list[msgspec.Raw]))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _page_digest(data: bytes) -> str | None:
    """A fingerprint of a page's objects, to notice a partner that serves the same page at every offset;
    None for an empty page (or data that is no list: `_process` reports that)."""
    try:
        items = msgspec.json.decode(data, type=list[msgspec.Raw])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return hashlib.sha256(data).hexdigest() if items else None


def _page_limit(crawl: dict[str, Any], x_limit: int | None, asked: int | None) -> int:
    """The limit for a URL we build: ours, lowered to the server's X-Limit once known."""
    limit = asked or crawl["limit"]
    server = x_limit or crawl.get("x_limit")
    return min(limit, server) if server else limit


async def _process(settings: Settings, partner: Partner, module: str, kind: ModuleKind, page: _Page,
                   correlation_id: str, sink: RecordSink, report: PullReport,
                   ) -> tuple[int, list[tuple[str, str, str]], int]:
    """Decode the page's objects, send the valid ones to Kafka (acknowledged), record the others. Returns the
    count sent, the identities the page lists (`listed_identity`: of its invalid and foreign objects too) and how
    many of its objects name none."""
    try:
        # No larger than a push body may be (HTTP 413): past what Kafka takes in one record, it would fail the
        # page's send on every rerun, and the window would never complete.
        items = decode_list(page.data, kind.model, profile=partner.profile, max_bytes=MAX_BODY_BYTES)
    except (OcpiJsonError, OcpiValidationError) as exc:
        raise PullError(f"GET {page.url}: data is not a list of {module}: {exc}") from None
    records: list[tuple[str, bytes, dict[str, Any]]] = []
    rejected: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if isinstance(item, OcpiValidationError):
            report.invalid += 1
            rejected.append({"index": index, "path": item.path, "reason": item.reason})
            continue
        value: Any = item.value
        # A push's owner rule (receivers.auth.require_owner); a Hub's list, read without routing headers, may
        # hold any party's objects but those of a party the Hub registered itself (`relays_for`).
        if not partner.may_own(value.country_code, value.party_id) and \
                not partner.relays_for(value.country_code, value.party_id):
            report.foreign += 1
            rejected.append({"index": index, "path": "$",
                             "reason": partner.not_owner_reason(value.country_code, value.party_id)})
            continue
        key = ObjectKey.of(value)
        event = build_event(partner_id=partner.partner_id, module=module, operation=kind.operation,
                            level=kind.level, key=key, decoded=item, payload_type=kind.payload_type, source="PULL",
                            request_id=page.request_id, correlation_id=correlation_id, from_party=page.from_party,
                            to_party=page.to_party)
        try:
            encode_event(event)  # what does not fit the wire schema is recorded, not sent
        except AvroCodecError as exc:
            report.invalid += 1
            rejected.append({"index": index, "path": "$", "reason": f"does not fit the wire schema: {exc}"})
        else:
            records.append((settings.kafka.topic_for(module), key.kafka_key(), event))

    def handed_over() -> Iterator[tuple[str, bytes, bytes]]:
        # Each event is stamped as it is handed to the producer, and acknowledged within the send timeout of that
        # stamp: the deadline sweeps' margin (`pipeline.sweeps`) assumes an event reaches Kafka within the send
        # timeout of its `received_at`, as a push does. Stamped when the page was decoded, an event waited for the
        # sends before it (a slow broker's full batches), and could land after a sweep decided a deadline it answered.
        for topic, kafka_key, event in records:
            yield topic, kafka_key, encode_event({**event, "received_at": datetime.now(UTC)})

    sent = await sink.send_all(handed_over(), within=settings.kafka.send_timeout_s)
    # Recorded once the page's events are acknowledged: a page whose send failed is read again by the rerun.
    if rejected:
        _record_rejected(settings, partner.partner_id, module, page, rejected)
    report.objects += sent
    if module != "locations":  # only a Locations list is the new truth (full sync)
        return sent, [], 0
    named = [listed_identity(bytes(raw)) for raw in msgspec.json.decode(page.data, type=list[msgspec.Raw])]
    return sent, [ident for ident in named if ident is not None], sum(ident is None for ident in named)


def listed_identity(document: bytes) -> tuple[str, str, str] | None:
    """The (country_code, party_id, id) an object of a list names, upper-cased (ObjectKey's identity), read from its
    JSON whether or not the object is valid otherwise: an invalid Location the CPO lists is still listed. None where
    it names none (not an object, one of the three missing, empty or no string)."""
    try:
        named = _named.decode(document)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not (named.country_code and named.party_id and named.id):
        return None
    return ci_normalize(named.country_code), ci_normalize(named.party_id), ci_normalize(named.id)


class _Named(msgspec.Struct):
    country_code: str
    party_id: str
    id: str


_named = msgspec.json.Decoder(_Named)


def not_a_full_list(crawl: dict[str, Any], unread: int,
                    listed: frozenset[tuple[str, str, str]] | None = None) -> str | None:
    """Why a completed Locations crawl is no complete list, which full sync (08 §2.1) may not take as the new truth;
    None when it is one: read without date_from (not a window of `last_updated`) up to the default date_to (an
    earlier one leaves out what the CPO updated since), to its last page with nothing the partner announced left
    unread, every object naming its Location (one that does not could be any stored Location), and naming at least
    as many Locations (`listed`) as its last page's X-Total-Count announced: `unread` knows only a last page at an
    offset, and a partner paging otherwise (a cursor), or sending no total, could have left any number unread."""
    if crawl["since"] is not None:
        return f"a window from {crawl['since']} (date_from): only a list from the beginning is complete"
    if not crawl.get("full"):
        return ("a window to a date_to asked for (--until), or begun by an earlier version: only a list to the "
                "default date_to is complete")
    if unread:
        return f"its last page left {unread} objects X-Total-Count announced unread"
    if crawl.get("nameless"):
        return f"{crawl['nameless']} of its objects name no Location (country_code, party_id and id)"
    if crawl.get("total") is None:
        return "its last page sent no X-Total-Count: whether every object was read cannot be told"
    if listed is not None and len(listed) < crawl["total"]:
        return (f"it named {len(listed)} Locations, fewer than the {crawl['total']} its last page's X-Total-Count "
                "announced")
    return None


def stored_not_listed(client: Client, partner: Partner, report: PullReport) -> list[tuple[str, str, str]]:
    """The stored Locations a complete list (`report.listed`, one party's crawl) does not hold: by 08 §2.1 no longer
    valid. Those received from this partner, of the party the crawl was addressed to (through a Hub, of any party:
    its list holds every connected party's), dated before the list's date_to (`report.until`): one stamped since
    may have left the list for its newer version. Sorted; none for a crawl that was no complete list."""
    if report.listed is None:
        return []
    parameters = {"partner": partner.partner_id, "until": iso(listed_until(report))}
    party = ""
    if report.party is not None and not any(role.role is Role.HUB for role in partner.roles):
        party = " WHERE country_code = {country:String} AND party_id = {party:String}"
        parameters |= {"country": ci_normalize(report.party[0]), "party": ci_normalize(report.party[1])}
    # The current rows first (FINAL), then the conditions on columns outside the key: applied before FINAL
    # (`optimize_move_to_prewhere_if_final`), they could pick an older row of a Location.
    sql = ("SELECT country_code, party_id, location_id FROM (SELECT country_code, party_id, location_id, partner_id, "
           f"last_updated, unlisted FROM locations FINAL{party}) WHERE partner_id = {{partner:String}} "
           "AND last_updated < parseDateTime64BestEffort({until:String}, 6, 'UTC') AND NOT unlisted")
    _columns, rows = select(client, sql, parameters)
    return sorted(ident for ident in ((str(r[0]), str(r[1]), str(r[2])) for r in rows) if ident not in report.listed)


def listed_until(report: PullReport) -> datetime:
    """The date_to of a complete list as the partner was sent it (`format_datetime`: to 100 µs, truncated): the list
    held the Locations updated before it. An UNLIST is dated by it, and so is what OCPI JSON keeps of it."""
    return datetime.fromisoformat(format_datetime(report.until).replace("Z", "+00:00"))


async def _send_unlists(settings: Settings, partner: Partner, report: PullReport, correlation_id: str,
                        sink: RecordSink) -> int:
    """An UNLIST event (`infra.events.unlist_event`) of each stored Location the complete list no longer holds,
    dated by the list's date_to and keyed by the Location like its pushes; acknowledged, as a page's events."""
    topic = settings.kafka.topic_for("locations")
    keys = [ObjectKey(*ident) for ident in report.not_listed or ()]
    until = listed_until(report)

    def handed_over() -> Iterator[tuple[str, bytes, bytes]]:  # stamped as handed over, as a page's events
        for key in keys:
            yield topic, key.kafka_key(), encode_event(unlist_event(
                partner_id=partner.partner_id, key=key, listed_until=until, correlation_id=correlation_id))

    return await sink.send_all(handed_over(), within=settings.kafka.send_timeout_s)


def not_listed_path(settings: Settings, partner_id: str) -> Path:
    return jobs_dir(settings, "pull") / f"{partner_id}.locations.not-listed.jsonl"


def record_not_listed(settings: Settings, report: PullReport, *, unlisted: bool) -> Path:
    """Append what a full Locations crawl found no longer listed (`report.not_listed`) to the partner's
    `not-listed.jsonl`, one line per crawl, for the operator (kept until deleted; ids only, nothing personal).
    `unlisted`: whether they are to be unlisted (not with --no-full-sync)."""
    path = not_listed_path(settings, report.partner)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({"at": iso(datetime.now(UTC)), "party": list(report.party) if report.party else None,
                             "until": iso(report.until), "listed": len(report.listed or ()), "unlist": unlisted,
                             "not_listed": [list(ident) for ident in report.not_listed or ()]}) + "\n")
    return path


def _listed_path(checkpoint: Checkpoint) -> Path:
    """Beside the checkpoint: the identities a full crawl's acknowledged pages listed, one JSON array a line."""
    return checkpoint.path.with_name(checkpoint.path.name.removesuffix(".json") + ".listed.jsonl")


def _append_listed(path: Path, listed: list[tuple[str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.writelines(json.dumps(list(ident)) + "\n" for ident in listed)


def _read_listed(path: Path) -> frozenset[tuple[str, str, str]]:
    if not path.exists():
        return frozenset()
    with path.open() as fh:  # a line cut short by a crash was appended again, whole, when its page was read again
        return frozenset(tuple(json.loads(line)) for line in fh if line.endswith("\n"))


def _record_rejected(settings: Settings, partner_id: str, module: str, page: _Page,
                     rejected: list[dict[str, Any]]) -> None:
    from pipeline.retention import Pseudonymizer, load_key, pseudonymised_element

    raws = msgspec.json.decode(page.data, type=list[msgspec.Raw])
    path = rejected_path(settings, partner_id, module)
    path.parent.mkdir(parents=True, exist_ok=True)
    at = iso(datetime.now(UTC))
    # The file has no age limit: personal identifiers are written as the store's pseudonyms (README, Retention).
    pseudonym = Pseudonymizer(load_key(settings))
    with path.open("a") as fh:
        for entry in rejected:
            document = pseudonymised_element(bytes(raws[entry["index"]]), pseudonym)
            raw = document[:100_000].decode("utf-8", "replace")
            log.warning("GET %s: object %d skipped: %s: %s", page.url, entry["index"], entry["path"], entry["reason"])
            fh.write(json.dumps({"at": at, "url": page.url, "request_id": page.request_id, **entry,
                                 "object": raw}) + "\n")


@dataclass
class ScheduleState:
    """What a schedule has done: counts and the last completed round (a schedule runs for weeks; it keeps
    nothing per round)."""

    runs: int = 0
    failures: int = 0
    last: PullReport | None = None


async def pull_every(interval_s: float, splay_s: float, run_once: Callable[[], Awaitable[PullReport]],
                     stop: asyncio.Event, on_error: Callable[[Exception], None] | None = None) -> ScheduleState:
    """Run `run_once` now and then every `interval_s` + a random splay up to `splay_s` (04 §3: poll rarely,
    with splay), until `stop` is set. A failed run is reported and the next one comes as scheduled; a run in
    progress when `stop` is set is cancelled (its checkpoint holds every acknowledged page)."""
    state = ScheduleState()
    while not stop.is_set():
        state.runs += 1
        current = asyncio.ensure_future(run_once())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([current, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not current.done():
            current.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await current
            break
        try:
            state.last = current.result()
        except Exception as exc:  # a failed round must not end the schedule
            state.failures += 1
            log.warning("scheduled pull failed: %s", exc)
            if on_error is not None:
                on_error(exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s + random.uniform(0, splay_s))
    return state
