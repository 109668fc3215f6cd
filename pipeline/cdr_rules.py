"""CDR rules (10 §1): CDRs are immutable; credit CDRs reverse a CDR sent before.

- The first CDR with an id is stored. The same id again with the same content (`content_hash`, which ignores
  `last_updated`) is a DUPLICATE and dropped; with different content it is a CONFLICT: the original is kept
  and the conflict recorded (digest ambiguity #7 — a CDR is never overwritten). The same content is also a CDR
  that differs only as OCPI does not distinguish (`ocpi.canonical.cdr_content_hash`): CiString values in another
  case (the `id` itself: the Kafka key, the state and the row are the case-insensitive identity's), and `credit` or
  `home_charging_compensation` given as `false` where the other left it out.
- A credit CDR (`credit: true`) must name the CDR it credits (`credit_reference_id`) and carry a non-positive
  `total_cost`, excl. and incl. VAT (the spec negates both). Linking to the credited CDR happens per party in stage 2
  (`pipeline.reconcile`), since the two have different Kafka keys; an unknown reference is flagged there
  after the grace period.
- With `OCPI_TOKEN_PARTIES` set, a CDR of a token none of those eMSP parties issued is flagged
  CDR_OF_ANOTHER_EMSP (`StageRules.foreign_issuer`, in `pipeline.cdrs`): the CPO sent another eMSP's CDR to us. It is
  stored as sent (immutable), to be disputed with the CPO, and not billed: its row's `token_of_another_emsp` keeps
  its line out of `billable_lines` (migration 0029).
- Amounts stay exact Decimals end to end (Avro decimal(18,4) → Decimal → ClickHouse Decimal(18,4)).
"""

from __future__ import annotations

import enum
from decimal import Decimal
from typing import Any

from pipeline.records import Anomaly


class CdrDecision(enum.StrEnum):
    NEW = "NEW"
    DUPLICATE = "DUPLICATE"
    CONFLICT = "CONFLICT"


def decide(stored_hash: str | None, incoming_hash: str, stored_same: str = "", incoming_same: str = "",
           ) -> CdrDecision:
    """`*_hash`: the events' `content_hash`; `*_same`: their `cdr_content_hash` ("" for a state written before
    it was kept, which only the content hash can then match)."""
    if stored_hash is None:
        return CdrDecision.NEW
    if stored_hash == incoming_hash or (stored_same and stored_same == incoming_same):
        return CdrDecision.DUPLICATE
    return CdrDecision.CONFLICT


def credit_anomalies(cdr: dict[str, Any]) -> list[tuple[Anomaly, str]]:
    """What is wrong with a credit CDR on its own (nothing for a normal CDR)."""
    if not cdr.get("credit"):
        return []
    found: list[tuple[Anomaly, str]] = []
    if not cdr.get("credit_reference_id"):
        found.append((Anomaly.CREDIT_WITHOUT_REFERENCE, "credit CDR without credit_reference_id"))
    # Every value of the Price is the original's negated (10 §1.1): incl_vat (optional) as well as excl_vat.
    positive = [f"{name} {value}" for name in ("excl_vat", "incl_vat")
                if (value := cdr["total_cost"].get(name)) is not None and value > Decimal(0)]
    if positive:
        found.append((Anomaly.CREDIT_POSITIVE_COST, f"credit CDR with a positive total_cost ({', '.join(positive)})"))
    return found
