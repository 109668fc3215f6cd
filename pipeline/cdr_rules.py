"""CDR rules (10 §1): CDRs are immutable; credit CDRs reverse a CDR sent before.

- The first CDR with an id is stored. The same id again with the same content (`content_hash`, which ignores
  `last_updated`) is a DUPLICATE and dropped; with different content it is a CONFLICT: the original is kept
  and the conflict recorded (digest ambiguity #7 — a CDR is never overwritten). The same content is also a CDR
  that differs only as OCPI does not distinguish (`same_content_hash`): CiString values in another case (the
  `id` itself: the Kafka key, the state and the row are the case-insensitive identity's), and `credit` or
  `home_charging_compensation` given as `false` where the other left it out.
- A credit CDR (`credit: true`) must name the CDR it credits (`credit_reference_id`) and carry a non-positive
  `total_cost` (the spec negates it). Linking to the credited CDR happens per party in stage 2
  (`pipeline.reconcile`), since the two have different Kafka keys; an unknown reference is flagged there
  after the grace period.
- Amounts stay exact Decimals end to end (Avro decimal(18,4) → Decimal → ClickHouse Decimal(18,4)).
"""

from __future__ import annotations

import enum
import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import msgspec.inspect as mi

from ocpi import model
from ocpi.canonical import canonical_json, content_hash, number_text
from ocpi.identity import ci_normalize
from ocpi.types import CI_STRING_PATTERN
from pipeline.records import Anomaly


class CdrDecision(enum.StrEnum):
    NEW = "NEW"
    DUPLICATE = "DUPLICATE"
    CONFLICT = "CONFLICT"


def decide(stored_hash: str | None, incoming_hash: str, stored_same: str = "", incoming_same: str = "",
           ) -> CdrDecision:
    """`*_hash`: the events' `content_hash`; `*_same`: their `same_content_hash` ("" for a state written before
    it was kept, which only the content hash can then match)."""
    if stored_hash is None:
        return CdrDecision.NEW
    if stored_hash == incoming_hash or (stored_same and stored_same == incoming_same):
        return CdrDecision.DUPLICATE
    return CdrDecision.CONFLICT


# A CDR field's CiString values: True for a CiString (or a list of them), a nested spec for an object (or a list).
_Spec = dict[str, Any]
_FALSE_MEANS_ABSENT: Final = ("credit", "home_charging_compensation")  # `?` booleans whose absence is `false`


def _ci_spec(kind: Any) -> Any:
    if isinstance(kind, mi.StrType):
        return True if kind.pattern == CI_STRING_PATTERN else None
    if isinstance(kind, mi.UnionType):
        return next((spec for member in kind.types if (spec := _ci_spec(member)) is not None), None)
    if isinstance(kind, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        return _ci_spec(kind.item_type)
    if isinstance(kind, mi.StructType):
        spec = {field.encode_name: sub for field in kind.fields if (sub := _ci_spec(field.type)) is not None}
        return spec or None
    return None


_CDR_CI: Final[_Spec] = _ci_spec(mi.type_info(model.CDR))


def _ci_normalized(value: Any, spec: Any) -> Any:
    if value is None:
        return None
    if type(value) is list:
        return [_ci_normalized(item, spec) for item in value]
    if spec is True:
        return ci_normalize(value) if type(value) is str else value
    if type(value) is dict:
        return {key: _ci_normalized(item, spec[key]) if key in spec else item for key, item in value.items()}
    return value


def same_content_hash(cdr: dict[str, Any]) -> str:
    """The content hash of a CDR (a decoded event's payload) as OCPI compares it: every CiString value upper-cased
    (a CiString is case-insensitive, 02 §9), and `credit`/`home_charging_compensation` `false` as absent (absent
    is `false`). Two CDRs with equal ones are the same CDR sent twice.

    Equal to `content_hash` of the normalised tree, in one walk that normalises and canonicalises together (the
    worker computes it for every CDR event); a value of a type the decoder does not produce takes that way."""
    try:
        tree = {key: item if (sub := _CDR_CI.get(key)) is None and type(item) in _LEAVES else _same_canonical(item, sub)
                for key, item in cdr.items()
                if key != "last_updated" and item is not None and item != []
                and not (item is False and key in _FALSE_MEANS_ABSENT)}
        if type(tree.get("dimensions")) is list:  # not a CDR member, but what content_hash would do with one
            tree["dimensions"] = sorted(tree["dimensions"], key=canonical_json)
    except _Unusual:
        return _same_content_hash_slow(cdr)
    return hashlib.sha256(canonical_json(tree)).hexdigest()


class _Unusual(Exception):
    """A value `_same_canonical` does not take itself (not what the Avro decoder gives for a CDR)."""


_LEAVES: Final = frozenset((str, bool, int, float))  # as they are, outside a CiString


def _same_canonical(value: Any, spec: Any) -> Any:
    """`_ci_normalized` then `ocpi.canonical`'s canonical form of one value, in one pass."""
    kind = type(value)
    if kind is str:
        if spec is not True:
            return value
        return value.upper() if value.isascii() else ci_normalize(value)  # ci_normalize, inlined
    if kind is dict:
        if spec is True or spec is None:
            tree = {key: item if type(item) in _LEAVES else _same_canonical(item, None) for key, item in value.items()
                    if key != "last_updated" and item is not None and item != []}
        else:
            tree = {key: item if (sub := spec.get(key)) is None and type(item) in _LEAVES
                    else _same_canonical(item, sub)
                    for key, item in value.items() if key != "last_updated" and item is not None and item != []}
        if type(tree.get("dimensions")) is list:
            tree["dimensions"] = sorted(tree["dimensions"], key=canonical_json)
        return tree
    if kind is list:
        return [_same_canonical(item, spec) for item in value]
    if kind is Decimal:
        return number_text(value)
    if kind is datetime:
        if value.tzinfo is None:
            raise ValueError("naive datetime in an OCPI value: OCPI DateTimes are UTC")
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if value is None or kind in _LEAVES:
        return value
    raise _Unusual


def _same_content_hash_slow(cdr: dict[str, Any]) -> str:
    tree = _ci_normalized(cdr, _CDR_CI)
    for name in _FALSE_MEANS_ABSENT:
        if tree.get(name) is False:
            del tree[name]
    return content_hash(tree)


def credit_anomalies(cdr: dict[str, Any]) -> list[tuple[Anomaly, str]]:
    """What is wrong with a credit CDR on its own (nothing for a normal CDR)."""
    if not cdr.get("credit"):
        return []
    found: list[tuple[Anomaly, str]] = []
    if not cdr.get("credit_reference_id"):
        found.append((Anomaly.CREDIT_WITHOUT_REFERENCE, "credit CDR without credit_reference_id"))
    cost = cdr["total_cost"]["excl_vat"]
    if cost > Decimal(0):
        found.append((Anomaly.CREDIT_POSITIVE_COST, f"credit CDR with a positive total_cost {cost}"))
    return found
