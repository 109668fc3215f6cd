"""The pull crawler against a fake CPO Sender over real HTTP (127.0.0.1): pagination, X-Limit, a dropping
X-Total-Count, backoff with Retry-After, invalid and foreign objects, checkpoint resume, redirects."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime as http_date
from types import SimpleNamespace
from typing import Any

import httpx
import msgspec
import pytest

from infra.codec import DecodedEvent, decode_event
from ocpi.canonical import content_hash
from ocpi.decode import decode
from ocpi.model import Endpoint, InterfaceRole, Session
from pipeline.jobs.common import Checkpoint, JobError, NoProgress, jobs_dir, parse_time
from pipeline.jobs.kafka_io import JobProducer
from pipeline.jobs.pull import (
    PullError,
    PullReport,
    RetryPolicy,
    pull,
    pull_every,
    query_int,
    rejected_path,
    retry_after_seconds,
)
from pipeline.retention import Pseudonymizer, load_key
from receivers.registry import Partner, PartnerStatus, credentials_role
from tests.conftest import EXAMPLES
from tests.unit.jobs.fake_sender import Failure, FakeSender, hours_ago, parse, session, stamp

TOKEN = "token-we-hold-for-them"


class ListSink:
    """Stands in for Kafka: keeps what it is sent; `fail_on` makes that call fail (a broker outage)."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self.calls = 0
        self.fail_on = fail_on

    async def send_all(self, records: Iterable[tuple[str, bytes, bytes]], *, within: float | None = None) -> int:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("broker down")
        batch = list(records)
        self.records.extend(batch)
        return len(batch)

    @property
    def events(self) -> list[DecodedEvent]:
        return [decode_event(value) for _t, _k, value in self.records]


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
async def fake() -> AsyncIterator[FakeSender]:
    sender = await FakeSender(TOKEN, page_cap=2).start()
    yield sender
    await sender.stop()


def partner_for(sender: FakeSender, *, token: str | None = TOKEN) -> Partner:
    now = datetime.now(UTC)
    return Partner(partner_id="cpo-be", name="CPO BE", status=PartnerStatus.REGISTERED,
                   roles=[credentials_role(country_code="BE", party_id="BEC", role="CPO")],
                   outbound_token=token, created_at=now, updated_at=now,
                   endpoints=[Endpoint(identifier="sessions", role=InterfaceRole.SENDER, url=sender.url("sessions")),
                              Endpoint(identifier="cdrs", role=InterfaceRole.RECEIVER,
                                       url="http://127.0.0.1:1/not-a-sender")])


def ids(sink: ListSink) -> list[str]:
    return [e.object_id for e in sink.events]


async def test_crawl_follows_next_links_with_the_servers_limit(settings_for: Any, fake: FakeSender) -> None:
    settings = settings_for()
    fake.objects["sessions"] = [session(i, hours_ago(10 - i), kwh=i + 0.5) for i in range(1, 6)]
    since, until = hours_ago(24), hours_ago(0.5)
    sink = ListSink()
    report = await pull(settings, partner_for(fake), "sessions", sink, since=since, until=until, limit=3)

    assert ids(sink) == ["S0001", "S0002", "S0003", "S0004", "S0005"]
    assert fake.offsets("sessions") == [0, 2, 4]
    first, *rest = fake.seen
    assert first.query == {"date_from": stamp(since), "date_to": stamp(until), "offset": "0", "limit": "3"}
    assert [s.query["limit"] for s in rest] == ["2", "2"]  # the next links carry the server's cap
    assert all(s.query["date_from"] == stamp(since) and s.query["date_to"] == stamp(until) for s in rest)
    assert (report.pages, report.objects, report.total, report.rereads, report.retries) == (3, 5, 5, 0, 0)

    auth = "Token " + base64.b64encode(TOKEN.encode()).decode()
    assert {s.headers["Authorization"] for s in fake.seen} == {auth}
    assert len({s.headers["X-Request-ID"] for s in fake.seen}) == 3
    assert len({s.headers["X-Correlation-ID"] for s in fake.seen}) == 1
    assert {(s.headers["OCPI-from-country-code"], s.headers["OCPI-from-party-id"], s.headers["OCPI-to-country-code"],
             s.headers["OCPI-to-party-id"]) for s in fake.seen} == {("NL", "OPP", "BE", "BEC")}

    event = sink.events[0]
    body = fake.objects["sessions"][0]
    assert (event.source, event.partner_id, event.module, event.operation, event.level) == (
        "PULL", "cpo-be", "SESSIONS", "PUT", "SESSION")
    assert (event.country_code, event.party_id, event.object_id) == ("BE", "BEC", "S0001")
    assert event.content_hash == content_hash(decode(json.dumps(body), Session).value)
    assert event.payload["kwh"] == pytest.approx(1.5) and event.payload_type == "Session"
    assert event.request_id == fake.seen[0].headers["X-Request-ID"]
    assert event.correlation_id == fake.seen[0].headers["X-Correlation-ID"]
    assert (event.from_country_code, event.from_party_id, event.to_country_code, event.to_party_id) == (
        "BE", "BEC", "NL", "OPP")
    topic, key, _value = sink.records[0]
    assert (topic, key) == (settings.kafka.topic_sessions, b"BE/BEC/S0001")

    state = Checkpoint(jobs_dir(settings, "pull") / "cpo-be.sessions.json").load()
    assert state is not None and state["crawl"] is None and state["completed_until"] == until.isoformat()


async def test_dropping_total_count_rereads_from_offset_minus_the_drop(settings_for: Any, fake: FakeSender) -> None:
    until = hours_ago(0.5)
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 7)]

    def update_first_object(sender: FakeSender, request_number: int) -> None:
        if request_number == 2:  # S0001 (already read) is updated now and leaves the date_to window
            sender.objects["sessions"][0]["last_updated"] = stamp(datetime.now(UTC))

    fake.before_request = update_first_object
    sink = ListSink()
    report = await pull(settings_for(), partner_for(fake), "sessions", sink, since=hours_ago(24), until=until)

    # Without the re-read, offset 2 of the shrunk list skips S0003 (it moved to index 1).
    assert fake.offsets("sessions") == [0, 2, 1, 3]
    assert sorted(set(ids(sink))) == [f"S000{i}" for i in range(1, 7)]
    assert ids(sink) == ["S0001", "S0002", "S0003", "S0004", "S0005", "S0006"]
    assert report.rereads == 1 and report.total == 5


async def test_a_total_that_drops_again_before_the_reread_is_read_again_from_further_back(
        settings_for: Any, fake: FakeSender) -> None:
    """An object read before left the window between the page and its re-read (a Sender busy with updates; or a
    re-read retried for a minute): the re-read, from offset − the first drop, was itself shifted by the second and
    skipped S0003 for good. A re-read whose X-Total-Count dropped again is read again from further back."""
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 9)]

    def update(sender: FakeSender, request_number: int) -> None:
        if request_number in (2, 3):  # S0001 before the second page, S0002 before its re-read: both leave
            sender.objects["sessions"][request_number - 2]["last_updated"] = stamp(datetime.now(UTC))

    fake.before_request = update
    sink = ListSink()
    report = await pull(settings_for(), partner_for(fake), "sessions", sink, since=hours_ago(24), until=hours_ago(0.5))
    assert sorted(set(ids(sink))) == [f"S000{i}" for i in range(1, 9)]
    assert fake.offsets("sessions")[:4] == [0, 2, 1, 0] and report.rereads == 2


async def test_a_reread_holding_the_objects_of_the_page_before_is_no_partner_ignoring_offset(
        settings_for: Any, fake: FakeSender) -> None:
    """One object before the page read last and a page's worth after it (unread) left the window: the re-read from
    offset − the drop holds just the page read last, now one place down. It was taken for a partner that ignores
    `offset` and the pull stopped (PullError), each rerun again while the Sender was busy; it goes on now."""
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 9)]

    def update(sender: FakeSender, request_number: int) -> None:
        if request_number == 3:  # before the third page: S0001 (read) and S0005, S0006 (not read yet) leave
            for index in (0, 4, 5):
                sender.objects["sessions"][index]["last_updated"] = stamp(datetime.now(UTC))

    fake.before_request = update
    sink = ListSink()
    report = await pull(settings_for(), partner_for(fake), "sessions", sink, since=hours_ago(24), until=hours_ago(0.5))
    assert fake.offsets("sessions") == [0, 2, 4, 1, 3]
    assert ids(sink) == ["S0001", "S0002", "S0003", "S0004", "S0003", "S0004", "S0007", "S0008"]
    assert report.rereads == 1 and report.total == 5


async def test_a_page_shifted_by_an_object_entering_the_window_is_no_partner_ignoring_offset(
        settings_for: Any) -> None:
    """An object entering the window before the page read last (a Sender ordering by id, an object stamped late)
    puts just that page at the next offset, with a higher X-Total-Count: that is no partner ignoring `offset`."""
    pages = {"0": ([session(2, hours_ago(3))], "2"), "1": ([session(2, hours_ago(3))], "3"),
             "2": ([session(3, hours_ago(2))], "3")}

    def handler(request: httpx.Request) -> httpx.Response:
        offset = request.url.params["offset"]
        data, total = pages[offset]
        headers = {"X-Total-Count": total}
        if offset != "2":
            headers["Link"] = f'<?offset={int(offset) + 1}&limit=1>; rel="next"'
        return httpx.Response(200, headers=headers, content=_envelope(data))

    sink = ListSink()
    await pull(settings_for(), _mock_partner(), "sessions", sink, since=hours_ago(24), limit=1,
               transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert ids(sink) == ["S0002", "S0002", "S0003"]


async def test_an_object_updated_mid_crawl_skips_nothing_when_until_is_later_than_now(settings_for: Any,
                                                                                     fake: FakeSender) -> None:
    """With a date_to still to come, an object updated mid-crawl stayed in the window: it moved to the end of the
    list, X-Total-Count did not drop (no re-read), and the object after the page read before took its place below
    the next offset: S0003, dated hours before the window's end, was never pulled (the next window starts later)."""
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 7)]

    def update_first_object(sender: FakeSender, request_number: int) -> None:
        if request_number == 2:  # S0001 (already read) is updated now
            sender.objects["sessions"][0]["last_updated"] = stamp(datetime.now(UTC))

    fake.before_request = update_first_object
    sink = ListSink()
    started = datetime.now(UTC)
    report = await pull(settings_for(), partner_for(fake), "sessions", sink, since=hours_ago(24),
                        until=datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1))
    assert sorted(set(ids(sink))) == [f"S000{i}" for i in range(1, 7)]
    assert report.rereads == 1  # S0001 left the settled part of the window: its X-Total-Count dropped
    # The settled part first (an update during it leaves it), then the rest of the window from there.
    settled = {s.query["date_to"] for s in fake.seen[:-1]}
    assert len(settled) == 1
    assert started - timedelta(minutes=5, seconds=1) <= parse(settled.pop()) <= datetime.now(UTC) - timedelta(minutes=5)
    assert fake.seen[-1].query["date_from"] == fake.seen[0].query["date_to"]
    assert parse(fake.seen[-1].query["date_to"]) == report.until.replace(microsecond=0)


