"""Billing retention in the stage-2 state: sessions, CDRs and credit links leave `party-state` by component (records
that refer to each other), once all of a component is past the cutoff, with the id lists' entries that point at
them; what stays computes as if the expired records had never been seen."""

from __future__ import annotations

import random
from typing import Any, cast

import msgspec

from pipeline.party_retention import expire_party_state, survey_referrers
from pipeline.reconcile import RECONCILIATION_COLUMNS, PartyState, decode_cdr, decode_session
from pipeline.state import PartitionAnchor
from pipeline.state_retention import Plan, StateRetention, StateTarget

from .builders import cdr, session, ts
from .test_reconcile import RULES, Party, c_fact, completed, result, s_fact
from .test_state_retention import FakeTable

CURSOR = "QC/NL/TNM/"  # the fallback cursor: a watermark, not a record


def expire(party: Party, cutoff_min: float, snapshot: dict[str, bytes] | None = None) -> int:
    """One pass over the party's state with the cutoff at minute `cutoff_min`; returns the records deleted."""
    entries = [(key.encode(), value) for key, value in (party.store.data if snapshot is None else snapshot).items()]
    referrers: dict[str, list[str]] = {}
    survey_referrers(entries, party.store.data.get, referrers)
    changes, deleted = expire_party_state(entries, party.store.data.get, ts(cutoff_min), referrers, RULES)
    for key, value in changes.items():
        if value is None:
            party.store.data.pop(key, None)
        else:
            party.store.data[key] = value
    return deleted


def kinds(party: Party) -> dict[str, set[str]]:
    """Stored keys by kind (`S`, `C`, `L`, id lists), each as `<kind>/…` without the party."""
    found: dict[str, set[str]] = {}
    for key in party.store.data:
        kind, _, _, ident = key.split("/", 3)
        found.setdefault(kind, set()).add(ident)
    return found


def listed(party: Party, kind: str) -> list[str]:
    """Every id in the party's lists of `kind` (their keys are pseudonyms, or derived from them)."""
    state = PartyState("NL/TNM", party.store.overlay())
    return [value for ident in sorted(kinds(party).get(kind, ())) for value in state.ids(kind, ident)]


def test_a_matched_session_and_cdr_leave_with_every_index_entry() -> None:
    party = Party()
    party.run(s_fact(completed(authref="AUTH-1"), received=61, final=61))
    party.run(c_fact(cdr(authref="AUTH-1"), received=70))
    assert expire(party, cutoff_min=80) == 2
    assert set(party.store.data) == {CURSOR}
    assert expire(party, cutoff_min=80) == 0 and set(party.store.data) == {CURSOR}  # idempotent



def test_records_of_a_state_written_before_token_hours_leave_with_their_old_token_entries() -> None:
    # A version before 30bd9ac listed sessions and waiting CDRs under token and location alone; they leave with
    # their records like today's entries.
    from .test_reconcile import _as_written_before_token_hours

    party = Party()
    party.run(s_fact(completed("S1", start=0), received=61, final=61))
    party.run(c_fact(cdr("C9", session_id=None, start=300, end=360, uid="TOK9"), received=361))
    _as_written_before_token_hours(party.store)
    assert listed(party, "IT") == ["S1"] and listed(party, "WT") == ["C9"]
    assert expire(party, cutoff_min=400) == 2
    assert set(party.store.data) == {CURSOR}

def test_nothing_received_after_the_cutoff_is_touched() -> None:
    party = Party()
    party.run(s_fact(completed(), received=61, final=61))
    party.run(c_fact(cdr(), received=70))
    before = dict(party.store.data)
    assert expire(party, cutoff_min=61) == 0 and party.store.data == before


def test_one_record_received_since_keeps_its_whole_component() -> None:
    party = Party()
    party.run(s_fact(completed(), received=61, final=61))
    party.run(c_fact(cdr(), received=5000))  # a CDR years after its session: the session's totals depend on it
    before = dict(party.store.data)
    assert expire(party, cutoff_min=100) == 0 and party.store.data == before


def test_a_credit_and_the_cdr_it_credits_leave_together_and_hold_each_other_back() -> None:
    party = Party()
    party.run(s_fact(completed(), received=61, final=61))
    party.run(c_fact(cdr("C1"), received=62))
    party.run(c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=3000))
    # C1 is linked to its recent credit and stays; the session C1 left (credited) is a component of its own.
    assert expire(party, cutoff_min=100) == 1
    assert "S" not in kinds(party) and kinds(party)["C"] == {"C1", "C1-C"} and kinds(party)["L"] == {"C1-C"}
    assert expire(party, cutoff_min=4000) == 2
    assert "L" not in kinds(party) and set(party.store.data) == {CURSOR}


def old_credited(party: Party) -> None:
    """S1 and C1, and K1 crediting C1 (LINKED), all received before minute 100."""
    party.run(s_fact(completed(), received=61, final=61))
    party.run(c_fact(cdr("C1"), received=62))
    party.run(c_fact(cdr("K1", cost="-2.50", credit=True, credit_reference="C1"), received=63))


