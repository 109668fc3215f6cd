"""Facts: what stage 1 (per object) tells stage 2 (per CPO party) about Sessions and CDRs.

Reconciliation and credit links join objects with different Kafka keys (a CDR and its Session, a credit CDR and
the CDR it credits). Stage 1 publishes a fact for every relevant change to the party-facts topic keyed by the
owning CPO party, so one partition (one worker, one table partition) sees all of a party's sessions and CDRs
in order. One Kafka record carries all of a party's facts from one batch (`FactBatch`), which keeps the
internal topic's record count — and Faust's per-record cost — small; when they are too many for one record
Kafka accepts, several records of that party carry them in order (`fact_records`).

Match keys that are personal data (token, authorization reference) travel pseudonymised (`retention.pseudonym`),
so stage-2 state and the internal topic never hold them in clear.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import msgspec

from ocpi.identity import ci_normalize, owner_key_part


class SessionFact(msgspec.Struct, tag="S", kw_only=True, frozen=True):
    session_id: str  # upper-cased
    partner_id: str
    version: int  # the session's row version: stage 2 ignores facts it has seen
    status: str
    start: datetime
    end: datetime | None
    kwh: Decimal
    cost_excl_vat: Decimal | None
    currency: str
    authorization_reference: str | None  # pseudonymised
    token: str  # pseudonymised (country_code, party_id, uid) of the CdrToken
    location_id: str  # upper-cased
    received_at: datetime  # event time of the change
    final_at: datetime | None  # event time the session became COMPLETED/INVALID


class CdrFact(msgspec.Struct, tag="C", kw_only=True, frozen=True):
    cdr_id: str  # upper-cased
    partner_id: str
    session_id: str | None  # upper-cased
    authorization_reference: str | None  # pseudonymised
    token: str
    location_id: str
    start: datetime
    end: datetime
    total_energy: Decimal
    cost_excl_vat: Decimal
    currency: str
    # total_cost.incl_vat (None: the CDR gives none); UNSET in a fact written before it travelled (unknown).
    cost_incl_vat: Decimal | msgspec.UnsetType | None = msgspec.UNSET
    credit: bool
    credit_reference_id: str | None  # upper-cased
    received_at: datetime
    # home_charging_compensation (absent: false); UNSET in a fact written before it travelled (unknown).
    home_charging_compensation: bool | msgspec.UnsetType = msgspec.UNSET


Fact = SessionFact | CdrFact


class FactBatch(msgspec.Struct, kw_only=True, frozen=True):
    facts: list[Fact]


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(FactBatch)


# The most one party-facts record carries. A Kafka broker refuses a larger record batch than its
# `message.max.bytes` (1 MB by default) for good, which stage 1's publish would retry forever; a batch of a few
# thousand records of one party (a catch-up after a restart) makes more facts than that.
FACT_RECORD_MAX_BYTES: Final = 512 * 1024


def encode_facts(facts: list[Fact]) -> bytes:
    return _ENCODER.encode(FactBatch(facts=facts))


def fact_records(facts: list[Fact], limit: int = FACT_RECORD_MAX_BYTES) -> list[bytes]:
    """A party's facts as record values in order: one, or several of at most `limit` bytes each (one fact
    alone may exceed it)."""
    encoded = encode_facts(facts)
    if len(encoded) <= limit or len(facts) <= 1:
        return [encoded]
    half = len(facts) // 2
    return fact_records(facts[:half], limit) + fact_records(facts[half:], limit)


def decode_facts(data: bytes) -> list[Fact]:
    return _DECODER.decode(data).facts


def party_key(country_code: str, party_id: str) -> str:
    """The party-facts Kafka key: `CC/PID` upper-cased, a `/` in either escaped (`owner_key_part`)."""
    return f"{owner_key_part(country_code)}/{owner_key_part(party_id)}"


# Fields whose change matters to reconciliation: for a session still open only its matching keys and status;
# once final also the amounts that deltas are computed from.
_MATCH_FIELDS: Final = ("status", "authorization_reference", "token", "location_id", "start")
_AMOUNT_FIELDS: Final = ("end", "kwh", "cost_excl_vat", "currency")


def relevant_change(previous: SessionFact | None, new: SessionFact) -> bool:
    """Whether stage 2 needs to hear about `new` (an open session's kWh ticking up does not matter yet)."""
    if previous is None:
        return True
    fields: tuple[str, ...] = _MATCH_FIELDS + (_AMOUNT_FIELDS if new.final_at is not None else ())
    return any(getattr(previous, f) != getattr(new, f) for f in fields)


def fact_token(cdr_token: dict[str, Any], pseudonym: Any) -> str:
    """The token a fact carries: the pseudonym of the CdrToken's country, party and uid together."""
    return str(pseudonym(f"{cdr_token['country_code']}/{cdr_token['party_id']}/{cdr_token['uid']}"))


def session_fact(session: dict[str, Any], *, partner_id: str, version: int, received_at: datetime,
                 final_at: datetime | None, pseudonym: Any) -> SessionFact:
    token = session["cdr_token"]
    cost = session.get("total_cost")
    ref = session.get("authorization_reference")
    return SessionFact(
        session_id=ci_normalize(session["id"]), partner_id=partner_id, version=version, status=session["status"],
        start=session["start_date_time"], end=session.get("end_date_time"), kwh=session["kwh"],
        cost_excl_vat=cost["excl_vat"] if cost else None, currency=session["currency"],
        authorization_reference=pseudonym(ref) if ref else None,
        token=fact_token(token, pseudonym),
        location_id=ci_normalize(session["location_id"]), received_at=received_at, final_at=final_at)


def cdr_fact(cdr: dict[str, Any], *, partner_id: str, received_at: datetime, pseudonym: Any) -> CdrFact:
    token = cdr["cdr_token"]
    ref = cdr.get("authorization_reference")
    session_id = cdr.get("session_id")
    credited = cdr.get("credit_reference_id")
    return CdrFact(
        cdr_id=ci_normalize(cdr["id"]), partner_id=partner_id,
        session_id=ci_normalize(session_id) if session_id else None,
        authorization_reference=pseudonym(ref) if ref else None,
        token=fact_token(token, pseudonym),
        location_id=ci_normalize(cdr["cdr_location"]["id"]), start=cdr["start_date_time"], end=cdr["end_date_time"],
        total_energy=cdr["total_energy"], cost_excl_vat=cdr["total_cost"]["excl_vat"], currency=cdr["currency"],
        cost_incl_vat=cdr["total_cost"].get("incl_vat"), credit=bool(cdr.get("credit")),
        credit_reference_id=ci_normalize(credited) if credited else None,
        received_at=received_at, home_charging_compensation=bool(cdr.get("home_charging_compensation")))
