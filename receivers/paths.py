"""Object ids in URL paths: one id is one path segment, whatever printable ASCII it holds, `/` included.

OCPI ids are CiStrings (printable ASCII, 02 §9), so an id may hold `/`, which a client sends as `%2F` in
`.../{country_code}/{party_id}/{object_id}` (04 §6.1). ASGI servers (granian too) hand the app a
percent-decoded `path`, and Litestar routes on it: there the id's `/` is a separator, so a Session `2024/05`
found no route, and a Location PATCH for `A/B` was routed as an EVSE PATCH of Location `A`. So the receivers
route on the undecoded `raw_path` instead, in two steps attached once to the app (receivers.app):

- before routing, `OcpiLitestar` replaces the path Litestar routes on with `routing_path`: `raw_path` split
  on a literal `/`, each segment decoded on its own and written back with only `%` and `/` escaped (`%25`,
  `%2F`), so every id stays one routing segment;
- after routing, `DecodePathParams` (app middleware, so before the guard, dependencies and handlers) decodes
  those two escapes in the path parameters: everything after it sees the exact ids.

Without `raw_path` (optional in ASGI) the decoded path is routed: an encoded `/` is then lost, as before.
`transport.request_path` is the routed path (messages, rejection records): an id's `%` and `/` show escaped, so it
says unambiguously what was addressed. `path_segment` is the other direction, for the URLs we hand out.
"""

from __future__ import annotations

from typing import Final, cast
from urllib.parse import quote, unquote, unquote_to_bytes

from litestar import Litestar
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import (
    ASGIApp,
    HTTPScope,
    LifeSpanReceive,
    LifeSpanScope,
    LifeSpanSend,
    Receive,
    Scope,
    Send,
)

from receivers.transport import head_as_get


def _escaped(segment: str) -> str:
    return segment.replace("%", "%25").replace("/", "%2F")


# An empty segment among the ids (`LOC1//1`): Litestar drops it, which shifted the ids after it one level up (EVSE
# `1` of LOC1 instead of Connector `1` of EVSE ''). Routed as a lone `%`, which no escaped segment can be (a real `%`
# is `%25`), it stays a segment, and DecodePathParams turns it back into the empty id it is.
_EMPTY: Final = "%"
# The segments before the ids: /ocpi/emsp/2.2.1/<module> (receivers.locations.PATH, sessions, cdrs). An empty one
# there (`2.2.1//sessions`, a partner joining our base URL and a path that both have the `/`) names no id: it is
# dropped, as Litestar always did.
FIXED_SEGMENTS: Final = 4


def _segments(parts: list[bytes]) -> list[str]:
    routed: list[str] = []
    fixed = 0
    for index, part in enumerate(parts):
        if not part and 0 < index < len(parts) - 1:
            if fixed >= FIXED_SEGMENTS:
                routed.append(_EMPTY)
            continue
        if part:
            fixed += 1
        # Decoded as servers decode `path` (UTF-8, invalid bytes replaced); ids are ASCII, so this is for messages.
        routed.append(_escaped(unquote_to_bytes(part).decode("utf-8", "replace")))
    return routed


def routing_path(scope: Scope) -> str:
    """The path to route on: `raw_path`'s segments, each decoded, with `%` and `/` escaped (module docstring)."""
    raw = scope.get("raw_path")
    if raw is None:
        return scope["path"].replace("%", "%25")  # its segments hold no `/`, but `%` must be escaped all the same
    raw = raw.partition(b"?")[0]  # httpx, so Litestar's TestClient, leaves the query string on it
    if b"%" not in raw and b"//" not in raw:
        return raw.decode("utf-8", "replace")  # the common case: nothing encoded, nothing to escape
    return "/".join(_segments(raw.split(b"/")))


class OcpiLitestar(Litestar):
    """The receivers' app: Litestar routing on `routing_path`, HEAD answered as GET without content
    (transport.head_as_get). Its middleware must include DecodePathParams."""

    __slots__ = ()

    async def __call__(self, scope: Scope | LifeSpanScope, receive: Receive | LifeSpanReceive,
                       send: Send | LifeSpanSend) -> None:
        if scope["type"] == "http":
            scope["path"] = routing_path(scope)
            http = cast("HTTPScope", scope)
            if http["method"] == "HEAD":
                send = head_as_get(http, cast("Send", send))
        await super().__call__(scope, receive, send)


class DecodePathParams(ASGIMiddleware):
    """After routing on `routing_path`: the path parameters with `%25` and `%2F` decoded, i.e. the exact ids."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        params = scope["path_params"]
        if any(isinstance(value, str) and "%" in value for value in params.values()):
            # A new dict: Litestar caches routing results, this dict included, per path.
            scope["path_params"] = {name: ("" if value == _EMPTY else unquote(value)) if isinstance(value, str)
                                    else value for name, value in params.items()}
        await next_app(scope, receive, send)


def path_segment(value: str) -> str:
    """`value` as one URL path segment that clients send back unchanged: every reserved character encoded,
    `/` included, and a whole `.` or `..` too (RFC 3986 clients would resolve those away, §5.2.4; WHATWG URL
    parsers, as in browsers and Node, resolve `%2E` and `%2E%2E` too, which no encoding avoids)."""
    if value in {".", ".."}:
        return value.replace(".", "%2E")
    return quote(value, safe="")