@pytest.mark.parametrize("module", ["locations", "sessions"])
async def test_next_links_without_the_date_filters_are_read_with_the_windows(settings_for: Any, fake: FakeSender,
                                                                             module: str) -> None:
    """04 §4.2's own example link carries only offset and limit, and partners write theirs so. Followed as it was,
    such a link left the window: a Sessions Sender refused it (date_from is required there, 09 §2.1), so the pull
    could never complete; a Locations Sender answered its unfiltered list, where an object updated mid-crawl does
    not leave (no date_to, X-Total-Count stays) but moves to the end, and the object after the page read before
    took its place below the next offset: L3, updated hours before the window's end, was never pulled (the next
    window starts after it). The next page is asked with the window's date_from and date_to."""
    if module == "locations":
        example = json.loads((EXAMPLES / "location_example.json").read_text())
        fake.objects[module] = [{**example, "id": f"L{i}", "last_updated": stamp(hours_ago(10 - i))}
                                for i in range(1, 7)]
    else:
        fake.objects[module] = [session(i, hours_ago(10 - i)) for i in range(1, 7)]
    fake.link_filters = False

    def update_first_object(sender: FakeSender, request_number: int) -> None:
        if request_number == 2:  # the first object (already read) is updated now
            sender.objects[module][0]["last_updated"] = stamp(datetime.now(UTC))

    fake.before_request = update_first_object
    partner = partner_for(fake)
    partner.endpoints = [Endpoint(identifier=module, role=InterfaceRole.SENDER, url=fake.url(module))]
    sink = ListSink()
    since, until = hours_ago(24), hours_ago(0.5)
    await pull(settings_for(), partner, module, sink, since=since, until=until)
    assert len(set(ids(sink))) == 6
    assert all(s.query["date_from"] == stamp(since) and s.query["date_to"] == stamp(until) for s in fake.seen)


async def test_a_partner_that_ignores_offset_stops_the_pull_before_it_completes(settings_for: Any,
                                                                              fake: FakeSender) -> None:
    settings = settings_for()
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 6)]
    fake.ignore_offset = True
    sink = ListSink()
    with pytest.raises(PullError, match="ignores `offset`"):
        await pull(settings, partner_for(fake), "sessions", sink, since=hours_ago(24), until=hours_ago(0.5))
    # Not "completed" with S0003..S0005 never seen: the next window would start after them for good.
    assert ids(sink) == ["S0001", "S0002"]
    state = Checkpoint(jobs_dir(settings, "pull") / "cpo-be.sessions.json").load()
    assert state is not None and state["completed_until"] is None and state["crawl"]["pages"] == 1

    fake.ignore_offset = False  # the partner fixed it: the rerun resumes the crawl at the page after the first
    report = await pull(settings, partner_for(fake), "sessions", sink)
    assert report.resumed and ids(sink) == ["S0001", "S0002", "S0003", "S0004", "S0005"]


async def test_backoff_on_429_503_and_3xxx_respects_retry_after(settings_for: Any, fake: FakeSender) -> None:
    fake.objects["sessions"] = [session(1, hours_ago(3)), session(2, hours_ago(2))]
    later = datetime.now(UTC) + timedelta(seconds=30)
    fake.fail_next(Failure(429, None, {"Retry-After": "7"}), Failure(503, None),
                   Failure(200, 3000), Failure(503, 3001, {"Retry-After": http_date(later, usegmt=True)}))
    sleeps = Sleeps()
    policy = RetryPolicy(max_attempts=5, base_s=0.25, max_s=4.0)
    report = await pull(settings_for(), partner_for(fake), "sessions", ListSink(), since=hours_ago(24),
                        retry=policy, sleep=sleeps)
    assert report.retries == 4 and report.objects == 2
    assert len(fake.seen) == 5
    first, second, third, fourth = sleeps.delays
    assert 7 <= first <= 7 + 0.025  # Retry-After first, plus at most a tenth of the jitter ceiling
    assert 0 <= second <= 0.5 and 0 <= third <= 1.0  # full jitter under 0.25 * 2**attempt
    # The HTTP date's whole seconds, less the time since it was written, plus a tenth of the 4th attempt's
    # jitter ceiling (0.25 * 2**3 = 2): up to 30.2 (30.1 failed whenever the jitter drew above 1 early in a second).
    assert 28 <= fourth <= 30 + 0.2
    assert len({s.headers["X-Request-ID"] for s in fake.seen}) == 5  # every attempt is a new request


async def test_a_hubs_transient_4002_and_4003_are_retried(settings_for: Any, fake: FakeSender) -> None:
    """Pulling through a Hub: 4002 (the receiving party did not answer in time) and 4003 (it is not connected) say
    "later", as 3xxx do; they stopped the crawl."""
    fake.objects["sessions"] = [session(1, hours_ago(3))]
    fake.fail_next(Failure(200, 4002), Failure(200, 4003))
    report = await pull(settings_for(), partner_for(fake), "sessions", ListSink(), since=hours_ago(24),
                        retry=RetryPolicy(max_attempts=3, base_s=0.01, max_s=0.02), sleep=Sleeps())
    assert report.retries == 2 and report.objects == 1


async def test_gives_up_after_max_attempts_and_keeps_the_position(settings_for: Any, fake: FakeSender) -> None:
    settings = settings_for()
    fake.objects["sessions"] = [session(1, hours_ago(3))]
    fake.fail_next(*[Failure(503, 3000)] * 3)
    with pytest.raises(PullError, match="gave up after 3 attempts; last: HTTP 503, OCPI 3000"):
        await pull(settings, partner_for(fake), "sessions", ListSink(), since=hours_ago(24),
                   retry=RetryPolicy(max_attempts=3), sleep=Sleeps())
    state = Checkpoint(jobs_dir(settings, "pull") / "cpo-be.sessions.json").load()
    assert state is not None and state["crawl"]["pages"] == 0
    sink = ListSink()
    report = await pull(settings, partner_for(fake), "sessions", sink, sleep=Sleeps())
    assert report.resumed and ids(sink) == ["S0001"]


async def test_invalid_and_foreign_objects_are_recorded_and_the_rest_processed(settings_for: Any,
                                                                              fake: FakeSender) -> None:
    settings = settings_for()
    broken = session(2, hours_ago(4))
    del broken["currency"]
    fake.objects["sessions"] = [session(1, hours_ago(5)), broken, session(3, hours_ago(3), party=("DE", "XXX")),
                                session(4, hours_ago(2))]
    sink = ListSink()
    report = await pull(settings, partner_for(fake), "sessions", sink, since=hours_ago(24))
    assert ids(sink) == ["S0001", "S0004"]
    assert (report.invalid, report.foreign, report.objects) == (1, 1, 2)
    lines = [json.loads(line) for line in rejected_path(settings, "cpo-be", "sessions").read_text().splitlines()]
    assert [(line["index"], line["path"]) for line in lines] == [(1, "$[1].currency"), (0, "$")]
    assert lines[0]["reason"] == "missing required field"
    assert "party DE/XXX is not one this partner may act for" in lines[1]["reason"]
    assert json.loads(lines[0]["object"])["id"] == "S0002" and json.loads(lines[1]["object"])["id"] == "S0003"


@pytest.mark.parametrize("field", ["id", "country_code", "party_id"])
async def test_an_object_with_an_empty_identity_is_refused_as_a_push_would_be(settings_for: Any, fake: FakeSender,
                                                                             field: str) -> None:
    """A push names its object in the URL, whose id, country_code and party_id cannot be empty (and a CDR POST with
    an empty id is refused): a pulled object with an empty one was published, an object no URL can name, keyed
    `BE/BEC/` (through a Hub, whose objects may be any party's, an empty owner too)."""
    settings = settings_for()
    empty = session(2, hours_ago(2))
    empty[field] = ""
    fake.objects["sessions"] = [session(1, hours_ago(3)), empty]
    hub = partner_for(fake)  # BE/BEC is a party behind the Hub
    hub.roles, hub.hub = [credentials_role(country_code="DE", party_id="HUB", role="HUB")], True
    sink = ListSink()
    report = await pull(settings, hub, "sessions", sink, since=hours_ago(24))
    assert ids(sink) == ["S0001"] and (report.invalid, report.foreign) == (1, 0)
    lines = [json.loads(line) for line in rejected_path(settings, "cpo-be", "sessions").read_text().splitlines()]
    assert [(line["index"], line["path"]) for line in lines] == [(1, f"$[1].{field}")]
    assert lines[0]["reason"].startswith("empty")


async def test_an_object_of_a_party_the_partner_registered_in_another_role_than_cpo_is_foreign(
        settings_for: Any, fake: FakeSender) -> None:
    """Sessions are a CPO's (09 §1): pulled as owned by the partner's EMSP party, one is refused like a push."""
    settings = settings_for()
    partner = partner_for(fake)
    partner.roles.append(credentials_role(country_code="BE", party_id="MSP", role="EMSP"))
    fake.objects["sessions"] = [session(1, hours_ago(3)), session(2, hours_ago(2), party=("BE", "MSP"))]
    sink = ListSink()
    report = await pull(settings, partner, "sessions", sink, since=hours_ago(24))
    assert ids(sink) == ["S0001"] and (report.foreign, report.objects) == (1, 1)
    line = json.loads(rejected_path(settings, "cpo-be", "sessions").read_text())
    assert "BE/MSP" in line["reason"] and "CPO" in line["reason"]


