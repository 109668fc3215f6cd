"""Fuzzed bodies on every push endpoint (hypothesis): valid bodies with one part replaced, removed or added,
arbitrary JSON, and bytes that are not JSON.

Whatever the body: never an HTTP 5xx (the fake sink always acknowledges), always an OCPI envelope; a 1000
published exactly one record that decodes; anything else published nothing, and a 2001 on parsed JSON names
the failing field by its JSON path. A body that is not JSON because a string in it is not UTF-8 is HTTP 400,
whatever else it holds. `database=None`: no example database in the working tree.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.codec import decode_event
from ocpi.datetime import parse_datetime
from tests.unit.receivers.app_support import make_env  # noqa: F401
from tests.unit.receivers.push_support import (  # noqa: F401
    CDRS_URL,
    CONNECTOR_URL,
    EVSE_URL,
    LOCATION_URL,
    PATCHED,
    SESSION_URL,
    Pushes,
    cdr,
    connector,
    evse,
    location,
    make_pushes_fixture,
    pushes_fixture,
    session,
)

ENDPOINTS: list[tuple[str, str, Callable[[], Any]]] = [
    ("PUT", LOCATION_URL, location),
    ("PUT", EVSE_URL, evse),
    ("PUT", CONNECTOR_URL, connector),
    ("PATCH", LOCATION_URL, lambda: {"name": "Gent", "evses": location()["evses"], "last_updated": PATCHED}),
    ("PATCH", EVSE_URL, lambda: {"status": "CHARGING", "connectors": [connector()], "last_updated": PATCHED}),
    ("PATCH", CONNECTOR_URL, lambda: {"tariff_ids": ["12"], "max_voltage": 400, "last_updated": PATCHED}),
    ("PUT", SESSION_URL, session),
    ("PATCH", SESSION_URL, lambda: {"kwh": 1.5, "charging_periods": session()["charging_periods"],
                                    "status": "ACTIVE", "last_updated": PATCHED}),
    ("POST", CDRS_URL, cdr),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=60)
    | st.sampled_from(["", "#NA", "2015-06-29T20:39:09Z", "2015-06-29T20:39:09+01:00", "BE", "BEC", "LOC1",
                       "3256", "1", "AVAILABLE", "ENERGY", "x" * 300]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every location in a JSON tree (the root included), as key/index tuples."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from paths(value, (*prefix, index))


@st.composite
def mutated(draw: st.DrawFn, body: Any) -> Any:
    """A copy of `body` with one location replaced by any JSON, removed, or given an extra key."""
    body = copy.deepcopy(body)
    where = draw(st.sampled_from(list(paths(body))))
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if not where:
        return draw(json_values) if action == "replace" else body
    parent = body
    for step in where[:-1]:
        parent = parent[step]
    last = where[-1]
    if action == "replace":
        parent[last] = draw(json_values)
    elif action == "remove":
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=20))] = draw(json_values)
    return body


# Number spellings json.dumps never writes: exponents (a zero with a huge one), signed zeros, trailing zeros,
# more decimals or digits than decimal(18, 4) keeps, beyond any float.
NUMBER_LITERALS = ["0e999999999", "-0E+400000", "1e2", "1E-5", "-0", "-0.0", "1.00000", "12345678901234.5678",
                   "99999999999999.99995", "1e14", "0.00001", "1e400", "1e-400", "2.5e+1", "400.0"]
_NUMBER_SLOT = "\x00number\x00"


@st.composite
def with_number_literal(draw: st.DrawFn, body: Any) -> bytes:
    """`body` with one location (replaced by a slot) written as one of NUMBER_LITERALS."""
    body = copy.deepcopy(body)
    where = draw(st.sampled_from(list(paths(body))[1:]))
    parent = body
    for step in where[:-1]:
        parent = parent[step]
    parent[where[-1]] = _NUMBER_SLOT
    literal = draw(st.sampled_from(NUMBER_LITERALS))
    return json.dumps(body).replace(json.dumps(_NUMBER_SLOT), literal).encode()


def bodies(factory: Callable[[], Any]) -> st.SearchStrategy[bytes]:
    as_json = st.one_of(mutated(factory()), mutated(factory()).flatmap(mutated), json_values)
    return st.one_of(as_json.map(lambda value: json.dumps(value).encode()),
                     with_number_literal(factory()),
                     st.binary(max_size=80),
                     st.just(json.dumps(factory()).encode()).map(lambda raw: raw[: len(raw) // 2]))


@pytest.mark.parametrize(("method", "url", "factory"), ENDPOINTS,
                         ids=[f"{method} {url.rsplit('/2.2.1/', 1)[1]}" for method, url, _ in ENDPOINTS])
def test_any_body_gets_a_valid_envelope_and_never_a_5xx(pushes: Pushes, method: str, url: str,
                                                          factory: Callable[[], Any]) -> None:
    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(raw=bodies(factory))
    def check(raw: bytes) -> None:
        before = len(pushes.env.sink.records)
        response = pushes.request(method, url, raw=raw)
        assert response.status_code < 500, response.text
        envelope = response.json()
        assert isinstance(envelope, dict) and type(envelope["status_code"]) is int, response.text
        parse_datetime(envelope["timestamp"])
        published = pushes.env.sink.records[before:]
        if envelope["status_code"] == 1000:
            assert response.status_code in (200, 201)
            [(_topic, _key, value)] = published
            assert decode_event(value).operation == method
        else:
            assert published == [], "a refused push was published"
            assert envelope["status_code"] in (2000, 2001) and isinstance(envelope["status_message"], str)
            if envelope["status_code"] == 2001 and response.status_code == 200:
                assert envelope["status_message"].startswith("$"), envelope["status_message"]

    check()


# Byte sequences that are no UTF-8 (RFC 8259 §8.1: JSON text is UTF-8): a lone continuation byte, a truncated
# sequence, an encoded surrogate, an overlong encoding, bytes UTF-8 never uses.
INVALID_UTF8 = [b"\xff", b"\x80", b"ab\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80",
                b"\xfe\xff"]
# Top-level fields of one level or another of the Location tree (a field of another level is refused by name).
TREE_FIELDS = ["status", "evses", "connectors", "name", "standard", "uid", "capabilities", "max_voltage"]
_TEXT_SLOT = "\x00text\x00"


@st.composite
def with_invalid_utf8(draw: st.DrawFn, body: Any) -> bytes:
    """`body`, maybe with a field of some level of the Location tree added, and one value written as a string
    that is no UTF-8."""
    body = copy.deepcopy(body)
    if draw(st.booleans()):
        body[draw(st.sampled_from(TREE_FIELDS))] = draw(json_values)
    where = draw(st.sampled_from(list(paths(body))[1:]))
    parent = body
    for step in where[:-1]:
        parent = parent[step]
    parent[where[-1]] = _TEXT_SLOT
    text = b'"' + draw(st.sampled_from(INVALID_UTF8)) + b'"'
    return json.dumps(body).encode().replace(json.dumps(_TEXT_SLOT).encode(), text)


@pytest.mark.parametrize(("method", "url", "factory"), ENDPOINTS,
                         ids=[f"{method} {url.rsplit('/2.2.1/', 1)[1]}" for method, url, _ in ENDPOINTS])
def test_a_body_with_a_string_that_is_not_utf8_is_not_json(pushes: Pushes, method: str, url: str,
                                                             factory: Callable[[], Any]) -> None:
    """HTTP 400 (05 §2: a body that is not valid JSON MUST be), whatever field the body also holds: a field of
    another level of the Location tree was refused first, as valid JSON (HTTP 200, 2001 naming that field)."""
    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(raw=with_invalid_utf8(factory()))
    def check(raw: bytes) -> None:
        before = len(pushes.env.sink.records)
        response = pushes.request(method, url, raw=raw)
        envelope = response.json()
        assert response.status_code == 400, (raw, response.text)
        assert envelope["status_code"] == 2001 and "not valid JSON" in envelope["status_message"], response.text
        parse_datetime(envelope["timestamp"])
        assert pushes.env.sink.records[before:] == [], "a refused push was published"

    check()
