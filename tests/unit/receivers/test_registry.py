"""The partner registry on ClickHouse (chDB): persistence, token states, masking, the receivers' directory."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from infra.clickhouse.client import connect
from infra.clickhouse.migrations import migrate
from infra.settings import Settings, load_settings
from receivers.registry import (
    Origin,
    Partner,
    PartnerDirectory,
    PartnerRegistry,
    PartnerStatus,
    RegistryError,
    RoutedPartner,
    TokenKind,
    TokenState,
    credentials_role,
    hash_token,
    party_subject,
    record_json,
    token_generation,
)
from tests.conftest import unique

pytestmark = pytest.mark.clickhouse


@pytest.fixture
def open_registry(chdb_dsn: str) -> Callable[[], PartnerRegistry]:
    """A registry on a fresh database; each call opens a new client on it (as another process would)."""
    database = unique("reg")
    migrate(connect(chdb_dsn), database)

    def open_() -> PartnerRegistry:
        client = connect(chdb_dsn)
        client.database = database
        return PartnerRegistry(client)

    return open_


def role(country: str, party: str, kind: str = "CPO") -> object:
    return credentials_role(country_code=country, party_id=party, role=kind, business_name=f"{party} Ltd")


def test_a_partner_survives_a_restart_with_every_field(open_registry: Callable[[], PartnerRegistry]) -> None:
    first = open_registry()
    partner, token = first.register_direct("bec", "Belgian CPO", [role("BE", "BEC")], compat=["RAW_TOKEN"])
    partner.outbound_token = "our-token-for-bec"
    first.save(partner)
    reopened = open_registry().get("bec")
    assert reopened is not None
    assert reopened == partner
    assert reopened.status is PartnerStatus.REGISTERED and reopened.origin is Origin.OPERATOR
    assert reopened.roles[0].business_details.name == "BEC Ltd" and reopened.profile.raw_token
    assert reopened.created_at.tzinfo is not None and reopened.registered_at is not None
    assert [t.sha256 for t in reopened.valid_tokens()] == [hash_token(token)]


def test_inbound_tokens_are_stored_as_hashes_and_our_token_is_masked(
        open_registry: Callable[[], PartnerRegistry]) -> None:
    registry = open_registry()
    partner, token_a = registry.invite("cpo", "CPO")
    partner.outbound_token = "outbound-secret-value-123"
    registry.save(partner)
    raw = registry._client.query("SELECT record_json FROM partners").result_rows
    assert all(token_a not in row[0] for row in raw)
    for shown in (repr(partner), str(partner), str(record_json(partner)), f"{partner}"):
        assert "outbound-secret-value-123" not in shown and "out…(25 chars)" in shown


def test_a_token_we_held_is_gone_from_the_table_once_replaced_or_dropped(
        open_registry: Callable[[], PartnerRegistry]) -> None:
    """Every save is a new revision of the record; the ones it supersedes stay readable (any query without FINAL,
    `ocpi-pipeline query`) until ClickHouse merges them, which nothing schedules: the partner's token we held kept
    on after a credentials PUT replaced it, an unregister dropped it, or `partners delete` made the record a
    tombstone "without any token" (still valid at the partner, which a local delete does not tell)."""
    registry = open_registry()

    def rows_holding(text: str) -> int:
        return int(registry._client.query("SELECT countIf(position(record_json, {t:String}) > 0) FROM partners",
                                          parameters={"t": text}).result_rows[0][0])

    partner, _ = registry.register_direct("bec", "BEC", [role("BE", "BEC")])
    partner.outbound_token = "first-token-we-hold-for-bec"
    registry.save(partner)
    registry.save(registry.require("bec"))  # a change that keeps the token (a status, a profile) keeps it
    assert rows_holding("first-token-we-hold-for-bec") >= 1
    partner = registry.require("bec")
    partner.outbound_token = "second-token-we-hold-for-bec"  # the partner's credentials PUT
    registry.save(partner)
    assert rows_holding("first-token-we-hold-for-bec") == 0
    registry.unregister(registry.require("bec"))
    assert rows_holding("second-token-we-hold-for-bec") == 0
    kept = registry.get("bec")
    assert kept is not None and kept.status is PartnerStatus.UNREGISTERED and kept.outbound_token is None

    other, _ = registry.register_direct("cpo", "CPO", [role("NL", "CPO")])
    other.outbound_token = "token-we-hold-for-cpo"
    registry.save(other)
    registry.delete("cpo")
    assert rows_holding("token-we-hold-for-cpo") == 0
    assert [p.partner_id for p in registry.all(include_deleted=True)] == ["bec", "cpo"]


def test_token_states(open_registry: Callable[[], PartnerRegistry]) -> None:
    now = datetime.now(UTC)
    partner = Partner(partner_id="p", name="p", status=PartnerStatus.REGISTERED, created_at=now, updated_at=now)
    first = partner.issue_token(TokenKind.C)
    second = partner.issue_token(TokenKind.C)
    assert len(partner.valid_tokens()) == 2
    partner.retire_tokens(keep=[hash_token(second)], grace_s=60)
    retired = datetime.now(UTC)  # the grace counts from the retirement's own clock reading, however slow the machine
    old = next(t for t in partner.inbound_tokens if t.sha256 == hash_token(first))
    assert old.state is TokenState.RETIRING and old.expires_at is not None
    assert old.valid_at(now) and not old.valid_at(retired + timedelta(seconds=61))
    partner.retire_tokens(keep=[hash_token(second)])
    assert old.state is TokenState.REVOKED and old.revoked_at is not None
    for _ in range(20):
        partner.revoke_tokens()
        partner.issue_token(TokenKind.C)
    revoked = [t for t in partner.inbound_tokens if t.state is TokenState.REVOKED]
    assert len(revoked) <= 8 and len(partner.valid_tokens()) == 1


def test_tokens_retired_with_a_grace_do_not_pile_up_in_the_record(monkeypatch: pytest.MonkeyPatch) -> None:
    # With OCPI_TOKEN_GRACE set, every credentials PUT retires the token in use (RETIRING until the grace ends)
    # and issues a new one. A retired token past its grace is as dead as a revoked one, and only an audit trail:
    # the record (read by every receiver at every directory reload) must not keep one per update for ever.
    clock = [datetime(2026, 1, 1, tzinfo=UTC)]
    monkeypatch.setattr("receivers.registry._now", lambda: clock[0])
    partner = Partner(partner_id="p", name="p", status=PartnerStatus.REGISTERED, created_at=clock[0],
                      updated_at=clock[0])
    partner.issue_token(TokenKind.C)
    for _ in range(100):  # a partner updating its credentials daily, for about three months
        token = partner.issue_token(TokenKind.C)
        partner.retire_tokens(keep=[hash_token(token)], grace_s=3600)
        clock[0] += timedelta(days=1)
    assert [t.sha256 for t in partner.valid_tokens()] == [hash_token(token)]
    assert len(partner.inbound_tokens) <= 10


def test_a_profile_is_stored_by_its_names_however_it_was_given(open_registry: Callable[[], PartnerRegistry]) -> None:
    """`partners compat` stored the profile's names (upper-case, sorted, once each) while `invite` and an operator's
    `register_direct` stored the names as typed: `partners show --format json` (the record) then listed
    `datetime_offset` twice beside the text output's `DATETIME_OFFSET`, and a script comparing profiles saw two."""
    registry = open_registry()
    given = ["datetime_offset", " NULL_IN_LIST", "raw_token", "DATETIME_OFFSET"]
    expected = ["RAW_TOKEN", "DATETIME_OFFSET", "NULL_IN_LIST"]
    invited, _ = registry.invite("inv", "Invited", compat=given)
    direct, _ = registry.register_direct("dir", "Direct", [role("FR", "DIR")], compat=given)
    for partner in (invited, direct, registry.require("inv"), registry.require("dir")):
        assert partner.compat == expected
        assert record_json(partner)["compat"] == expected
    assert registry.set_compat("inv", given).compat == expected


