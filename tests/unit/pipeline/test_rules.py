"""The plain rules: dedup identity, stale, parking deadlines, lifecycle transitions, idle, versions, facts."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from pipeline import lifecycle, ordering
from pipeline.dedup import fingerprint, identity, is_duplicate, level_identity
from pipeline.facts import relevant_change
from pipeline.lifecycle import Transition
from pipeline.projection import next_version, version_of
from pipeline.stage import to_parked

from .builders import Feed, event, evse, iso, session, ts


def test_identity_includes_level_and_sub_ids_case_insensitively() -> None:
    a = event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(1))}, object_id="LOC1", evse_uid="e1")
    b = event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(2))}, object_id="LOC1", evse_uid="E1")
    c = event("EVSE", evse("E1"), object_id="LOC1", evse_uid="E1")
    assert identity(a) == identity(b) == "EVSE|E1|"
    assert is_duplicate(identity(a), fingerprint(a), b)  # last_updated is not content
    assert not is_duplicate(identity(a), fingerprint(a), c)
    assert not is_duplicate("", "", a)


def test_a_put_is_no_duplicate_of_a_patch_with_the_same_body() -> None:
    body = session(kwh="3")
    patch = event("SessionPatch", body, object_id="S1")
    put = event("Session", body)
    assert patch.content_hash == put.content_hash
    assert not is_duplicate(identity(patch), fingerprint(patch), put)  # the PUT replaces what the PATCH merged
    # A PATCH with the body of the PUT applied last changes nothing: a duplicate, however its last_updated moved.
    assert is_duplicate(identity(put), fingerprint(put), patch)
    assert is_duplicate(identity(patch), fingerprint(patch), patch)
    assert is_duplicate(identity(put), fingerprint(put), put)
    assert fingerprint(put) == put.content_hash  # states written before this rule keep recognising PUT retries


def test_ahead_of_receipt_is_strictly_beyond_the_skew() -> None:
    skew = timedelta(minutes=5)
    assert ordering.ahead_of_receipt(ts(6), ts(0), skew) == timedelta(minutes=6)
    assert ordering.ahead_of_receipt(ts(5), ts(0), skew) is None  # at the skew: not flagged
    assert ordering.ahead_of_receipt(ts(-600), ts(0), skew) is None  # late pushes are normal (outages, resends)


def test_stale_is_strictly_older() -> None:
    assert ordering.is_stale(ts(5), ts(4))
    assert not ordering.is_stale(ts(5), ts(5))
    assert not ordering.is_stale(None, ts(0))


def test_parked_events_expire_after_the_ttl_by_event_time() -> None:
    feed = Feed()
    early = to_parked(feed.record(event("SessionPatch", {"kwh": Decimal(1), "last_updated": iso(ts(1))},
                                        object_id="S1", received=0)))
    late = to_parked(feed.record(event("SessionPatch", {"kwh": Decimal(2), "last_updated": iso(ts(2))},
                                       object_id="S1", received=4)))
    waiting, expired = ordering.split_expired([early, late], ts(5), timedelta(minutes=5))
    assert (waiting, expired) == ([early, late], [])
    waiting, expired = ordering.split_expired([early, late], ts(5.5), timedelta(minutes=5))
    assert (waiting, expired) == ([late], [early])


@pytest.mark.parametrize(("previous", "new", "expected"), [
    (None, "COMPLETED", Transition.INITIAL),
    ("PENDING", "ACTIVE", Transition.LEGAL),
    ("RESERVATION", "ACTIVE", Transition.LEGAL),
    ("RESERVATION", "COMPLETED", Transition.LEGAL),
    ("PENDING", "INVALID", Transition.LEGAL),
    ("ACTIVE", "ACTIVE", Transition.LEGAL),
    ("ACTIVE", "PENDING", Transition.ILLEGAL),
    ("PENDING", "RESERVATION", Transition.ILLEGAL),
    ("COMPLETED", "ACTIVE", Transition.REJECTED),
    ("COMPLETED", "INVALID", Transition.REJECTED),
    ("INVALID", "COMPLETED", Transition.REJECTED),
    ("COMPLETED", "COMPLETED", Transition.UPDATE_AFTER_FINAL),
])
def test_lifecycle_transitions(previous: str | None, new: str, expected: Transition) -> None:
    assert lifecycle.classify(previous, new) is expected
    assert lifecycle.is_applied(expected) is (expected is not Transition.REJECTED)


def test_idle_only_in_open_states_and_after_the_limit() -> None:
    hour = timedelta(hours=1)
    assert lifecycle.idle_since("ACTIVE", ts(0), ts(61), hour)
    assert not lifecycle.idle_since("ACTIVE", ts(0), ts(60), hour)
    assert not lifecycle.idle_since("COMPLETED", ts(0), ts(600), hour)
    assert not lifecycle.idle_since("RESERVATION", ts(0), ts(600), hour)
    assert lifecycle.idle_since("PENDING", ts(0), ts(61), hour)  # README: a PENDING/ACTIVE session is flagged


def test_versions_follow_last_updated_and_always_grow() -> None:
    v = next_version(0, ts(0))
    assert v == version_of(ts(0)) * 1000
    assert next_version(v, ts(0)) == v + 2  # equal timestamp: still newer, and above a retention rewrite (v + 1)
    assert next_version(v + 1, ts(1)) == version_of(ts(1)) * 1000
    assert next_version(v + 5, ts(0) - timedelta(seconds=1)) == v + 7  # never goes back


def test_facts_are_relevant_for_keys_and_status_or_amounts_once_final() -> None:
    from pipeline.facts import session_fact
    from pipeline.retention import Pseudonymizer

    pseudonym = Pseudonymizer(b"k" * 32)

    def fact(body: dict, final: bool = False):  # type: ignore[no-untyped-def]
        payload = event("Session", body).payload
        return session_fact(payload, partner_id="p", version=1, received_at=ts(0), final_at=ts(0) if final else None,
                            pseudonym=pseudonym)

    active = fact(session(kwh="1"))
    assert relevant_change(None, active)
    assert not relevant_change(active, fact(session(kwh="2")))
    assert relevant_change(active, fact(session(kwh="2", status="COMPLETED"), final=True))
    done = fact(session(kwh="2", status="COMPLETED"), final=True)
    assert relevant_change(done, fact(session(kwh="3", status="COMPLETED"), final=True))
    assert relevant_change(active, fact(session(kwh="1", authref="AUTH-9")))


def test_struct_json_writes_the_same_bytes_as_ocpi_canonical() -> None:
    import json

    from ocpi import model
    from ocpi.canonical import to_ocpi_json
    from ocpi.decode import decode
    from pipeline.wire import struct_json

    from .builders import _JSON, cdr, location

    bodies = [("Location", location(publish=False, publish_allowed_to=[{"uid": "T", "type": "RFID"}])),
              ("Session", session(authref="A", cost="1.5", end=30, periods=[])), ("CDR", cdr(credit=True,
                                                                                          credit_reference="C0"))]
    for name, body in bodies:
        value = decode(_JSON.encode(body), getattr(model, name)).value
        assert struct_json(value) == to_ocpi_json(value)
        assert b":null" not in struct_json(value)
    body = {**json.loads(_JSON.encode(session())), "last_updated": "2026-01-01T00:00:00.1234Z"}
    fractional = decode(json.dumps(body), model.Session).value
    assert struct_json(fractional) == to_ocpi_json(fractional)
    assert b'"last_updated":"2026-01-01T00:00:00.1234Z"' in struct_json(fractional)


def test_identity_escapes_the_escape_character_too() -> None:
    # EVSE "A|B" is escaped to "A%7CB"; an EVSE whose uid is literally "A%7CB" is another object.
    assert level_identity("CONNECTOR", "A|B", "C") != level_identity("CONNECTOR", "A%7CB", "C")
    assert level_identity("EVSE", "A%B") != level_identity("EVSE", "A%25B")