def test_a_recent_duplicate_credit_keeps_the_cdr_it_names_and_its_component() -> None:
    party = Party()
    old_credited(party)
    out = party.run(c_fact(cdr("K2", cost="-2.50", credit=True, credit_reference="C1"), received=5000))
    assert [row[5] for row in out.credit_links] == ["DUPLICATE_CREDIT"]
    # C1 lists only the credit linked to it (K1); K2 names C1 without a way back but from the survey of links.
    # (S1, which the credited C1 left, is a component of its own.)
    assert expire(party, cutoff_min=100) == 1
    assert kinds(party)["C"] == {"C1", "K1", "K2"} and "S" not in kinds(party)
    # So a third credit is still a duplicate, as it would be had nothing expired.
    out = party.run(c_fact(cdr("K3", cost="-2.50", credit=True, credit_reference="C1"), received=6000))
    assert [row[5] for row in out.credit_links] == ["DUPLICATE_CREDIT"]
    assert expire(party, cutoff_min=7000) == 4 and set(party.store.data) == {CURSOR}


def test_a_recent_credit_of_a_credit_keeps_the_credit_it_names() -> None:
    party = Party()
    old_credited(party)
    out = party.run(c_fact(cdr("K9", cost="2.50", credit=True, credit_reference="K1"), received=5000))
    assert [row[5] for row in out.credit_links] == ["CREDIT_OF_CREDIT"]
    assert expire(party, cutoff_min=100) == 1 and kinds(party)["C"] == {"C1", "K1", "K9"}


def test_a_waiting_cdr_and_a_waiting_credit_leave_their_waiting_lists() -> None:
    party = Party()
    party.run(c_fact(cdr("C1", session_id="S9", authref="AUTH-9"), received=0))  # waits for S9
    party.run(c_fact(cdr("C2", session_id=None, authref="AUTH-2"), received=1))  # waits under its keys
    party.run(c_fact(cdr("K1", cost="-1.00", credit=True, credit_reference="C-GONE"), received=2))
    listed = kinds(party)
    assert {"WS", "WA", "WT", "WC", "QF"} <= set(listed)
    assert expire(party, cutoff_min=5) == 3
    assert set(party.store.data) == {CURSOR}


def test_an_expired_session_leaves_a_shared_list_to_the_recent_one() -> None:
    party = Party()
    party.run(s_fact(completed("S-OLD", authref="AUTH-1"), received=61, final=61))
    party.run(s_fact(completed("S-NEW", authref="AUTH-1"), received=6000, final=6000))
    assert listed(party, "IA") == ["S-OLD", "S-NEW"] and len(kinds(party)["IA"]) == 1
    assert expire(party, cutoff_min=100) == 1
    assert listed(party, "IA") == ["S-NEW"]
    assert kinds(party)["S"] == {"S-NEW"}


def test_after_expiry_a_fact_for_an_expired_record_is_handled_as_a_first_one() -> None:
    party = Party()
    party.run(s_fact(completed(), received=61, final=61))
    party.run(c_fact(cdr("C1"), received=62))
    expire(party, cutoff_min=100)
    # A CDR naming the expired session waits for it; a credit of the expired CDR waits for its original.
    out = party.run(c_fact(cdr("C2"), received=200))
    assert result(out, "CDR", "C2")["outcome"] == "AWAITING_SESSION"
    out = party.run(c_fact(cdr("C1-C", cost="-2.50", credit=True, credit_reference="C1"), received=201))
    assert [row[5] for row in out.credit_links] == ["AWAITING_ORIGINAL"]


def test_what_stays_computes_as_if_the_expired_records_had_never_been_seen() -> None:
    old = [s_fact(completed("S-OLD", authref="AUTH-OLD", uid="OLD"), received=61, final=61),
           c_fact(cdr("C-OLD", session_id=None, authref="AUTH-OLD", uid="OLD"), received=62),
           c_fact(cdr("C-LOST", session_id="S-NEVER", uid="OLD"), received=63)]
    recent = [c_fact(cdr("C-NEW", session_id="S-NEW", uid="NEW", start=9000, end=9060), received=9060),
              s_fact(session("S-NEW", status="COMPLETED", kwh="10", cost="2.50", uid="NEW", start=9000, end=9060,
                             updated=9060), received=9065, final=9065),
              c_fact(cdr("C-WAIT", session_id=None, authref="AUTH-W", uid="NEW2", start=9100, end=9160),
                     received=9160)]
    mixed, fresh = Party(), Party()
    for fact in old:
        mixed.run(fact)
    expire(mixed, cutoff_min=100)
    for fact in recent:
        out_mixed, out_fresh = mixed.run(fact), fresh.run(fact)
        assert out_mixed.results == out_fresh.results
    assert mixed.store.data == fresh.store.data


def test_a_record_renewed_after_the_snapshot_is_decided_on_its_current_value() -> None:
    party = Party()
    party.run(s_fact(completed(), received=61, final=61))
    snapshot = dict(party.store.data)
    party.run(s_fact(completed(kwh="11"), version=2, received=500, final=61))
    assert expire(party, cutoff_min=100, snapshot=snapshot) == 0 and "S1" in kinds(party)["S"]