def test_invite_rules(open_registry: Callable[[], PartnerRegistry]) -> None:
    registry = open_registry()
    _, token_a = registry.invite("cpo", "CPO", compat=["datetime_offset"])
    with pytest.raises(RegistryError, match="rotate"):
        registry.invite("cpo", "CPO")
    with pytest.raises(ValueError, match="unknown compatibility relaxation"):
        registry.invite("other", "Other", compat=["NOT_A_RELAXATION"])
    with pytest.raises(RegistryError, match="partner id"):
        registry.invite("bad id!", "x")
    new_a = registry.reinvite("cpo")
    partner = registry.require("cpo")
    states = {t.sha256: t.state for t in partner.inbound_tokens}
    assert states == {hash_token(token_a): TokenState.REVOKED, hash_token(new_a): TokenState.ACTIVE}
    registry.unregister(partner)
    _, again = registry.invite("cpo", "CPO again")  # an unregistered partner may be invited afresh
    assert registry.require("cpo").status is PartnerStatus.INVITED
    assert [t.sha256 for t in registry.require("cpo").valid_tokens()] == [hash_token(again)]


def test_suspend_resume_delete(open_registry: Callable[[], PartnerRegistry]) -> None:
    registry = open_registry()
    registry.register_direct("bec", "BEC", [role("BE", "BEC")])
    registry.invite("later", "Later")
    assert registry.set_status("bec", PartnerStatus.SUSPENDED).status is PartnerStatus.SUSPENDED
    with pytest.raises(RegistryError, match="nothing to suspend"):
        registry.set_status("bec", PartnerStatus.SUSPENDED)
    assert registry.set_status("bec", PartnerStatus.REGISTERED).status is PartnerStatus.REGISTERED
    registry.set_status("later", PartnerStatus.SUSPENDED)
    assert registry.set_status("later", PartnerStatus.REGISTERED).status is PartnerStatus.INVITED  # never registered
    deleted = registry.delete("bec")
    assert deleted.status is PartnerStatus.DELETED and not deleted.valid_tokens() and deleted.outbound_token is None
    assert [p.partner_id for p in registry.all()] == ["later"]
    assert [p.partner_id for p in registry.all(include_deleted=True)] == ["bec", "later"]
    with pytest.raises(RegistryError, match="no partner"):
        registry.require("bec")