async def test_a_hubs_objects_are_each_their_owners_but_none_is_the_hubs_own_party(settings_for: Any,
                                                                                  fake: FakeSender) -> None:
    """Through a Hub (GET All, 04 §10) the objects are any connected party's: each is published under its own owner,
    from the Hub's connection. The Hub's own party is no CPO (a Hub reports only itself, as HUB, 07 §5), so it owns
    no Session or CDR: a push of one is refused (404), and a pulled one is foreign likewise; it was published."""
    settings = settings_for()
    hub = partner_for(fake)
    hub.roles, hub.hub = [credentials_role(country_code="DE", party_id="HUB", role="HUB")], True
    fake.objects["sessions"] = [session(1, hours_ago(4)), session(2, hours_ago(3), party=("NL", "XYZ")),
                                session(3, hours_ago(2), party=("de", "hub"))]
    sink = ListSink()
    report = await pull(settings, hub, "sessions", sink, since=hours_ago(24))
    assert [(e.country_code, e.party_id, e.object_id, e.partner_id) for e in sink.events] == [
        ("BE", "BEC", "S0001", "cpo-be"), ("NL", "XYZ", "S0002", "cpo-be")]
    assert (report.foreign, report.objects) == (1, 2)
    line = json.loads(rejected_path(settings, "cpo-be", "sessions").read_text())
    assert "de/hub" in line["reason"] and "HUB" in line["reason"]
    assert (fake.seen[0].headers["OCPI-to-country-code"], fake.seen[0].headers["OCPI-to-party-id"]) == ("DE", "HUB")


async def test_a_recorded_objects_personal_data_is_pseudonymised(settings_for: Any, fake: FakeSender) -> None:
    # The file is kept with no age limit (nothing deletes it), while personal data is in clear for
    # OCPI_RETENTION_PSEUDONYMISE_DAYS at most (README, Retention): a refused object's token uid, contract id and
    # authorization reference are written as the store's pseudonyms, the rest of it as sent.
    settings = settings_for()
    token = {"country_code": "BE", "party_id": "BEC", "uid": "CLEAR-UID-1", "type": "RFID",
             "contract_id": "CLEAR-CONTRACT-1"}
    broken = session(2, hours_ago(4), cdr_token=token, authorization_reference="CLEAR-AUTH-1")
    del broken["currency"]
    foreign = session(3, hours_ago(3), party=("DE", "XXX"), cdr_token=token)
    fake.objects["sessions"] = [broken, foreign]
    await pull(settings, partner_for(fake), "sessions", ListSink(), since=hours_ago(24))
    text = rejected_path(settings, "cpo-be", "sessions").read_text()
    assert "CLEAR-" not in text
    pseudonym = Pseudonymizer(load_key(settings))
    first, second = (json.loads(json.loads(line)["object"]) for line in text.splitlines())
    assert first["cdr_token"]["uid"] == pseudonym("CLEAR-UID-1") == second["cdr_token"]["uid"]
    assert first["cdr_token"]["contract_id"] == pseudonym("CLEAR-CONTRACT-1")
    assert first["authorization_reference"] == pseudonym("CLEAR-AUTH-1")
    assert (first["id"], second["id"], first["kwh"]) == ("S0002", "S0003", broken["kwh"])


async def test_a_recorded_objects_identifiers_sent_as_numbers_are_pseudonymised(settings_for: Any,
                                                                                   fake: FakeSender) -> None:
    # An object refused for its shape is what holds odd shapes: a token uid or contract id sent as a JSON number
    # (refused: not a string) is personal data all the same, and the file is kept for ever.
    settings = settings_for()
    token = {"country_code": "BE", "party_id": "BEC", "uid": 4711000123, "type": "RFID", "contract_id": 98765432100}
    fake.objects["sessions"] = [session(2, hours_ago(4), cdr_token=token, authorization_reference=5550001)]
    await pull(settings, partner_for(fake), "sessions", ListSink(), since=hours_ago(24))
    text = rejected_path(settings, "cpo-be", "sessions").read_text()
    assert "4711000123" not in text and "98765432100" not in text and "5550001" not in text
    pseudonym = Pseudonymizer(load_key(settings))
    recorded = json.loads(json.loads(text)["object"])
    assert recorded["cdr_token"]["uid"] == pseudonym("4711000123")
    assert recorded["cdr_token"]["contract_id"] == pseudonym("98765432100")
    assert recorded["authorization_reference"] == pseudonym("5550001")


@pytest.mark.parametrize(("field", "odd"), [
    ("cdr_token", {"uid": ["4711000123"], "contract_id": {"id": "NL-ABC-98765432100"}}),
    ("cdr_token", "4711000123/NL-ABC-98765432100"),
    ("authorization_reference", ["5550001"]),
])
async def test_a_recorded_objects_identifiers_in_any_shape_are_pseudonymised(settings_for: Any, fake: FakeSender,
                                                                             field: str, odd: Any) -> None:
    # A list or an object where an identifier belongs (or a token that is not an object) holds the same
    # personal data: it is written as the pseudonym of its text.
    settings = settings_for()
    fake.objects["sessions"] = [session(2, hours_ago(4), **{field: odd})]
    await pull(settings, partner_for(fake), "sessions", ListSink(), since=hours_ago(24))
    text = rejected_path(settings, "cpo-be", "sessions").read_text()
    assert "4711000123" not in text and "98765432100" not in text and "5550001" not in text


@pytest.mark.parametrize("wrap", [
    lambda s: {"last_updated": s["last_updated"], "session": s},
    lambda s: {"last_updated": s["last_updated"], "data": [s]},
    lambda s: {"last_updated": s["last_updated"], "page": [{"items": [s]}]},
])
async def test_a_recorded_elements_identifiers_below_its_top_level_are_pseudonymised(
        settings_for: Any, fake: FakeSender, wrap: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    # A partner that wraps each object of its list (in an object of its own, a list) has every element refused
    # (no country_code at the top): the element was written as sent, its token uid, contract id and authorization
    # reference in clear in a file kept for ever, as only the top level was looked at.
    settings = settings_for()
    token = {"country_code": "BE", "party_id": "BEC", "uid": "4711000123", "type": "RFID",
             "contract_id": "NL-ABC-98765432100"}
    fake.objects["sessions"] = [wrap(session(2, hours_ago(4), cdr_token=token, authorization_reference="5550001"))]
    report = await pull(settings, partner_for(fake), "sessions", ListSink(), since=hours_ago(24))
    assert report.invalid == 1
    text = rejected_path(settings, "cpo-be", "sessions").read_text()
    assert "4711000123" not in text and "98765432100" not in text and "5550001" not in text
    assert Pseudonymizer(load_key(settings))("4711000123") in text


async def test_interrupted_crawl_resumes_after_the_last_acknowledged_page(settings_for: Any,
                                                                         fake: FakeSender) -> None:
    settings = settings_for()
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 6)]
    until = hours_ago(0.5)
    failing = ListSink(fail_on=2)
    with pytest.raises(RuntimeError, match="broker down"):
        await pull(settings, partner_for(fake), "sessions", failing, since=hours_ago(24), until=until)
    assert ids(failing) == ["S0001", "S0002"]

    sink = ListSink()
    report = await pull(settings, partner_for(fake), "sessions", sink)
    assert report.resumed and ids(sink) == ["S0003", "S0004", "S0005"]
    assert fake.offsets("sessions") == [0, 2, 2, 4]  # the unacknowledged page is read again, nothing before it

    fake.objects["sessions"].append(session(6, hours_ago(0.25)))
    newest = ListSink()
    report = await pull(settings, partner_for(fake), "sessions", newest)
    assert not report.resumed and ids(newest) == ["S0006"]
    assert fake.seen[-1].query["date_from"] == stamp(until)  # the next window starts where the last ended


async def test_an_interrupted_crawl_goes_on_at_the_partners_new_address(settings_for: Any, fake: FakeSender) -> None:
    """A crawl interrupted before the partner's endpoint moved to another host (a credentials update re-reads its
    endpoints) resumed at its next page's old address, which it may not follow (our token would go there): the pull
    failed at every run ("ask the partner to fix its Link headers"), a schedule's every round, until someone found
    --restart. The same window is crawled again at the endpoint's new address."""
    settings = settings_for()
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 6)]
    since, until = hours_ago(24), hours_ago(0.5)
    with pytest.raises(RuntimeError, match="broker down"):
        await pull(settings, partner_for(fake), "sessions", ListSink(fail_on=2), since=since, until=until)
    old_url = fake.url
    fake.url = lambda module: old_url(module).replace("127.0.0.1", "localhost")  # type: ignore[method-assign]
    moved = partner_for(fake)  # its endpoint, as a credentials update re-reads it, and its next links at localhost
    fake.seen.clear()
    sink = ListSink()
    report = await pull(settings, moved, "sessions", sink)
    assert ids(sink) == ["S0001", "S0002", "S0003", "S0004", "S0005"] and not report.resumed
    assert (report.since, report.until) == (since, until)
    assert fake.seen[0].query["date_from"] == stamp(since) and fake.seen[0].query["date_to"] == stamp(until)

async def test_an_object_the_partner_stamps_behind_our_clock_is_not_left_behind_the_window(
        settings_for: Any, fake: FakeSender) -> None:
    settings = settings_for()
    skew = timedelta(minutes=2)  # the partner's clock runs behind ours
    fake.objects["sessions"] = [session(1, datetime.now(UTC) - skew - timedelta(minutes=30))]
    first = ListSink()
    await pull(settings, partner_for(fake), "sessions", first, since=hours_ago(24))
    # Right after our pull the partner updates S0002: its last_updated is the partner's now, before ours.
    fake.objects["sessions"].append(session(2, datetime.now(UTC) - skew))
    second, third = ListSink(), ListSink()
    await pull(settings, partner_for(fake), "sessions", second)
    await pull(settings, partner_for(fake), "sessions", third, until=datetime.now(UTC) + timedelta(minutes=1))
    assert ids(first) == ["S0001"] and ids(second) + ids(third) == ["S0002"]


