"""The OCPI HTTP client for our calls to partners: versions discovery and the credentials handshake.

- Every call has a timeout (`OCPI_OUTBOUND_TIMEOUT`, for the whole call: httpx's own bounds each wait for a
  chunk, so an answer sent a byte at a time would last as long as the partner likes) and a bounded response size.
- Redirects are never followed: a redirect may drop the Authorization header or hand it to another host, so
  it is reported as an error naming the target, and the operator fixes the URL.
- `Authorization: Token base64(token)`, or the raw token for partners whose profile enables RAW_TOKEN.
- Every request carries fresh X-Request-ID/X-Correlation-ID; configuration modules carry no routing headers.
- Errors say what failed (URL, HTTP status, OCPI status and message) and never contain the token.
- Responses must be OCPI envelopes: `status_code` an int, `timestamp` an OCPI DateTime (a numeric offset or an
  over-long fraction only under the partner's DATETIME_OFFSET or DATETIME_EXCESS_PRECISION relaxation). Bodies
  are decoded with ocpi.decode, so unknown versions and unknown module identifiers are skipped, not fatal
  (06 §1-2).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlparse

import httpx
import msgspec

from ocpi.canonical import to_ocpi_json
from ocpi.compat import CompatProfile
from ocpi.decode import UNPARSABLE, OcpiJsonError, OcpiValidationError, decode, decode_list, unparsable_reason
from ocpi.model import Credentials, Endpoint, InterfaceRole, ModuleID, Version, VersionDetails
from ocpi.status import OcpiStatus
from receivers.transport import OcpiError, parse_timestamp

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS: Final = ("2.2.1",)  # best first
MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
_KNOWN_MODULES: Final = frozenset(m.value for m in ModuleID)


class PartnerApiError(Exception):
    """A call to a partner failed (unreachable, timeout, redirect, HTTP error, not OCPI, non-1xxx status).

    During a handshake we answer 3001 for it. `ocpi_status`/`http_status` are the partner's, when it answered.
    `excerpt`, the start of a body that was not an envelope, is in the message (for the operator) but not in
    `summary`, what a partner is told: the URL we called is the caller's choice, possibly an internal service.
    """

    def __init__(self, message: str, *, http_status: int | None = None, ocpi_status: int | None = None,
                 excerpt: str | None = None, not_sent: bool = False) -> None:
        super().__init__(message if excerpt is None else f"{message}: {excerpt!r}")
        self.summary = message
        self.http_status = http_status
        self.ocpi_status = ocpi_status
        self.not_sent = not_sent

    @property
    def without_effect(self) -> bool:
        """Whether the request surely changed nothing at the partner: never sent (no connection), or refused (an
        OCPI status outside 1xxx, HTTP 3xx or 4xx). Otherwise (no answer in time, a connection lost, HTTP 5xx
        without an envelope, as a proxy's timeout, or a success answer we cannot use) it may have taken effect."""
        if self.not_sent or (self.ocpi_status is not None and not 1000 <= self.ocpi_status < 2000):
            return True
        return self.http_status is not None and 300 <= self.http_status < 500


class VersionMismatch(PartnerApiError):
    """No version in common (3002)."""


class EndpointsMissing(PartnerApiError):
    """The partner lacks the endpoints we need (3003)."""


class Envelope(msgspec.Struct):
    """A partner's response envelope; `data` kept raw for a typed decode afterwards."""

    status_code: int
    timestamp: str
    status_message: str | None = None
    # msgspec.Raw cannot be part of a union: an absent or null `data` is the raw text `null`.
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


_envelope_decoder = msgspec.json.Decoder(Envelope)


def authorization(token: str, *, raw: bool = False) -> str:
    """The Authorization header value: Base64 (2.2.1-d2), or the raw token for RAW_TOKEN partners."""
    return f"Token {token}" if raw else "Token " + base64.b64encode(token.encode()).decode("ascii")


class Discovery(msgspec.Struct, frozen=True):
    """What a partner's versions URL told us: the chosen version, its details URL and its endpoints."""

    versions_url: str
    version: str
    details_url: str
    endpoints: list[Endpoint]
    offered: list[str]

    def endpoint(self, identifier: str, role: str | None = None) -> Endpoint | None:
        return next((e for e in self.endpoints
                     if e.identifier == identifier and (role is None or e.role == role)), None)

    @property
    def credentials_url(self) -> str:
        endpoint = self.endpoint(ModuleID.CREDENTIALS)
        if endpoint is None:  # require_endpoints() rules this out before anyone asks
            raise EndpointsMissing(f"{self.details_url} lists no credentials endpoint")
        return endpoint.url


def require_endpoints(discovery: Discovery, ours: Iterable[Endpoint]) -> None:
    """Raise EndpointsMissing unless the partner has a credentials endpoint and one module in common with us.

    In common: a module we serve as RECEIVER that it serves as SENDER (or the reverse), so at least one
    direction of data exchange is possible. Without it, a connection would carry nothing.
    """
    if discovery.endpoint(ModuleID.CREDENTIALS) is None:
        raise EndpointsMissing(f"version {discovery.version} details at {discovery.details_url} list no "
                               "credentials endpoint (required for every implementation)")
    counterpart = {InterfaceRole.RECEIVER: InterfaceRole.SENDER, InterfaceRole.SENDER: InterfaceRole.RECEIVER}
    theirs = {(e.identifier, e.role) for e in discovery.endpoints}
    wanted = sorted({(e.identifier, counterpart[e.role])
                     for e in ours if e.identifier != ModuleID.CREDENTIALS})
    if not any(w in theirs for w in wanted):
        offered = ", ".join(sorted(f"{i} {r}" for i, r in theirs)) or "nothing"
        need = ", ".join(f"{i} {r}" for i, r in wanted)
        raise EndpointsMissing(f"no module in common: we need one of [{need}]; "
                               f"{discovery.details_url} offers [{offered}]")


class OcpiClient:
    """Calls one partner with one token. Use as an async context manager."""

    def __init__(self, token: str, *, profile: CompatProfile | None = None, timeout: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._token = token
        self._profile = profile or CompatProfile()
        self._timeout = timeout
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False,
                                       transport=transport, headers={"Accept": "application/json"})

    async def __aenter__(self) -> OcpiClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._http.aclose()

    async def call(self, method: str, url: str, *, body: Any = None) -> Envelope:
        """One OCPI request; returns the envelope of a 1xxx answer, raises PartnerApiError otherwise."""
        _check_url(url)
        headers = {"Authorization": authorization(self._token, raw=self._profile.raw_token),
                   "X-Request-ID": str(uuid.uuid4()), "X-Correlation-ID": str(uuid.uuid4())}
        content = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = body if isinstance(body, bytes) else msgspec.json.encode(body)
        try:
            async with asyncio.timeout(self._timeout), \
                    self._http.stream(method, url, headers=headers, content=content) as response:
                raw = await _read_limited(response, url)
        except httpx.ConnectTimeout:  # no connection: nothing was sent
            raise PartnerApiError(f"{method} {url}: no answer within the timeout", not_sent=True) from None
        except (httpx.TimeoutException, TimeoutError):
            raise PartnerApiError(f"{method} {url}: no answer within the timeout") from None
        except (httpx.ConnectError, httpx.InvalidURL, ValueError) as exc:
            # InvalidURL and ValueError (e.g. an IDNA error) come from a host httpx cannot connect to.
            raise PartnerApiError(f"{method} {url}: {type(exc).__name__}: {exc}", not_sent=True) from None
        except httpx.HTTPError as exc:  # the connection broke (read, write, protocol): it may have been received
            raise PartnerApiError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
        log.info("%s %s -> HTTP %s", method, url, response.status_code)
        if response.is_redirect:
            target = response.headers.get("location", "?")
            raise PartnerApiError(f"{method} {url}: redirected (HTTP {response.status_code}) to {target}; "
                                  "redirects are not followed, they could drop or leak the Authorization "
                                  "header: use the final URL", http_status=response.status_code)
        envelope = self._envelope(method, url, response.status_code, raw)
        if response.status_code == 401:
            raise PartnerApiError(f"{method} {url}: the partner refused our token (HTTP 401"
                                  f"{_detail(envelope)})", http_status=401, ocpi_status=envelope.status_code)
        if not OcpiStatus.SUCCESS <= envelope.status_code < 2000 or response.status_code >= 300:
            raise PartnerApiError(f"{method} {url}: HTTP {response.status_code}, OCPI status "
                                  f"{envelope.status_code}{_detail(envelope)}",
                                  http_status=response.status_code, ocpi_status=envelope.status_code)
        return envelope

    def _envelope(self, method: str, url: str, http_status: int, raw: bytes) -> Envelope:
        try:
            envelope = _envelope_decoder.decode(raw)
        except UNPARSABLE as exc:
            reason = unparsable_reason(exc)
            snippet = raw[:120].decode("utf-8", "replace")
            raise PartnerApiError(f"{method} {url}: HTTP {http_status}, not an OCPI response envelope ({reason})",
                                  http_status=http_status, excerpt=snippet) from None
        try:
            parse_timestamp(envelope.timestamp, self._profile, what="envelope timestamp")
        except OcpiError as exc:
            raise PartnerApiError(f"{method} {url}: {exc.message}", http_status=http_status,
                                  ocpi_status=envelope.status_code) from None
        return envelope

    async def versions(self, url: str) -> list[Version]:
        data = _require_data(await self.call("GET", url), url)
        try:
            items = decode_list(bytes(data), Version, profile=self._profile)
        except (OcpiJsonError, OcpiValidationError) as exc:
            raise PartnerApiError(f"GET {url}: data is not a list of versions: {exc}") from None
        versions = [item.value for item in items if not isinstance(item, OcpiValidationError)]
        for item in items:
            if isinstance(item, OcpiValidationError):
                log.warning("GET %s: skipped an invalid version entry: %s", url, item)
        return versions

    async def version_details(self, url: str) -> VersionDetails:
        data = _require_data(await self.call("GET", url), url)
        try:
            details = decode(bytes(data), VersionDetails, profile=self._profile).value
        except (OcpiJsonError, OcpiValidationError) as exc:
            raise PartnerApiError(f"GET {url}: data is not version details: {exc}") from None
        known = [e for e in details.endpoints if e.identifier in _KNOWN_MODULES]
        for endpoint in known:
            # Stored and called later (pulls, credentials PUT/DELETE): a relative URL would fail every call.
            problem = url_problem(endpoint.url)
            if problem is not None:
                raise PartnerApiError(f"GET {url}: the {endpoint.identifier} {endpoint.role} endpoint "
                                      f"{endpoint.url!r} is {problem}")
        return VersionDetails(version=details.version, endpoints=known)

    async def discover(self, versions_url: str) -> Discovery:
        """GET versions, pick the best version we both speak, GET its details (06 §3)."""
        offered = await self.versions(versions_url)
        by_version = {v.version: v for v in offered}
        chosen = next((by_version[v] for v in SUPPORTED_VERSIONS if v in by_version), None)
        names = [v.version for v in offered]
        if chosen is None:
            raise VersionMismatch(f"{versions_url} offers {', '.join(names) or 'no version'}; we speak "
                                  f"{', '.join(SUPPORTED_VERSIONS)}")
        details = await self.version_details(chosen.url)
        if details.version != chosen.version:
            # The spec's own examples say "2.2" in 2.2.1 details (digest ambiguity 18): the versions list's
            # association is what counts.
            log.warning("version details at %s say %r, listed as %r",
                        chosen.url, details.version, chosen.version)
        return Discovery(versions_url=versions_url, version=chosen.version, details_url=chosen.url,
                         endpoints=list(details.endpoints), offered=names)

    async def credentials(self, method: str, url: str, body: Credentials | None = None) -> Credentials | None:
        """POST/PUT our credentials (returns theirs), GET theirs, or DELETE (returns None)."""
        payload = to_ocpi_json(body) if body is not None else None
        envelope = await self.call(method, url, body=payload)
        if method == "DELETE":
            return None
        data = _require_data(envelope, url)
        try:
            return decode(bytes(data), Credentials, profile=self._profile).value
        except (OcpiJsonError, OcpiValidationError) as exc:
            raise PartnerApiError(f"{method} {url}: data is not a Credentials object: {exc}") from None


def _require_data(envelope: Envelope, url: str) -> msgspec.Raw:
    if bytes(envelope.data).strip() == b"null":
        raise PartnerApiError(f"{url}: the response envelope has no data")
    return envelope.data


def _detail(envelope: Envelope) -> str:
    return f": {envelope.status_message}" if envelope.status_message else ""


def url_problem(url: str) -> str | None:
    """Why `url` cannot be requested (not absolute http(s), bad port, bad IPv6 or IDNA host), or None."""
    try:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            return "not an absolute http(s) URL"
        _ = parsed.port  # ValueError when out of range
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        return f"not a usable URL ({exc})"
    return None


def _check_url(url: str) -> None:
    problem = url_problem(url)
    if problem is not None:
        raise PartnerApiError(f"{url!r} is {problem}", not_sent=True)


async def _read_limited(response: httpx.Response, url: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise PartnerApiError(f"{url}: response larger than {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