def test_a_party_belongs_to_one_live_connection(open_registry: Callable[[], PartnerRegistry]) -> None:
    registry = open_registry()
    registry.register_direct("first", "First", [role("NL", "EXA")])
    with pytest.raises(RegistryError, match=r"(?i)NL/EXA belongs to partner 'first'"):
        registry.register_direct("second", "Second", [role("nl", "exa", "EMSP")])
    registry.register_direct("first", "First again", [role("NL", "EXA")])  # the holder itself may re-register
    registry.delete("first")
    registry.register_direct("second", "Second", [role("NL", "EXA")])


def test_a_party_behind_a_hub_may_also_connect_directly(open_registry: Callable[[], PartnerRegistry]) -> None:
    """03 topology 8: a party may reach us through a Hub and directly. A Hub holds only its own party (it reports
    only itself, 07 §5), so a CPO behind it registers; the Hub's own party stays the Hub's."""
    registry = open_registry()
    hub, _ = registry.register_direct("hub", "Hub", [role("DE", "HUB", "HUB")])
    registry.register_direct("cpo-xyz", "XYZ", [role("NL", "XYZ")])
    assert hub.relays_for("nl", "xyz") and not hub.relays_for("de", "hub")
    assert not registry.require("cpo-xyz").relays_for("NL", "ABC")  # no Hub: only its own CPO roles
    with pytest.raises(RegistryError, match="DE/HUB belongs to partner 'hub'"):
        registry.register_direct("other", "Other", [role("DE", "HUB")])


