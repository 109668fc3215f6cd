"""CDR rules (10 §1): CDRs are immutable; credit CDRs reverse a CDR sent before.

- The first CDR with an id is stored. The same id again with the same content (`content_hash`, which ignores
  `last_updated`) is a DUPLICATE and dropped; with different content it is a CONFLICT: the original is kept
  and the conflict recorded (digest ambiguity #7 — a CDR is never overwritten).
- A credit CDR (`credit: true`) must name the CDR it credits (`credit_reference_id`) and carry a non-positive
  `total_cost` (the spec negates it). Linking to the credited CDR happens per party in stage 2
  (`pipeline.reconcile`), since the two have different Kafka keys; an unknown reference is flagged there
  after the grace period.
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


def decide(stored_hash: str | None, incoming_hash: str) -> CdrDecision:
    if stored_hash is None:
        return CdrDecision.NEW
    return CdrDecision.DUPLICATE if stored_hash == incoming_hash else CdrDecision.CONFLICT


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