async def test_redirects_401_and_missing_prerequisites_stop_the_pull(settings_for: Any, fake: FakeSender) -> None:
    settings = settings_for()
    fake.redirect_to = "http://127.0.0.1:9/elsewhere"
    with pytest.raises(PullError, match=r"redirected .* not followed"):
        await pull(settings, partner_for(fake), "sessions", ListSink(), since=hours_ago(1), restart=True)
    assert len(fake.seen) == 1

    fake.redirect_to = None
    with pytest.raises(PullError, match="refused our token"):
        await pull(settings, partner_for(fake, token="wrong"), "sessions", ListSink(), since=hours_ago(1),
                   restart=True)
    with pytest.raises(PullError, match="no token"):
        await pull(settings, partner_for(fake, token=None), "sessions", ListSink(), since=hours_ago(1))
    with pytest.raises(PullError, match="no cdrs SENDER endpoint"):
        await pull(settings, partner_for(fake), "cdrs", ListSink())
    # An operator stopped the partner (`partners suspend`): nothing is sent to it, scheduled rounds included.
    seen = len(fake.seen)
    for status in (PartnerStatus.SUSPENDED, PartnerStatus.UNREGISTERED, PartnerStatus.REGISTERING):
        stopped = msgspec.structs.replace(partner_for(fake), status=status)
        with pytest.raises(PullError, match=f"is {status.value}"):
            await pull(settings, stopped, "sessions", ListSink(), since=hours_ago(1), restart=True)
    assert len(fake.seen) == seen
    with pytest.raises(PullError, match="needs --since"):
        await pull(settings_for(), partner_for(fake), "sessions", ListSink())


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert retry_after_seconds("120", now) == 120
    assert retry_after_seconds("Wed, 01 May 2024 12:00:30 GMT", now) == 30
    assert retry_after_seconds("Wed, 01 May 2024 11:00:00 GMT", now) == 0
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None, now) is None


async def test_a_partner_s_number_that_int_cannot_read_is_taken_for_none(settings_for: Any) -> None:
    """str.isdigit() takes a superscript (a header byte 0xB2 read as Latin-1 is '\u00b2'), which int() and float()
    refuse: a partner's X-Total-Count, X-Limit or Retry-After of one ended the pull in a ValueError traceback."""
    assert retry_after_seconds("\u00b2", datetime(2024, 5, 1, 12, 0, tzinfo=UTC)) is None
    assert query_int("https://cpo.example/sessions?offset=%C2%B2", "offset") is None

    def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"X-Total-Count": b"\xb2", "X-Limit": b"\xb2"},  # read as Latin-1
                              content=_envelope([session(1, hours_ago(3))]))

    sink = ListSink()
    await pull(settings_for(), _mock_partner(), "sessions", sink, since=hours_ago(24),
               transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert ids(sink) == ["S0001"]


async def test_schedule_repeats_survives_a_failed_round_and_stops() -> None:
    stop = asyncio.Event()
    calls: list[int] = []
    errors: list[Exception] = []

    async def once() -> Any:
        calls.append(len(calls))
        if len(calls) == 2:
            raise PullError("partner down")
        if len(calls) == 3:
            stop.set()
        return len(calls)

    state = await pull_every(0.01, 0.01, once, stop, errors.append)
    assert (state.runs, state.failures, len(calls)) == (3, 1, 3)
    assert [str(e) for e in errors] == ["partner down"]


async def test_a_schedule_that_runs_for_weeks_does_not_keep_every_round() -> None:
    """`pull --schedule` runs until stopped: what it keeps must not grow with the rounds it has run (a round a
    minute is half a million a year); it keeps the counts and the last round's report."""
    stop = asyncio.Event()
    rounds = 2000
    done = 0

    async def once() -> PullReport:
        nonlocal done
        done += 1
        if done == rounds:
            stop.set()
        return PullReport("p1", "sessions", None, datetime(2024, 5, 1, tzinfo=UTC), pages=done)

    state = await pull_every(0, 0, once, stop)
    assert (state.runs, state.failures) == (rounds, 0)
    held = {name: len(value) for name, value in vars(state).items() if isinstance(value, list | dict | set | tuple)}
    assert all(size <= 1 for size in held.values()), held
    assert state.last is not None and state.last.pages == rounds


async def test_schedule_cancels_a_round_in_progress_on_stop() -> None:
    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> Any:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    asyncio.get_running_loop().call_later(0.05, stop.set)
    state = await asyncio.wait_for(pull_every(3600, 0, slow, stop), 5)
    assert state.runs == 1 and cancelled.is_set()


def test_date_helpers_round_trip() -> None:
    assert parse(stamp(datetime(2024, 5, 1, 12, 0, tzinfo=UTC))) == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


async def test_scheduled_rounds_continue_where_the_last_completed_pull_ended(settings_for: Any,
                                                                             fake: FakeSender) -> None:
    settings = settings_for()
    partner = partner_for(fake)
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 6)]
    since = hours_ago(24)
    sink = ListSink()
    stop = asyncio.Event()
    reports: list[Any] = []

    async def round_() -> Any:  # as `pull --since … --schedule …` runs its rounds
        report = await pull(settings, partner, "sessions", sink, since=since, since_unless_completed=bool(reports))
        reports.append(report)
        if len(reports) == 3:
            stop.set()
        return report

    await pull_every(0.01, 0.0, round_, stop)
    assert [r.since for r in reports] == [since, reports[0].until, reports[1].until]
    assert [r.objects for r in reports] == [5, 0, 0]  # nothing crawled again
    assert len(sink.records) == 5


async def test_scheduled_rounds_keep_since_until_a_pull_completed(settings_for: Any, fake: FakeSender) -> None:
    settings = settings_for()
    since = hours_ago(24)
    fake.objects["sessions"] = [session(1, hours_ago(3))]
    fake.fail_next(Failure(400, 2001))
    with pytest.raises(PullError):
        await pull(settings, partner_for(fake), "sessions", ListSink(), since=since, since_unless_completed=True)
    report = await pull(settings, partner_for(fake), "sessions", ListSink(), since=since,
                        since_unless_completed=True)
    assert report.since == since  # none completed yet
    again = await pull(settings, partner_for(fake), "sessions", ListSink(), since=since)
    assert again.since == since  # asked for: crawled again
    later = await pull(settings, partner_for(fake), "sessions", ListSink(), since=since, since_unless_completed=True)
    assert later.since == again.until


async def test_a_one_off_window_apart_from_the_pulled_one_does_not_move_where_the_next_pull_starts(
        settings_for: Any, fake: FakeSender) -> None:
    """Every completed pull set the next default start to its own end: a one-off window later than it (a gap before
    it) made the next pull begin after the gap, never pulled (CDRs missed), and a re-pull of an old window sent the
    next one back over everything since."""
    settings = settings_for()
    partner = partner_for(fake)
    fake.objects["sessions"] = []
    t48, t44, t40, t20, t10 = (hours_ago(h) for h in (48, 44, 40, 20, 10))
    await pull(settings, partner, "sessions", ListSink(), since=t48, until=t40)
    await pull(settings, partner, "sessions", ListSink(), since=t20, until=t10)  # a gap before it
    fake.seen.clear()
    await pull(settings, partner, "sessions", ListSink())
    assert fake.seen[0].query["date_from"] == stamp(t40)  # the gap is pulled
    state = Checkpoint(jobs_dir(settings, "pull") / "cpo-be.sessions.json").load()
    assert state is not None
    await pull(settings, partner, "sessions", ListSink(), since=t48, until=t44)  # an old window again
    again = Checkpoint(jobs_dir(settings, "pull") / "cpo-be.sessions.json").load()
    assert again is not None and again["completed_until"] == state["completed_until"]


def _mock_partner(url: str = "http://cpo.example/ocpi/cpo/2.2.1/sessions") -> Partner:
    now = datetime.now(UTC)
    return Partner(partner_id="cpo-be", name="CPO BE", status=PartnerStatus.REGISTERED,
                   roles=[credentials_role(country_code="BE", party_id="BEC", role="CPO")],
                   outbound_token="tok", created_at=now, updated_at=now,
                   endpoints=[Endpoint(identifier="sessions", role=InterfaceRole.SENDER,
                                       url=url)])


def _envelope(data: Any) -> bytes:
    return json.dumps({"status_code": 1000, "timestamp": "2024-01-01T00:00:00Z", "data": data}).encode()


async def test_a_body_that_does_not_decompress_is_retried(settings_for: Any) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"this is not gzip")
        return httpx.Response(200, content=_envelope([session(1, hours_ago(2))]))

    sink, sleeps = ListSink(), Sleeps()
    report = await pull(settings_for(), _mock_partner(), "sessions", sink, since=hours_ago(24),
                        transport=httpx.MockTransport(handler), retry=RetryPolicy(max_attempts=3), sleep=sleeps)
    assert (report.objects, report.retries, len(calls), len(sleeps.delays)) == (1, 1, 2, 1)

    def corrupt(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"this is not gzip")

    with pytest.raises(PullError, match="gave up after 2 attempts; last: DecodingError"):
        await pull(settings_for(), _mock_partner(), "sessions", ListSink(), since=hours_ago(24),
                   transport=httpx.MockTransport(corrupt), retry=RetryPolicy(max_attempts=2), sleep=Sleeps())