def test_a_per_request_view_is_never_persisted(open_registry: Callable[[], PartnerRegistry]) -> None:
    registry = open_registry()
    partner, _ = registry.register_direct("hub", "Hub", [role("DE", "HUB", "HUB")])
    view = RoutedPartner.of(partner, routed_parties=[("NL", "XYZ")], broadcast=False)
    assert view.may_own("nl", "xyz") and not view.may_own("NL", "ABC")
    assert view.owns("DE", "HUB") and not view.may_own("DE", "HUB")  # a Hub's own party owns no CPO object
    broadcast = RoutedPartner.of(partner, routed_parties=[], broadcast=True)
    assert broadcast.may_own("NL", "ABC") and not broadcast.may_own("de", "hub")  # any owner but the Hub's own
    with pytest.raises(TypeError):
        registry.save(view)


async def test_directory_sees_tokens_saved_a_moment_ago_by_another_process(
        open_registry: Callable[[], PartnerRegistry]) -> None:
    directory = PartnerDirectory(open_registry(), refresh_s=60)
    other_process = open_registry()
    await directory.reload()
    assert await directory.lookup("nothing") is None  # a miss: the directory just reloaded
    _, token = await asyncio.to_thread(other_process.invite, "fresh", "Fresh")
    started = time.monotonic()
    found = await directory.lookup(token)  # right after a reload: must still see the new token
    assert found is not None and found[0].partner_id == "fresh" and found[1] is TokenKind.A
    assert time.monotonic() - started < 2


async def test_directory_honours_states_and_local_changes(open_registry: Callable[[], PartnerRegistry]) -> None:
    registry = open_registry()
    directory = PartnerDirectory(registry, refresh_s=60)
    _, token = registry.register_direct("bec", "BEC", [role("BE", "BEC")])
    assert await directory.lookup(token) is not None
    suspended = registry.set_status("bec", PartnerStatus.SUSPENDED)
    directory.apply(suspended)
    assert await directory.lookup(token) is None
    resumed = registry.set_status("bec", PartnerStatus.REGISTERED)
    directory.apply(resumed)
    assert await directory.lookup(token) is not None
    new = resumed.issue_token(TokenKind.C)
    resumed.retire_tokens(keep=[hash_token(new)], grace_s=0.2)
    registry.save(resumed)
    directory.apply(resumed)
    assert await directory.lookup(token) is not None and await directory.lookup(new) is not None
    await asyncio.sleep(0.3)
    assert await directory.lookup(token) is None, "a retiring token expires"
    directory.apply(registry.delete("bec"))
    assert await directory.lookup(new) is None


def slow_reads(registry: PartnerRegistry) -> tuple[threading.Event, threading.Event]:
    """Make the registry's reads slow: each reads at once, sets the first event, and answers once the second is set.
    """
    read, release = threading.Event(), threading.Event()
    load = registry.all

    def slow_all(*, include_deleted: bool = False) -> list[Partner]:
        result = load(include_deleted=include_deleted)
        read.set()
        release.wait(10)
        return result

    registry.all = slow_all  # type: ignore[method-assign]
    return read, release


async def test_a_reload_in_flight_does_not_undo_a_local_change(open_registry: Callable[[], PartnerRegistry]) -> None:
    """A periodic reload that read the registry just before a credentials DELETE (or PUT, or the POST that kills
    Token A) was saved must not bring the revoked token back once it completes."""
    registry = open_registry()
    _, token = registry.register_direct("bec", "BEC", [role("BE", "BEC")])
    directory = PartnerDirectory(registry, refresh_s=60)
    await directory.reload()
    load = registry.all
    read, release = slow_reads(registry)  # read before the DELETE is saved, answered once released
    in_flight = asyncio.create_task(directory.reload())
    assert await asyncio.to_thread(read.wait, 10)
    registry.all = load  # type: ignore[method-assign]
    directory.apply(registry.unregister(registry.require("bec")))  # the DELETE, answered meanwhile
    release.set()
    await in_flight
    assert await directory.lookup(token) is None, "the unregistered partner's token works again"


async def test_directory_refreshes_changes_made_elsewhere(open_registry: Callable[[], PartnerRegistry]) -> None:
    directory = PartnerDirectory(open_registry(), refresh_s=0.2)
    elsewhere = open_registry()
    _, token = elsewhere.register_direct("bec", "BEC", [role("BE", "BEC")])
    assert await directory.lookup(token) is not None
    elsewhere.set_status("bec", PartnerStatus.SUSPENDED)  # e.g. `partners suspend` in another process
    await asyncio.sleep(0.3)
    assert await directory.lookup(token) is None


