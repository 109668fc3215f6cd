"""Stage 1 for CDRs: one CDR id's events through the immutability rules (`pipeline.cdr_rules`)."""

from __future__ import annotations

from ocpi.canonical import cdr_content_hash
from pipeline import cdr_rules, projection, wire
from pipeline.cdr_rules import CdrDecision
from pipeline.facts import cdr_fact
from pipeline.records import Anomaly, Outcome, Record
from pipeline.stage import StageOutput, StageRules, foreign_issuer_detail
from pipeline.state import CdrState, TypedView


def process_cdrs(view: TypedView[CdrState], key: str, records: list[Record], rules: StageRules,
                 out: StageOutput) -> None:
    state = view.get(key)
    for record in records:
        if state is not None and record.offset <= state.offset:
            out.read_before(record, state.offset)
            continue
        event = record.event
        same = cdr_content_hash(event.payload)
        decision = (cdr_rules.decide(state.content_hash, event.content_hash, state.same_hash, same) if state
                    else CdrDecision.NEW)
        if decision is CdrDecision.NEW:
            store(record, rules, out)
            state = CdrState(content_hash=event.content_hash, event_id=event.event_id, offset=record.offset,
                             received_at=record.received_at, same_hash=same)
            out.outcome(record, Outcome.APPLIED)
            continue
        assert state is not None
        state.offset = record.offset
        if event.event_id == state.event_id and event.source != "REPLAY":
            # The stored CDR's own event again: a producer's resend (`stage.seen_before`), not the CPO posting it
            # again; a DUPLICATE row would replace its APPLIED one (same key).
            out.outcomes["RESENT"] += 1
            continue
        if decision is CdrDecision.DUPLICATE:
            out.outcome(record, Outcome.DUPLICATE)
        else:
            detail = f"differs from the stored CDR (event {state.event_id}); the original is kept"
            out.outcome(record, Outcome.CONFLICT, detail)
            out.anomaly(Anomaly.CDR_CONFLICT, event, detail)
    if state is not None:
        view.set(key, state)


def store(record: Record, rules: StageRules, out: StageOutput) -> None:
    event = record.event
    cdr = event.payload
    issuer = rules.foreign_issuer(cdr["cdr_token"])
    out.batch.add("cdrs", projection.CDR_COLUMNS, projection.cdr_row(event, cdr, wire.ocpi_json(cdr),
                                                                     token_of_another_emsp=issuer is not None))
    out.batch.extend("cdr_charging_periods", projection.CDR_PERIOD_COLUMNS,
                     projection.cdr_period_rows(cdr, event.received_at))
    out.batch.extend("cdr_tariffs", projection.CDR_TARIFF_COLUMNS, projection.cdr_tariff_rows(cdr, event.received_at))
    for kind, detail in cdr_rules.credit_anomalies(cdr):
        out.anomaly(kind, event, detail)
    if issuer is not None:  # stored as sent, not billed: to dispute with the CPO
        out.anomaly(Anomaly.CDR_OF_ANOTHER_EMSP, event, foreign_issuer_detail(issuer))
    out.fact(event, cdr_fact(cdr, partner_id=event.partner_id, received_at=record.received_at,
                             pseudonym=out.pseudonym))