async def test_a_page_sent_a_byte_at_a_time_is_bounded_by_the_outbound_timeout(settings_for: Any) -> None:
    """httpx's timeouts bound each wait for a chunk, not the answer: a partner (or a proxy) sending its page a few
    bytes at a time held the pull, and a scheduled one's every later round, for as long as it liked, though
    OCPI_OUTBOUND_TIMEOUT is what an outgoing call may take. The page is given up after it and retried."""
    body = _envelope([session(1, hours_ago(2))])

    async def dribble() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 16):
            await asyncio.sleep(0.1)
            yield body[start:start + 16]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=dribble())

    assert len(body) // 16 * 0.1 > 3  # the whole answer takes longer than the timeout below
    started = asyncio.get_running_loop().time()
    with pytest.raises(PullError, match="gave up after 2 attempts; last: no answer within the timeout"):
        await pull(settings_for(OCPI_OUTBOUND_TIMEOUT="1"), _mock_partner(), "sessions", ListSink(),
                   since=hours_ago(24), transport=httpx.MockTransport(handler), retry=RetryPolicy(max_attempts=2),
                   sleep=Sleeps())
    assert asyncio.get_running_loop().time() - started < 3


@pytest.mark.parametrize("rel", ['rel="Next"', "rel=NEXT", 'rel="prev next"'])
async def test_a_next_link_is_followed_whatever_the_case_of_its_relation_type(settings_for: Any, rel: str) -> None:
    """Link relation types compare case-insensitively, and one rel may name several (RFC 8288 §2.1.1, §3.3):
    a partner writing `rel="Next"` had its first page taken for the last, the window completed without the rest."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params["offset"] == "0":
            return httpx.Response(200, headers={"Link": f"<?offset=1&limit=1>; {rel}", "X-Total-Count": "2"},
                                  content=_envelope([session(1, hours_ago(3))]))
        return httpx.Response(200, headers={"X-Total-Count": "2"}, content=_envelope([session(2, hours_ago(2))]))

    sink = ListSink()
    await pull(settings_for(), _mock_partner(), "sessions", sink, since=hours_ago(24),
               transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert ids(sink) == ["S0001", "S0002"]


@pytest.mark.parametrize("link", [
    '<?offset=1&limit=1>; title="page; 2"; rel="next"',  # a quoted value holding ';'
    '<?offset=1&limit=1>; anchor="?offset=0&limit=1"; rel="next"',  # ... holding '='
    '<?offset=1&limit=1>; crossorigin; rel=next',  # a parameter without a value
    '<?offset=1&limit=1>; Rel="next"',  # parameter names are case-insensitive
    '<?offset=0&limit=1>; rel="prev"; title="a, <b>", <?offset=1&limit=1>; rel="next"',  # ',' and '<' quoted
    '<?offset=1&limit=1>; rel="next"; rel="last"',  # only the first rel counts
])
async def test_a_next_link_with_any_parameters_rfc_8288_allows_is_followed(settings_for: Any, link: str) -> None:
    """A Link header's parameters may be quoted strings holding ';', ',', '=' or '<', may have no value, and
    their names compare case-insensitively (RFC 8288 §3, Appendix B): read otherwise, the `rel` of such a link
    was lost, the first page taken for the last and the window completed with every later page unread."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params["offset"] == "0":
            return httpx.Response(200, headers={"Link": link, "X-Total-Count": "2"},
                                  content=_envelope([session(1, hours_ago(3))]))
        return httpx.Response(200, headers={"X-Total-Count": "2"}, content=_envelope([session(2, hours_ago(2))]))

    sink = ListSink()
    report = await pull(settings_for(), _mock_partner(), "sessions", sink, since=hours_ago(24),
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert (ids(sink), report.unread) == (["S0001", "S0002"], 0)


async def test_a_link_that_is_not_next_ends_the_crawl(settings_for: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Link": '<?offset=0&limit=1>; rel="first"; title="next"',
                                            "X-Total-Count": "1"}, content=_envelope([session(1, hours_ago(3))]))

    sink = ListSink()
    report = await pull(settings_for(), _mock_partner(), "sessions", sink, since=hours_ago(24),
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert (ids(sink), report.pages) == (["S0001"], 1)


@pytest.mark.parametrize("link", ['<http://[::1/bad>; rel="next"', '<http://xn--/x>; rel="next"'])
async def test_a_next_link_that_is_no_url_stops_the_pull_cleanly(settings_for: Any, link: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Link": link}, content=_envelope([session(1, hours_ago(2))]))

    settings = settings_for()
    with pytest.raises(PullError, match="not a"):
        await pull(settings, _mock_partner(), "sessions", ListSink(), since=hours_ago(24),
                   transport=httpx.MockTransport(handler), retry=RetryPolicy(max_attempts=2), sleep=Sleeps())


async def test_an_envelope_with_invalid_utf8_stops_the_pull_cleanly(settings_for: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"status_code": 1000, "status_message": "\xff", "data": []}')

    with pytest.raises(PullError, match="not an OCPI response envelope"):
        await pull(settings_for(), _mock_partner(), "sessions", ListSink(), since=hours_ago(24),
                   transport=httpx.MockTransport(handler), retry=RetryPolicy(max_attempts=2), sleep=Sleeps())


async def test_an_envelope_nested_too_deeply_stops_the_pull_cleanly(settings_for: Any) -> None:
    """msgspec raises RecursionError (not DecodeError) for JSON nested deeper than it parses."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"status_code": 1000, "data": [' + b"[" * 5000 + b"]" * 5000 + b"]}")

    with pytest.raises(PullError, match="not an OCPI response envelope"):
        await pull(settings_for(), _mock_partner(), "sessions", ListSink(), since=hours_ago(24),
                   transport=httpx.MockTransport(handler), retry=RetryPolicy(max_attempts=2), sleep=Sleeps())


async def test_the_same_relative_since_resumes_an_interrupted_crawl(settings_for: Any, fake: FakeSender) -> None:
    settings = settings_for()
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 6)]
    failing = ListSink(fail_on=2)
    with pytest.raises(RuntimeError, match="broker down"):  # `pull --since 1d`, the broker fails on page 2
        await pull(settings, partner_for(fake), "sessions", failing, since=parse_time("1d"), relative=("1d", None))
    first_window = fake.seen[0].query["date_from"]
    await asyncio.sleep(0.01)  # `1d` is a moment later now
    sink = ListSink()
    report = await pull(settings, partner_for(fake), "sessions", sink, since=parse_time("1d"), relative=("1d", None))
    assert report.resumed and ids(failing) + ids(sink) == ["S0001", "S0002", "S0003", "S0004", "S0005"]
    assert all(s.query["date_from"] == first_window for s in fake.seen)  # the window it started with

    await pull(settings, partner_for(fake), "sessions", ListSink(), since=parse_time("1d"), relative=("1d", None))
    other = ListSink(fail_on=1)
    with pytest.raises(RuntimeError, match="broker down"):
        await pull(settings, partner_for(fake), "sessions", other, since=parse_time("1d"), relative=("1d", None))
    report = await pull(settings, partner_for(fake), "sessions", ListSink(), since=parse_time("2d"),
                        relative=("2d", None))
    assert not report.resumed  # another --since: another crawl


@pytest.mark.parametrize("link", ["https://elsewhere.example/ocpi/cpo/2.2.1/sessions?offset=1&limit=1",
                                  "http://cpo.example/ocpi/cpo/2.2.1/sessions?offset=1&limit=1",
                                  "https://cpo.example:8443/ocpi/cpo/2.2.1/sessions?offset=1&limit=1"])
async def test_a_next_link_to_another_origin_is_not_sent_our_token(settings_for: Any, link: str) -> None:
    """Like a redirect, a next link to another scheme, host or port would hand our token to whoever is there
    (in clear text over http): the crawl stops instead, before any request goes there."""
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.host != "cpo.example" or request.url.scheme != "https" or request.url.port is not None:
            return httpx.Response(200, content=_envelope([]))
        return httpx.Response(200, headers={"Link": f'<{link}>; rel="next"'},
                              content=_envelope([session(1, hours_ago(2))]))

    partner = _mock_partner("https://cpo.example/ocpi/cpo/2.2.1/sessions")
    settings, sink = settings_for(), ListSink()
    with pytest.raises(PullError, match="another origin"):
        await pull(settings, partner, "sessions", sink, since=hours_ago(24),
                   transport=httpx.MockTransport(handler), retry=RetryPolicy(max_attempts=2), sleep=Sleeps())
    assert [str(r.url.copy_with(query=None)) for r in requests] == ["https://cpo.example/ocpi/cpo/2.2.1/sessions"]
    # The first page was acknowledged and checkpointed; the window is not completed.
    assert ids(sink) == ["S0001"]
    state = Checkpoint(jobs_dir(settings, "pull") / "cpo-be.sessions.json").load()
    assert state is not None and state["completed_until"] is None


async def test_a_window_asked_past_now_counts_as_ended_where_it_had_settled(settings_for: Any,
                                                                           fake: FakeSender) -> None:
    """`--until` later than now: the crawl asks for it, but the next window starts where the crawl's objects
    had settled, not at that future instant: objects the partner stamps after the crawl and before it would
    otherwise never be pulled."""
    settings = settings_for()
    fake.objects["sessions"] = [session(1, hours_ago(3))]
    first = ListSink()
    await pull(settings, partner_for(fake), "sessions", first, since=hours_ago(24),
               until=datetime.now(UTC) + timedelta(hours=1))
    fake.objects["sessions"].append(session(2, datetime.now(UTC)))  # updated right after that crawl
    later = ListSink()
    await pull(settings, partner_for(fake), "sessions", later, until=datetime.now(UTC) + timedelta(hours=2))
    assert ids(first) == ["S0001"] and ids(later) == ["S0002"]


async def test_a_second_pull_of_the_same_partner_and_module_while_one_runs_is_refused(settings_for: Any,
                                                                                     fake: FakeSender) -> None:
    """A manual pull while a scheduled one crawls (or two terminals): the second resumed the first's crawl from
    the checkpoint, both crawled the same pages, every object was published twice, and each overwrote the
    other's position."""
    settings = settings_for()
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 6)]
    since, until = hours_ago(24), hours_ago(0.5)
    sink = ListSink()
    first, second = await asyncio.gather(
        pull(settings, partner_for(fake), "sessions", sink, since=since, until=until),
        pull(settings, partner_for(fake), "sessions", sink, since=since, until=until), return_exceptions=True)

    refused = [r for r in (first, second) if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], JobError) and "running already" in str(refused[0])
    assert ids(sink) == ["S0001", "S0002", "S0003", "S0004", "S0005"]  # each once
    report = await pull(settings, partner_for(fake), "sessions", ListSink())  # the lock went with the first
    assert not report.resumed and report.since == until