async def test_a_registry_that_cannot_be_read_does_not_refuse_known_tokens(
        open_registry: Callable[[], PartnerRegistry]) -> None:
    """The periodic reload is a refresh of what the directory holds: when ClickHouse fails it, a partner whose token
    the directory knows is still served (not a 3000/HTTP 500 for the push that found the reload due)."""
    registry = open_registry()
    _, token = registry.register_direct("bec", "BEC", [role("BE", "BEC")])
    directory = PartnerDirectory(registry, refresh_s=0.1)
    await directory.reload()

    def down(*, include_deleted: bool = False) -> list[Partner]:
        raise ConnectionError("ClickHouse is down")

    registry.all = down  # type: ignore[method-assign]
    await asyncio.sleep(0.2)
    found = await directory.lookup(token)
    assert found is not None and found[0].partner_id == "bec"
    with pytest.raises(ConnectionError):  # an unknown token still needs the read: the caller answers 3000
        await directory.lookup("unknown")


async def test_requests_do_not_queue_behind_a_slow_periodic_reload(
        open_registry: Callable[[], PartnerRegistry]) -> None:
    """While one request waits for a slow registry read, the others use the copy the directory holds: a slow
    ClickHouse must not hold every push (each would otherwise wait for the read, then read again itself)."""
    registry = open_registry()
    _, token = registry.register_direct("bec", "BEC", [role("BE", "BEC")])
    directory = PartnerDirectory(registry, refresh_s=0.1)
    await directory.reload()
    reading, release = slow_reads(registry)
    await asyncio.sleep(0.2)
    first = asyncio.create_task(directory.lookup(token))  # finds the reload due, and reads
    try:
        assert await asyncio.to_thread(reading.wait, 10)
        await asyncio.sleep(0.2)  # the reload is due again for the requests that come now
        started = time.monotonic()
        found = await asyncio.wait_for(directory.lookup(token), 5)
        assert found is not None and time.monotonic() - started < 1
    finally:
        release.set()
        await first


async def test_the_request_that_finds_the_reload_due_does_not_wait_for_a_stuck_read(
        open_registry: Callable[[], PartnerRegistry]) -> None:
    """The request that starts the periodic reload waits for it at most `refresh_wait_s`, then uses the copy held: a
    ClickHouse server that accepts and never answers held that push (one after the other, each the next to find the
    reload due) for the client library's 300 s, long after the partner gave up. The read goes on, and what it finds
    takes effect when it completes."""
    registry = open_registry()
    _, token = registry.register_direct("bec", "BEC", [role("BE", "BEC")])
    directory = PartnerDirectory(registry, refresh_s=0.1, refresh_wait_s=0.3)
    await directory.reload()
    reading, release = slow_reads(registry)
    await asyncio.sleep(0.2)
    try:
        started = time.monotonic()
        found = await asyncio.wait_for(directory.lookup(token), 5)
        assert found is not None and found[0].partner_id == "bec"
        assert time.monotonic() - started < 2
        assert reading.is_set()
        registry.set_status("bec", PartnerStatus.SUSPENDED)
    finally:
        release.set()
    for _ in range(100):  # the stuck read completes; the next one (due at once) sees the suspension
        if await directory.lookup(token) is None:
            break
        await asyncio.sleep(0.05)
    assert await directory.lookup(token) is None


@pytest.mark.parametrize(("variable", "value"), [
    ("OCPI_PARTY_COUNTRY_CODE", "nld"), ("OCPI_PARTY_ID", "TOOLONG"), ("OCPI_PARTY_ROLE", "DRIVER"),
    ("OCPI_PARTY_NAME", ""), ("OCPI_PARTY_WEBSITE", "example.com"), ("OCPI_OUTBOUND_TIMEOUT", "0"),
    ("OCPI_TOKEN_GRACE", "-1"), ("OCPI_TOKEN_GRACE", "nan"),
])
def test_party_settings_are_validated(variable: str, value: str) -> None:
    from infra.settings import SettingsError

    with pytest.raises(SettingsError, match=variable):
        load_settings({variable: value})


