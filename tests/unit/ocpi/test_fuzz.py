"""Property tests: decode never raises anything but OcpiValidationError / OcpiJsonError.

`database=None`: no example database is written into the working tree.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocpi import (
    CompatProfile,
    Decoded,
    OcpiJsonError,
    OcpiValidationError,
    Relaxation,
    content_hash,
    decode,
    decode_list,
    to_ocpi_json,
)
from ocpi.model import CDR, CdrDimension, Credentials, Location, LocationPatch, Session, SessionPatch, Tariff

from .samples import minimal
from .support import example

EVERYTHING = CompatProfile.from_names(list(Relaxation))
PROFILES = st.sampled_from([None, EVERYTHING, CompatProfile.from_names("NULL_IN_LIST,STRING_AS_NUMBER")])
MODELS = st.sampled_from([Session, SessionPatch, Location, LocationPatch, CDR, Tariff, Credentials])

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "#NA",
            "2015-06-29T20:39:09Z",
            "2015-06-29T20:39:09+01:00",
            "2015-06-29T20:39:09.1234567Z",
            "12.5",
            "1e999999",
            "-0",
            "ACTIVE",
            "ENERGY",
            "\u0000",
            "é",
        ]
    ),
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)


def _check(body: bytes, model: type, profile: CompatProfile | None) -> None:
    try:
        decoded: Decoded[Any] = decode(body, model, profile=profile)
    except (OcpiValidationError, OcpiJsonError):
        return
    # Whatever decodes must also hash, and re-encode as OCPI JSON that decodes again.
    content_hash(decoded.value)
    decode(to_ocpi_json(decoded.value), model, profile=profile)


@settings(database=None)
@given(value=JSON, model=MODELS, profile=PROFILES)
def test_random_json(value: Any, model: type, profile: CompatProfile | None) -> None:
    _check(json.dumps(value).encode(), model, profile)


@settings(database=None)
@given(body=st.binary(max_size=200), model=MODELS, profile=PROFILES)
def test_random_bytes(body: bytes, model: type, profile: CompatProfile | None) -> None:
    _check(body, model, profile)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


def _mutate(data: st.DataObject, document: Any) -> Any:
    document = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        path = data.draw(st.sampled_from(_paths(document)))
        if not path:
            document = data.draw(JSON)
            continue
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        action = data.draw(st.sampled_from(["replace", "delete", "wrap", "duplicate"]))
        if action == "replace":
            parent[path[-1]] = data.draw(JSON)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "wrap":
            parent[path[-1]] = [parent[path[-1]]]
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
    return document


VALID_DOCUMENTS = [
    (example("session_example_2_short_finished.json"), Session),
    (example("session_patch_example_total_cost.json"), SessionPatch),
    (example("location_example.json"), Location),
    (minimal("CDR"), CDR),
    (example("tariff_4_complex.json"), Tariff),
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(data=st.data(), index=st.integers(min_value=0, max_value=len(VALID_DOCUMENTS) - 1), profile=PROFILES)
def test_mutated_valid_documents(data: st.DataObject, index: int, profile: CompatProfile | None) -> None:
    document, model = VALID_DOCUMENTS[index]
    _check(json.dumps(_mutate(data, document)).encode(), model, profile)


def test_deep_nesting_is_a_json_error_not_a_crash() -> None:
    body = b'{"kwh": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for profile in (None, EVERYTHING):
        with pytest.raises(OcpiJsonError, match="nests too deeply"):
            decode(body, Session, profile=profile)
    with pytest.raises(OcpiJsonError, match="nests too deeply"):  # a pulled page: msgspec's RecursionError
        decode_list(b"[" + body + b"]", Session)


def test_invalid_utf8_is_a_json_error_not_a_crash() -> None:
    """msgspec raises UnicodeDecodeError (not DecodeError) for invalid UTF-8 inside a string or key."""
    for body in (b'{"meter_id": "\xff"}', b'{"meter_id": "a\xc3"}', b'{"meter_id": "\xed\xa0\x80"}'):
        for model in (Session, SessionPatch):
            for profile in (None, EVERYTHING):
                with pytest.raises(OcpiJsonError, match="not UTF-8"):
                    decode(body, model, profile=profile)
        [error] = decode_list(b"[" + body + b"]", Session)  # a bad element of a pulled page, reported in place
        assert isinstance(error, OcpiValidationError) and "not UTF-8" in str(error)


def test_huge_numbers_are_validation_errors() -> None:
    for text in (b"1" * 5000, b"1e-99999999999999999999", b"-" + b"9" * 400, b'"' + b"9" * 5000 + b'"'):
        body = b'{"type": "ENERGY", "volume": ' + text + b"}"
        for profile in (None, EVERYTHING):
            with pytest.raises(OcpiValidationError) as info:
                decode(body, CdrDimension, profile=profile)
            assert info.value.path in ("$", "$.volume")