def test_routing_headers_of_an_answer_are_kept_for_any_party_a_partner_may_register() -> None:
    """A party id is a CiString(3), as the receivers check it (`A-B`, `X` are valid): the pulled events of such a
    party lost their routing headers, which were checked as three letters or digits."""
    import httpx

    from pipeline.jobs.pull import _party

    headers = httpx.Headers({"OCPI-from-country-code": "N1", "OCPI-from-party-id": "A-B",
                             "OCPI-to-country-code": "nl", "OCPI-to-party-id": "X"})
    assert _party(headers, "from") == ("N1", "A-B")
    assert _party(headers, "to") == ("nl", "X")
    assert _party(httpx.Headers({"OCPI-from-country-code": "NLD", "OCPI-from-party-id": "ABC"}), "from") is None
    assert _party(httpx.Headers({"OCPI-from-country-code": "NL", "OCPI-from-party-id": "ABCD"}), "from") is None


async def test_a_last_page_short_of_the_announced_total_is_reported(settings_for: Any) -> None:
    """A page without a next link is the last one (04 §4.2), but X-Total-Count announced more: the crawl took the
    window as read and said nothing, so the objects the broken paging never led to were lost without a word."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params["offset"] == "0":
            return httpx.Response(200, headers={"Link": '<?offset=1&limit=1>; rel="next"', "X-Total-Count": "5"},
                                  content=_envelope([session(1, hours_ago(3))]))
        return httpx.Response(200, headers={"X-Total-Count": "5"}, content=_envelope([session(2, hours_ago(2))]))

    sink = ListSink()
    report = await pull(settings_for(), _mock_partner(), "sessions", sink, since=hours_ago(24),
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert ids(sink) == ["S0001", "S0002"] and report.unread == 3


async def test_a_complete_crawl_reports_nothing_unread(settings_for: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params["offset"] == "0":
            return httpx.Response(200, headers={"Link": '<?offset=1&limit=1>; rel="next"', "X-Total-Count": "2"},
                                  content=_envelope([session(1, hours_ago(3))]))
        return httpx.Response(200, headers={"X-Total-Count": "2"}, content=_envelope([session(2, hours_ago(2))]))

    report = await pull(settings_for(), _mock_partner(), "sessions", ListSink(), since=hours_ago(24),
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert report.unread == 0


@pytest.mark.parametrize("total", [{"X-Total-Count": "2"}, {}])
async def test_a_partner_that_always_sends_a_next_link_does_not_keep_the_crawl_going_for_ever(
        settings_for: Any, total: dict[str, str]) -> None:
    """A partner that writes a next link on every page, the last one too (offset past its X-Total-Count, no
    objects): the crawl followed it to ever higher offsets of empty pages, for ever, and never completed the window.
    An empty page at or past the announced total is the last; so is one without a total (it announced none, which
    it must: nothing tells its empty pages from the end, and a scheduled round would never end)."""
    requests: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params["offset"])
        requests.append(offset)
        if len(requests) > 20:
            return httpx.Response(401)  # stop a crawl that would not end
        data = [session(offset + 1, hours_ago(3 - offset))] if offset < 2 else []
        return httpx.Response(200, headers={"Link": f'<?offset={offset + 1}&limit=1>; rel="next"', **total},
                              content=_envelope(data))

    settings, sink = settings_for(), ListSink()
    report = await pull(settings, _mock_partner(), "sessions", sink, since=hours_ago(24),
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert ids(sink) == ["S0001", "S0002"] and requests == [0, 1, 2]
    assert (report.pages, report.unread) == (3, 0)
    state = Checkpoint(jobs_dir(settings, "pull") / "cpo-be.sessions.json").load()
    assert state is not None and state["crawl"] is None and state["completed_until"] is not None


async def test_a_next_link_past_the_objects_a_capped_page_held_skips_none_of_them(settings_for: Any) -> None:
    """A server that caps `limit` (X-Limit 2) but writes its next link from the limit asked for (offset + 3, as
    04 §4.2's example warns against): the crawl followed it and skipped the objects between the page's end and that
    offset, for good. The next page is read from where the page's objects ended."""
    objects = [session(i, hours_ago(10 - i)) for i in range(1, 8)]

    def handler(request: httpx.Request) -> httpx.Response:
        offset, asked = int(request.url.params["offset"]), int(request.url.params["limit"])
        page = objects[offset:offset + min(asked, 2)]
        headers = {"X-Total-Count": str(len(objects)), "X-Limit": "2"}
        if offset + len(page) < len(objects):
            headers["Link"] = f'<?offset={offset + asked}&limit={asked}>; rel="next"'
        return httpx.Response(200, headers=headers, content=_envelope(page))

    sink = ListSink()
    report = await pull(settings_for(), _mock_partner(), "sessions", sink, since=hours_ago(24), limit=3,
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert ids(sink) == [f"S000{i}" for i in range(1, 8)] and report.unread == 0


@pytest.mark.parametrize("back", [0, 1])
async def test_a_next_link_back_to_a_page_read_before_stops_the_pull(settings_for: Any, back: int) -> None:
    """A last page whose next link leads back (to the first page, or to itself written another way): the crawl read
    the pages again and again, publishing their objects every time, for ever (only a link equal to the page's own
    URL, character for character, stopped it)."""
    requests: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params["offset"])
        requests.append(offset)
        if len(requests) > 10:
            return httpx.Response(401)  # stop a crawl that would not end
        link = f"<?offset={offset + 1}&limit=1>" if offset == 0 else f"<?limit=1&offset={back}>"
        return httpx.Response(200, headers={"Link": f'{link}; rel="next"', "X-Total-Count": "2"},
                              content=_envelope([session(offset + 1, hours_ago(3 - offset))]))

    settings, sink = settings_for(), ListSink()
    with pytest.raises(PullError, match="goes back"):
        await pull(settings, _mock_partner(), "sessions", sink, since=hours_ago(24),
                   transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert requests == [0, 1] and ids(sink) == ["S0001"]
    state = Checkpoint(jobs_dir(settings, "pull") / "cpo-be.sessions.json").load()
    assert state is not None and state["completed_until"] is None and state["crawl"]["pages"] == 1


@pytest.mark.parametrize("options", [["--schedule", "0"], ["--schedule", "-60"], ["--schedule", "nan"],
                                     ["--schedule", "3600", "--splay", "-10"], ["--max-attempts", "0"]])
def test_a_schedule_or_retry_count_that_cannot_work_is_refused_before_anything_runs(options: list[str]) -> None:
    """--schedule 0 (or negative) pulled again at once after every round, for ever (04 §3: poll rarely, with
    splay); --max-attempts 0 gave up on the first page without asking for it."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    result = CliRunner().invoke(cli, ["pull", "--partner", "p", "--module", "cdrs", *options])
    assert result.exit_code == 2 and f"Invalid value for '{options[-2]}'" in result.output, result.output


@pytest.mark.clickhouse
def test_pull_with_another_key_than_the_stores_stops_before_it_pulls(settings_for: Any) -> None:
    """The refused objects' file holds "the store's pseudonyms" (README, Retention), but `pull` used whatever key its
    data dir had, or generated one there (another container's volume, another OCPI_DATA_DIR), and checked nothing:
    its pseudonyms then joined with none of the store's. It now stops, as a worker and `retention apply` do."""
    from click.testing import CliRunner

    from infra.clickhouse.client import connect, connect_for
    from infra.clickhouse.migrations import migrate
    from infra.settings import as_environ
    from pipeline.cli import cli
    from pipeline.retention import check_key
    from receivers.registry import PartnerRegistry

    settings = settings_for(OCPI_KAFKA_BOOTSTRAP="127.0.0.1:1")
    migrate(connect(settings.clickhouse_dsn), settings.clickhouse.database)
    client = connect_for(settings)
    check_key(client, b"the-key-of-the-workers-0123456789", recorded_by="worker")  # the store's key, not pull's
    PartnerRegistry(client).register_direct("cpo-be", "CPO BE", [credentials_role(country_code="BE", party_id="BEC",
                                                                                  role="CPO")])
    result = CliRunner().invoke(cli, ["pull", "--partner", "cpo-be", "--module", "sessions"],
                                env=as_environ(settings))
    assert result.exit_code == 1 and "OCPI_PSEUDONYM_KEY" in result.output, result.output


async def test_a_page_read_again_after_kafka_failed_records_its_refused_objects_once(settings_for: Any,
                                                                                    fake: FakeSender) -> None:
    """The refused objects of a page were recorded before its events were sent: when Kafka failed the send (an
    outage; or the process died there), the rerun read the page again and recorded them a second time."""
    settings = settings_for()
    broken = session(2, hours_ago(4))
    del broken["currency"]
    fake.objects["sessions"] = [session(1, hours_ago(5)), broken]
    with pytest.raises(RuntimeError, match="broker down"):
        await pull(settings, partner_for(fake), "sessions", ListSink(fail_on=1), since=hours_ago(24))
    sink = ListSink()
    report = await pull(settings, partner_for(fake), "sessions", sink)

    assert report.resumed and ids(sink) == ["S0001"]
    lines = [json.loads(line) for line in rejected_path(settings, "cpo-be", "sessions").read_text().splitlines()]
    assert [json.loads(line["object"])["id"] for line in lines] == ["S0002"]  # once


class Progress(NoProgress):
    def __init__(self) -> None:
        self.started: list[str] = []

    def start(self, description: str, total: int | None) -> None:
        self.started.append(description)


def _platform(fake: FakeSender) -> Partner:
    """A platform hosting two CPO parties (03 case 3; 07's credentials with several roles) that lists, for a GET,
    the objects of the party its OCPI-to-* headers name."""
    fake.route_by_to_party = True
    partner = partner_for(fake)
    partner.roles.append(credentials_role(country_code="NL", party_id="ABC", role="CPO"))
    return partner


async def test_each_cpo_party_of_a_platform_is_pulled_with_its_own_checkpoint(settings_for: Any,
                                                                             fake: FakeSender) -> None:
    """Every GET of a pull was addressed to the partner's first CPO role: a platform routing by the OCPI-to-*
    headers answered only that party's objects, the other party's were never pulled, and the window's checkpoint
    moved past them (their CDRs lost for billing). Each CPO party is now crawled, with its own checkpoint."""
    settings = settings_for()
    partner = _platform(fake)
    fake.objects["sessions"] = [session(1, hours_ago(4)), session(2, hours_ago(3), party=("NL", "ABC")),
                                session(3, hours_ago(2))]
    since, until = hours_ago(24), hours_ago(1)
    sink = ListSink()
    progress = Progress()
    report = await pull(settings, partner, "sessions", sink, since=since, until=until, progress=progress)
    assert sorted((e.country_code, e.party_id, e.object_id) for e in sink.events) == [
        ("BE", "BEC", "S0001"), ("BE", "BEC", "S0003"), ("NL", "ABC", "S0002")]
    assert progress.started == ["pull sessions from cpo-be for BE/BEC", "pull sessions from cpo-be for NL/ABC"]
    assert {(s.headers["OCPI-to-country-code"], s.headers["OCPI-to-party-id"]) for s in fake.seen} == {
        ("BE", "BEC"), ("NL", "ABC")}
    assert [(p.party, p.objects) for p in report.parties] == [(("BE", "BEC"), 2), (("NL", "ABC"), 1)]
    assert report.objects == 3 and report.foreign == 0

    # Each party continues where its own completed pulls end.
    fake.objects["sessions"].append(session(4, hours_ago(0.5), party=("NL", "ABC")))
    fake.seen.clear()
    later = ListSink()
    await pull(settings, partner, "sessions", later)
    assert ids(later) == ["S0004"]
    assert {s.query["date_from"] for s in fake.seen} == {stamp(until)}


async def test_a_checkpoint_from_before_is_carried_over_to_the_first_cpo_party(settings_for: Any,
                                                                              fake: FakeSender) -> None:
    """The checkpoint the pulls wrote for the first CPO party only stays that party's (neither pulled again nor
    skipped); a party never pulled starts at `--since`, a schedule's later rounds too until its pull completed."""
    settings = settings_for()
    fake.objects["sessions"] = [session(1, hours_ago(5))]
    until = hours_ago(4)
    await pull(settings, partner_for(fake), "sessions", ListSink(), since=hours_ago(24), until=until)
    partner = _platform(fake)
    fake.objects["sessions"] += [session(2, hours_ago(3)), session(3, hours_ago(10), party=("NL", "ABC"))]
    fake.seen.clear()
    sink = ListSink()
    since = hours_ago(24)
    report = await pull(settings, partner, "sessions", sink, since=since, since_unless_completed=True)
    assert sorted(ids(sink)) == ["S0002", "S0003"]
    assert [(p.party, p.since) for p in report.parties] == [(("BE", "BEC"), until), (("NL", "ABC"), since)]


async def test_the_checkpoint_from_before_stays_its_partys_when_another_party_is_listed_first(
        settings_for: Any, fake: FakeSender) -> None:
    """The checkpoint written while the partner was crawled as one party went to whichever CPO party its roles now
    listed first: a partner that added a party before the one pulled so far (a credentials update) had the new
    party start where the old one's pulls ended, so the new party's earlier objects were never pulled (S0003, its
    CDRs lost for billing), and the old party pulled again from `--since`. The checkpoint records its party; it
    stays that party's."""
    settings = settings_for()
    fake.objects["sessions"] = [session(1, hours_ago(5))]
    until = hours_ago(4)
    await pull(settings, partner_for(fake), "sessions", ListSink(), since=hours_ago(24), until=until)
    partner = _platform(fake)
    partner.roles.reverse()  # NL/ABC now comes first
    fake.objects["sessions"] += [session(2, hours_ago(3)), session(3, hours_ago(10), party=("NL", "ABC"))]
    sink = ListSink()
    since = hours_ago(24)
    report = await pull(settings, partner, "sessions", sink, since=since, since_unless_completed=True)
    assert sorted(ids(sink)) == ["S0002", "S0003"]
    assert [(p.party, p.since) for p in report.parties] == [(("NL", "ABC"), since), (("BE", "BEC"), until)]

async def test_a_partner_whose_only_party_changed_does_not_continue_the_other_partys_window(
        settings_for: Any, fake: FakeSender) -> None:
    """A partner crawled as one party keeps one checkpoint: once its only CPO role was another party, that party's
    crawl continued the first one's window and never pulled its objects before that window's end. The checkpoint is
    kept for the party it records, and the new party starts at `--since`."""
    settings = settings_for()
    fake.route_by_to_party = True
    fake.objects["sessions"] = [session(1, hours_ago(5)), session(3, hours_ago(10), party=("NL", "ABC"))]
    until = hours_ago(4)
    await pull(settings, partner_for(fake), "sessions", ListSink(), since=hours_ago(24), until=until)
    moved = partner_for(fake)
    moved.roles = [credentials_role(country_code="NL", party_id="ABC", role="CPO")]
    sink = ListSink()
    since = hours_ago(24)
    report = await pull(settings, moved, "sessions", sink, since=since, since_unless_completed=True)
    assert ids(sink) == ["S0003"] and report.since == since
    fake.objects["sessions"].append(session(2, hours_ago(3)))
    back = ListSink()
    report = await pull(settings, partner_for(fake), "sessions", back, since=since, since_unless_completed=True)
    assert ids(back) == ["S0002"] and report.since == until

async def test_a_party_that_fails_does_not_keep_the_others_from_being_pulled(settings_for: Any,
                                                                            fake: FakeSender) -> None:
    settings = settings_for()
    partner = _platform(fake)
    fake.objects["sessions"] = [session(1, hours_ago(4)), session(2, hours_ago(3), party=("NL", "ABC"))]
    fake.fail_next(Failure(400, 2001))  # the first party's first page
    sink = ListSink()
    with pytest.raises(PullError, match="BE/BEC"):
        await pull(settings, partner, "sessions", sink, since=hours_ago(24), sleep=Sleeps())
    assert ids(sink) == ["S0002"]
    report = await pull(settings, partner, "sessions", sink)  # BE/BEC resumes its crawl, NL/ABC goes on from its end
    assert ids(sink) == ["S0002", "S0001"] and [p.resumed for p in report.parties] == [True, False]


def test_the_checkpoints_of_two_parties_never_share_a_file(settings_for: Any) -> None:
    """A party's checkpoint file is named `<CC>-<PID>`, and CiStrings may hold `-`: NL/`-AB` and `NL-`/AB were one
    file, so one party's crawl continued the other's window (its objects before that window's end never pulled)."""
    from pipeline.jobs.pull import _checkpoint_path

    settings = settings_for()
    parties = [("N-", "ABC"), ("N", "-ABC"), ("N", "ABC"), ("n", "abc")]
    paths = [_checkpoint_path(settings, "cpo-be", "cdrs", party) for party in parties]
    assert len(set(paths[:3])) == 3
    assert paths[2] == paths[3]  # CiStrings: one party whatever the case
    assert paths[2].name == "cpo-be.cdrs.N-ABC.json"  # real codes' files keep their names


class SlowBroker:
    """Stands in for aiokafka's producer under a slow broker: each `send` blocks `append_s` (a full batch waiting
    to drain) before it hands back the record's future, which the broker acknowledges `ack_s` later. Keeps, per
    record, its `received_at` and the moment it was acknowledged."""

    def __init__(self, *, append_s: float, ack_s: float) -> None:
        self.append_s = append_s
        self.ack_s = ack_s
        self.acked: list[tuple[datetime, datetime]] = []  # (received_at, acknowledged at)

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[Any]:
        await asyncio.sleep(self.append_s)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        offset = len(self.acked)

        def ack() -> None:
            self.acked.append((decode_event(value).received_at, datetime.now(UTC)))
            future.set_result(SimpleNamespace(topic=topic, partition=0, offset=offset))

        loop.call_later(self.ack_s, ack)
        return future


def slow_producer(settings: Any, broker: SlowBroker) -> JobProducer:
    producer = JobProducer(settings.kafka, "unused:9092")
    producer._producer = broker  # type: ignore[assignment]
    return producer


async def test_a_pulled_event_reaches_kafka_within_the_send_timeout_of_its_received_at(
        settings_for: Any, fake: FakeSender) -> None:
    """The deadline sweeps' margin is the send timeout: an event stamped before a deadline is in Kafka by the time
    a sweep decides it (README "Deadlines"). The pull stamped a page's events when it built them and then waited
    for their acknowledgements up to 3 × the send timeout after the last send, so under a slow broker (sends that
    wait for a batch to drain) a pulled event landed long after its stamp, for a sweep to flag the deadline it
    answered. Each is stamped as it is handed to the producer, and every one it sends is acknowledged within the
    send timeout of that stamp."""
    settings = settings_for(OCPI_KAFKA_SEND_TIMEOUT="1")
    fake.page_cap = 5
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 6)]
    broker = SlowBroker(append_s=0.3, ack_s=0.05)  # 5 sends of a page take 1.5 s: beyond the send timeout
    report = await pull(settings, partner_for(fake), "sessions", slow_producer(settings, broker),
                        since=hours_ago(24), until=hours_ago(0.5))
    assert report.objects == 5 and len(broker.acked) == 5
    timeout = timedelta(seconds=settings.kafka.send_timeout_s)
    assert all(received_at <= acked <= received_at + timeout for received_at, acked in broker.acked), broker.acked


async def test_a_page_the_broker_acknowledges_later_than_the_send_timeout_fails_the_pull(
        settings_for: Any, fake: FakeSender) -> None:
    """Acknowledged after the send timeout, a page's events may have landed after a sweep decided a deadline they
    answered: the pull fails, as a push is answered 3000, and the page stays unacknowledged in the checkpoint (the
    rerun sends it again: duplicates)."""
    settings = settings_for(OCPI_KAFKA_SEND_TIMEOUT="0.2")
    fake.objects["sessions"] = [session(i, hours_ago(10 - i)) for i in range(1, 3)]
    broker = SlowBroker(append_s=0, ack_s=0.4)  # twice the send timeout, within the 3 × the pull waited
    with pytest.raises(JobError, match="OCPI_KAFKA_SEND_TIMEOUT"):
        await pull(settings, partner_for(fake), "sessions", slow_producer(settings, broker),
                   since=hours_ago(24), until=hours_ago(0.5))
    sink = ListSink()
    report = await pull(settings, partner_for(fake), "sessions", sink)
    assert report.resumed and ids(sink) == ["S0001", "S0002"]


async def test_a_refused_object_that_is_no_utf8_is_recorded_and_the_crawl_goes_on(settings_for: Any) -> None:
    """An object whose id holds bytes that are no UTF-8 is refused (invalid), and recorded pseudonymised: recording
    read it as JSON, failed with a UnicodeDecodeError after the page's valid objects were sent but before its
    checkpoint, so every rerun sent them again and failed there, the window never completed."""
    good = json.dumps(session(1, hours_ago(3))).encode()
    bad = json.dumps(session(2, hours_ago(2))).encode().replace(b'"S0002"', b'"S\xe90002"')
    later = json.dumps(session(3, hours_ago(1))).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params["offset"] == "0":
            return httpx.Response(200, headers={"Link": "<?offset=2&limit=2>; rel=next", "X-Total-Count": "3"},
                                  content=b'{"status_code": 1000, "timestamp": "2024-01-01T00:00:00Z", "data": ['
                                          + good + b", " + bad + b"]}")
        return httpx.Response(200, headers={"X-Total-Count": "3"}, content=_envelope([json.loads(later)]))

    settings, sink = settings_for(), ListSink()
    report = await pull(settings, _mock_partner(), "sessions", sink, since=hours_ago(24), limit=2,
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert ids(sink) == ["S0001", "S0003"] and (report.invalid, report.objects, report.pages) == (1, 2, 2)
    [line] = [json.loads(line) for line in rejected_path(settings, "cpo-be", "sessions").read_text().splitlines()]
    assert (line["index"], line["path"]) == (1, "$[1]") and "not UTF-8" in line["reason"]
    assert json.loads(line["object"])["kwh"] == session(2, hours_ago(2))["kwh"]


async def test_an_object_that_is_no_utf8_is_refused_as_a_push_would_be(settings_for: Any) -> None:
    """A push whose body is not UTF-8 is no JSON (HTTP 400), wherever the bad bytes are; a pulled object with them in a
    field the model does not read (a vendor extension) was published as valid, since the decoder skips such a field
    unread. It is recorded as invalid, the page's other objects published."""
    good = json.dumps(session(1, hours_ago(3))).encode()
    bad = json.dumps(session(2, hours_ago(2))).encode()[:-1] + b', "x_vendor": "caf\xe9"}'
    body = b'{"status_code": 1000, "timestamp": "2024-01-01T00:00:00Z", "data": [' + good + b", " + bad + b"]}"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    settings, sink = settings_for(), ListSink()
    report = await pull(settings, _mock_partner(), "sessions", sink, since=hours_ago(24),
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert ids(sink) == ["S0001"] and (report.invalid, report.objects) == (1, 1)
    [line] = [json.loads(line) for line in rejected_path(settings, "cpo-be", "sessions").read_text().splitlines()]
    assert (line["index"], line["path"]) == (1, "$[1]") and "not UTF-8" in line["reason"]


async def test_an_object_larger_than_a_push_may_be_is_refused_as_a_push_would_be(settings_for: Any) -> None:
    """A push body is at most `receivers.app.MAX_BODY_BYTES` (HTTP 413 beyond). A pulled object of any size up to the
    page's limit (64 MB) was published: one the push of which is refused, and past the largest record Kafka takes
    (16 MB) one that failed the page's send, on every rerun, so the window never completed. It is recorded as
    invalid, the page's other objects published."""
    from receivers.app import MAX_BODY_BYTES

    big = session(2, hours_ago(2), x_vendor="x" * MAX_BODY_BYTES)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_envelope([session(1, hours_ago(3)), big, session(3, hours_ago(1))]))

    settings, sink = settings_for(), ListSink()
    report = await pull(settings, _mock_partner(), "sessions", sink, since=hours_ago(24),
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert ids(sink) == ["S0001", "S0003"] and (report.invalid, report.objects) == (1, 2)
    [line] = [json.loads(line) for line in rejected_path(settings, "cpo-be", "sessions").read_text().splitlines()]
    assert (line["index"], line["path"]) == (1, "$[1]") and "more than the 4194304 an object may be" in line["reason"]


async def test_a_partner_whose_next_links_carry_no_offset_is_not_reported_short(settings_for: Any) -> None:
    """A next link is the partner's URL, whatever it holds (04 §4.2): one that pages by `page=N` (no offset) was
    complete, yet its last page was taken to start at offset 0 and reported short of X-Total-Count ('4 more objects
    than its pages led to'), a false alarm in every summary. Where a page's offset is not known, nothing is said."""
    objects = [session(i, hours_ago(10 - i)) for i in range(1, 6)]

    def handler(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params.get("page", "1"))
        headers = {"X-Total-Count": "5", "X-Limit": "2"}
        if page * 2 < 5:
            headers["Link"] = f'<?page={page + 1}>; rel="next"'
        return httpx.Response(200, headers=headers, content=_envelope(objects[(page - 1) * 2:page * 2]))

    sink = ListSink()
    report = await pull(settings_for(), _mock_partner(), "sessions", sink, since=hours_ago(24),
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert (ids(sink), report.pages, report.unread) == (["S0001", "S0002", "S0003", "S0004", "S0005"], 3, 0)


async def test_a_partner_paging_without_offset_that_always_links_does_not_keep_the_crawl_going(
        settings_for: Any) -> None:
    """An empty page with a next link is the last once it is at or past X-Total-Count: a partner that links on every
    page would otherwise lead the crawl through empty pages for ever. A partner paging by `page=N` has no offset to
    compare: its empty pages were followed for ever (here, until it stops linking after 50 pages)."""
    objects = [session(i, hours_ago(10 - i)) for i in range(1, 4)]
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        page = int(request.url.params.get("page", "1"))
        headers = {"X-Total-Count": "3", "X-Limit": "2"}
        if len(calls) < 50:
            headers["Link"] = f'<?page={page + 1}>; rel="next"'
        return httpx.Response(200, headers=headers, content=_envelope(objects[(page - 1) * 2:page * 2]))

    sink = ListSink()
    report = await pull(settings_for(), _mock_partner(), "sessions", sink, since=hours_ago(24),
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert (ids(sink), report.pages, len(calls)) == (["S0001", "S0002", "S0003"], 3, 3)


async def test_a_partner_that_ignores_its_own_page_parameter_stops_the_pull(settings_for: Any) -> None:
    """A partner whose next links page by `page=N` but that answers the first page at every one of them was followed
    for as long as it linked, publishing the same objects each time, and the window then completed with the later
    objects never seen. As for a partner that ignores `offset`, a page at another URL holding exactly the objects of
    the page before it (the total unchanged) stops the pull."""
    objects = [session(i, hours_ago(10 - i)) for i in range(1, 6)]
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        page = int(request.url.params.get("page", "1"))
        headers = {"X-Total-Count": "5", "X-Limit": "2", "Link": f'<?page={page + 1}>; rel="next"'}
        if page >= 3:
            del headers["Link"]
        return httpx.Response(200, headers=headers, content=_envelope(objects[:2]))

    settings, sink = settings_for(), ListSink()
    with pytest.raises(PullError, match="holds exactly the objects of the page"):
        await pull(settings, _mock_partner(), "sessions", sink, since=hours_ago(24),
                   transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert ids(sink) == ["S0001", "S0002"] and len(calls) == 2
    state = Checkpoint(jobs_dir(settings, "pull") / "cpo-be.sessions.json").load()
    assert state is not None and state["completed_until"] is None


async def test_an_interrupted_crawl_goes_on_at_the_partners_new_path_on_the_same_host(settings_for: Any) -> None:
    """A credentials update may move the Sender endpoint to another path of the same host (a new version's URL, say
    /ocpi/2.2.1/... after /ocpi/2.1.1/...). A crawl interrupted before resumed at its next page's old path, only
    another host counting as moved: answered 404 there, the pull failed at every run until --restart; answered by the
    old version still, it read that version's objects (refused as invalid here) and completed the window without the
    new endpoint's. The same window is crawled again at the endpoint's new URL."""
    objects = [session(i, hours_ago(10 - i)) for i in range(1, 4)]
    seen: list[str] = []
    upgraded = False

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if upgraded and request.url.path.startswith("/ocpi/2.1.1/"):  # the old version's list: no 2.2.1 Session
            return httpx.Response(200, headers={"X-Total-Count": "3"}, content=_envelope([{"id": "old"}]))
        offset = int(request.url.params["offset"])
        headers = {"X-Total-Count": "3", "X-Limit": "2"}
        if offset + 2 < 3:
            headers["Link"] = f"<{request.url.copy_merge_params({'offset': offset + 2, 'limit': 2})}>; rel=next"
        return httpx.Response(200, headers=headers, content=_envelope(objects[offset:offset + 2]))

    settings, since, until = settings_for(), hours_ago(24), hours_ago(0.5)
    with pytest.raises(RuntimeError, match="broker down"):
        await pull(settings, _mock_partner("http://cpo.example/ocpi/2.1.1/sessions"), "sessions",
                   ListSink(fail_on=2), since=since, until=until, limit=2, transport=httpx.MockTransport(handler),
                   sleep=Sleeps())
    assert seen == ["/ocpi/2.1.1/sessions"] * 2
    upgraded = True
    seen.clear()
    sink = ListSink()
    report = await pull(settings, _mock_partner("http://cpo.example/ocpi/2.2.1/sessions"), "sessions", sink,
                        transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert ids(sink) == ["S0001", "S0002", "S0003"] and not report.resumed and report.invalid == 0
    assert seen == ["/ocpi/2.2.1/sessions"] * 2 and (report.since, report.until) == (since, until)