def test_party_settings_defaults() -> None:
    settings: Settings = load_settings({})
    assert (settings.party.country_code, settings.party.party_id, settings.party.role) == ("NL", "OPP", "EMSP")
    assert settings.partners.token_grace_s == 0 and settings.partners.outbound_timeout_s == 10


async def test_a_known_token_costs_no_registry_read(open_registry: Callable[[], PartnerRegistry]) -> None:
    """A raw-token partner's header is tried decoded first; that miss must not reload the registry each time."""
    registry = open_registry()
    _, token = registry.register_direct("raw", "Raw", [role("FR", "RAW")], compat=["RAW_TOKEN"])
    reads = 0
    load = registry.all

    def counting_all(*, include_deleted: bool = False) -> list[Partner]:
        nonlocal reads
        reads += 1
        return load(include_deleted=include_deleted)

    registry.all = counting_all  # type: ignore[method-assign]
    directory = PartnerDirectory(registry, refresh_s=60)
    await directory.reload()
    for _ in range(20):
        found = await directory.find("not-the-token", token)
        assert found is not None and found[0] == token
    assert reads == 1
    assert await directory.find("unknown-1", "unknown-2") is None
    assert reads == 2  # a miss reloads once, not once per candidate


def test_the_hub_role_counts_only_where_the_operator_agreed_to_it(open_registry: Callable[[], PartnerRegistry]) -> None:
    registry = open_registry()
    hub_roles = [role("DE", "HUB", "HUB")]
    provisioned, _ = registry.register_direct("hub", "Hub", hub_roles)  # the operator chose the roles
    assert provisioned.hub and provisioned.is_hub and provisioned.unagreed_hub_role(hub_roles) is None
    invited, _ = registry.invite("cpo", "CPO")
    assert invited.hub is False and invited.unagreed_hub_role(hub_roles) == hub_roles[0]
    invited.roles = hub_roles  # however it got there: not a Hub without the operator's agreement
    assert not invited.is_hub
    agreed, _ = registry.invite("other-hub", "Other hub", hub=True)
    assert agreed.unagreed_hub_role(hub_roles) is None
    # Recorded before the rule (no flag): a Hub then stays one, a CPO then cannot claim the role now.
    stored = registry.require("hub")
    legacy_hub = msgspec.structs.replace(stored, hub=None)
    legacy_cpo = msgspec.structs.replace(stored, hub=None, roles=[role("NL", "EXA")])
    assert legacy_hub.is_hub and legacy_hub.unagreed_hub_role(hub_roles) is None
    assert not legacy_cpo.is_hub and legacy_cpo.unagreed_hub_role(hub_roles) == hub_roles[0]