def test_the_state_pass_runs_the_plan_and_writes_its_changes() -> None:
    party = Party()
    party.run(s_fact(completed(), received=61, final=61))
    party.run(c_fact(cdr(), received=70))
    table = FakeTable(dict(party.store.data))
    plan = Plan(survey_referrers, lambda entries, read, cutoff, survey: expire_party_state(entries, read, cutoff,
                                                                                         survey, RULES))
    context: Any = type("Context", (), {"pseudonym": None})()
    keeper = StateRetention(context, [StateTarget("party-state", cast(Any, table), "facts", expired=plan)],
                            cast(Any, None))
    chunk = [(key.encode(), value) for key, value in table.data.items()]
    changes, counts = keeper.decide(keeper.targets[0], PartitionAnchor("facts", 0), chunk, ts(0), ts(80), {})
    table.apply(changes)
    assert (counts.expired, counts.pseudonymised) == (2, 0)
    assert set(table.data) == {CURSOR}


# --- differential: a pass over old facts against a state that never saw the records it deleted -----------------

SIDS, CDR_IDS = ("S1", "S2", "S3"), ("C1", "C2", "C3", "C4", "K1", "K2", "K3")
# Fields that record the path a subject took, not what it is now (`late`: whether its first CDR came late).
PATH_FIELDS = ("seq", "late", "settled")


def random_facts(rng: random.Random, count: int, first_minute: int, versions: dict[str, int],
                 used: set[str]) -> list[Any]:
    facts: list[Any] = []
    for minute in range(first_minute, first_minute + count):
        free = [c for c in CDR_IDS if c not in used]
        if rng.random() < 0.4 or not free:
            sid = rng.choice(SIDS)
            versions[sid] = versions.get(sid, 0) + 1
            body = session(sid, status=rng.choice(["COMPLETED", "COMPLETED", "ACTIVE"]), kwh="10", cost="2.50",
                           start=rng.choice([0, 3, 60]), end=90, updated=versions[sid], uid=rng.choice(["T1", "T2"]),
                           authref=rng.choice([None, "A1", "A2"]))
            facts.append(s_fact(body, version=versions[sid], received=minute, final=minute))
            continue
        cid = rng.choice(free)
        used.add(cid)
        if cid.startswith("K"):
            body = cdr(cid, session_id=None, cost="-2.50", credit=True, credit_reference=rng.choice(CDR_IDS))
        else:
            body = cdr(cid, session_id=rng.choice([None, None, *SIDS, "S9"]), start=rng.choice([0, 3, 60]), end=90,
                       uid=rng.choice(["T1", "T2"]), authref=rng.choice([None, "A1", "A2"]))
        facts.append(c_fact(body, received=minute))
    return facts


def subject(fact: Any) -> tuple[str, str]:
    return ("C", fact.cdr_id) if hasattr(fact, "cdr_id") else ("S", fact.session_id)


def comparable(out: Any) -> tuple[list[Any], list[Any]]:
    late = RECONCILIATION_COLUMNS.index("late")
    return ([row[:late] + row[late + 1:-1] for row in out.reconciliation], [row[:-1] for row in out.credit_links])


def comparable_state(party: Party) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in party.store.data.items():
        kind = key.split("/", 1)[0]
        if kind in ("S", "C"):
            rec = decode_session(value) if kind == "S" else decode_cdr(value)
            found[key] = {k: v for k, v in msgspec.structs.asdict(rec).items() if k not in PATH_FIELDS}
        elif kind == "L":
            found[key] = msgspec.msgpack.decode(value)["status"]
        elif kind != "QC":
            found[key] = sorted(PartyState("NL/TNM", party.store.overlay()).ids(*key.split("/", 3)[::3]))
    return found


def test_after_a_pass_stage_2_computes_what_a_state_without_the_deleted_records_computes() -> None:
    for seed in range(300):
        rng = random.Random(seed)
        versions: dict[str, int] = {}
        used: set[str] = set()
        old = random_facts(rng, rng.randint(1, 8), 0, versions, used)  # before the cutoff (minute 1000)
        recent = random_facts(rng, rng.randint(0, 4), 5000, versions, used)
        later = random_facts(rng, rng.randint(1, 5), 6000, versions, used)
        mixed = Party()
        for fact in old + recent:
            mixed.run(fact)
        before = {key for key in mixed.store.data if key[:2] in ("S/", "C/")}
        expire(mixed, cutoff_min=1000)
        gone = {(key[0], key.split("/", 3)[3]) for key in before - set(mixed.store.data)}
        never_saw = Party()
        for fact in old + recent:
            if subject(fact) not in gone:
                never_saw.run(fact)
        for fact in later:
            assert comparable(mixed.run(fact)) == comparable(never_saw.run(fact)), f"seed {seed}"
        assert comparable_state(mixed) == comparable_state(never_saw), f"seed {seed}"