def test_one_claim_of_a_token_generation_wins_across_processes(open_registry: Callable[[], PartnerRegistry]) -> None:
    """Two handshakes (two receiver processes: two clients) that read the same tokens claim them at once: exactly
    one wins, both see the same winner, and the table keeps its row alone (the other insert is dropped as a repeat,
    so no row stamped earlier can land later and take it over). The winner asking again (a retry) still wins; a
    new generation (another token issued) is claimed anew."""
    registries = [open_registry(), open_registry()]
    partner, _token_a = registries[0].invite("cpo", "CPO")
    generation = token_generation(partner)
    assert generation == token_generation(registries[1].require("cpo"))  # what another process reads
    start = threading.Barrier(2)
    won: dict[str, bool] = {}

    def claim(registry: PartnerRegistry, value: str) -> None:
        start.wait()
        won[value] = registry.claim("cpo", generation, value)

    threads = [threading.Thread(target=claim, args=(registry, value))
               for registry, value in zip(registries, ["first", "second"], strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(won.values()) == [False, True]
    winner = next(value for value, ok in won.items() if ok)
    loser = next(value for value, ok in won.items() if not ok)
    assert registries[1].claim("cpo", generation, winner) and not registries[0].claim("cpo", generation, loser)
    rows = registries[0]._client.query("SELECT claim FROM credential_claims").result_rows
    assert rows == [(winner,)]
    partner.issue_token(TokenKind.C)
    assert token_generation(partner) != generation
    assert registries[1].claim("cpo", token_generation(partner), loser)


def test_a_party_claim_is_made_on_the_registry_as_read(open_registry: Callable[[], PartnerRegistry]) -> None:
    """Two reads between the same saves claim on one generation (one partner wins, its own retry too); any save
    since gives another, so a party freed and taken again is claimed anew, never on a state it was in before."""
    registry = open_registry()
    registry.invite("first", "First")
    registry.invite("second", "Second")
    roles = [role("NL", "EXA")]
    free, generation = registry.party_state(roles, except_id="first")  # type: ignore[arg-type]
    assert free is None and generation == registry.party_state(roles, except_id="second")[1]  # type: ignore[arg-type]
    subject = party_subject("nl", "exa")
    assert subject == party_subject("NL", "EXA") != party_subject("N/", "LEXA")
    assert registry.claim(subject, generation, "first") and registry.claim(subject, generation, "first")
    assert not registry.claim(subject, generation, "second")
    registry.register_direct("first", "First", roles)  # type: ignore[arg-type]
    held, _ = registry.party_state(roles, except_id="second")  # type: ignore[arg-type]
    assert held is not None and held[1] == "first"
    registry.delete("first")
    registry.invite("first", "First")  # its roles forgotten: NL/EXA is free again, in a new generation
    free, again = registry.party_state(roles, except_id="second")  # type: ignore[arg-type]
    assert free is None and again != generation and registry.claim(subject, again, "second")


def test_a_save_wins_over_the_one_before_it_whatever_the_writers_clock(
        open_registry: Callable[[], PartnerRegistry], monkeypatch: pytest.MonkeyPatch) -> None:
    """The revision of a save was the writer's wall clock (time.time_ns): a save by a process whose clock runs behind
    the last writer's (the CLI on an operator's machine, a receiver on another host, or one clock stepped back by
    NTP) got a lower revision, and ReplacingMergeTree kept the earlier record: a `partners suspend` or `delete` did
    nothing, a partner's rotation answered 1000 was lost (its new Token C refused, the replaced one still working)."""
    registry = open_registry()
    partner, _ = registry.register_direct("bec", "BEC", [role("BE", "BEC")])
    ahead = time.time_ns() + 300 * 10**9  # the first writer's clock runs five minutes ahead of the next one's
    monkeypatch.setattr("receivers.registry.time.time_ns", lambda: ahead)
    registry.save(partner)
    monkeypatch.undo()
    other_machine = open_registry()
    other_machine.set_status("bec", PartnerStatus.SUSPENDED)
    assert open_registry().require("bec").status is PartnerStatus.SUSPENDED
    other_machine.delete("bec")
    stored = open_registry().get("bec")
    assert stored is not None and stored.status is PartnerStatus.DELETED and not stored.valid_tokens()



def test_a_save_is_stored_before_it_returns_on_a_server_with_asynchronous_inserts() -> None:
    """A server profile with async_insert=1 (and wait_for_async_insert=0) acknowledged a registry save before it was
    stored: a partner answered 1000 with its new Token C was refused by the next registry read (a second receiver
    process, the callback of `partners register`), and the save was lost if the server stopped. chDB stores every
    insert at once, so this pins what the registry asks of a server."""
    sent: list[dict[str, object] | None] = []

    class Recording:
        def insert(self, _table: str, _rows: object, *, column_names: object,
                   settings: dict[str, object] | None = None) -> None:
            sent.append(settings)

        def query(self, _sql: str, parameters: object = None) -> object:
            return type("Result", (), {"result_rows": []})()

    now = datetime.now(UTC)
    partner = Partner(partner_id="p", name="p", status=PartnerStatus.REGISTERED, created_at=now, updated_at=now)
    PartnerRegistry(Recording()).save(partner)  # type: ignore[arg-type]
    assert sent and all(settings is not None and settings.get("async_insert") == 0 for settings in sent)
