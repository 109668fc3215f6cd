"""Full sync of Locations (08 §2.1: a complete list is the new truth): which crawls are a complete list, what it
lists (invalid objects too), across an interrupted crawl, and which stored Locations of the party it no longer
lists."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from infra.clickhouse.client import connect, connect_for
from infra.clickhouse.migrations import migrate
from ocpi.datetime import format_datetime
from ocpi.model import Endpoint, InterfaceRole
from pipeline.jobs.pull import (
    PullReport,
    listed_identity,
    listed_until,
    not_a_full_list,
    pull,
    stored_not_listed,
)
from receivers.registry import Partner, PartnerStatus, credentials_role
from tests.conftest import EXAMPLES
from tests.unit.jobs.fake_sender import FakeSender, hours_ago, stamp
from tests.unit.jobs.test_pull import TOKEN, ListSink, Sleeps

LOCATION = json.loads((EXAMPLES / "location_example.json").read_text())


def location(name: str, updated: datetime, **changes: Any) -> dict[str, Any]:
    return {**LOCATION, "id": name, "last_updated": stamp(updated), **changes}


@pytest.fixture
async def fake() -> AsyncIterator[FakeSender]:
    sender = await FakeSender(TOKEN, page_cap=2).start()
    yield sender
    await sender.stop()


def partner_for(url: str, *roles: tuple[str, str, str]) -> Partner:
    now = datetime.now(UTC)
    return Partner(partner_id="cpo-be", name="CPO BE", status=PartnerStatus.REGISTERED,
                   roles=[credentials_role(country_code=c, party_id=p, role=r)
                          for c, p, r in roles or [("BE", "BEC", "CPO")]],
                   outbound_token=TOKEN, created_at=now, updated_at=now,
                   endpoints=[Endpoint(identifier="locations", role=InterfaceRole.SENDER, url=url)])


def test_an_object_names_its_location_even_when_it_is_invalid() -> None:
    assert listed_identity(b'{"country_code": "be", "party_id": "bec", "id": "loc1", "city": 5}') == (
        "BE", "BEC", "LOC1")
    for nameless in (b'{"country_code": "BE", "party_id": "BEC"}', b'{"country_code": "BE", "party_id": "BEC", '
                     b'"id": ""}', b'{"country_code": "BE", "party_id": "BEC", "id": 7}', b'"LOC1"', b"[]"):
        assert listed_identity(nameless) is None, nameless


@pytest.mark.parametrize(("crawl", "unread", "reason"), [
    ({"since": None, "full": True, "nameless": 0, "total": 0}, 0, None),
    ({"since": "2024-05-01T00:00:00+00:00", "full": False, "nameless": 0}, 0, "date_from"),
    ({"since": None, "full": False, "nameless": 0}, 0, "--until"),
    ({"since": None}, 0, "earlier version"),  # a crawl begun before full sync kept nothing it listed
    ({"since": None, "full": True, "nameless": 0}, 3, "3 objects X-Total-Count announced unread"),
    ({"since": None, "full": True, "nameless": 1}, 0, "name no Location"),
])
def test_only_a_list_from_the_beginning_read_to_its_end_is_complete(crawl: dict[str, Any], unread: int,
                                                                    reason: str | None) -> None:
    found = not_a_full_list(crawl, unread)
    assert found is None if reason is None else reason in (found or "")


async def test_a_first_locations_pull_is_a_complete_list_with_its_invalid_objects(settings_for: Any,
                                                                                 fake: FakeSender) -> None:
    broken = location("L3", hours_ago(3))
    del broken["city"]
    fake.objects["locations"] = [location("L1", hours_ago(5)), location("l2", hours_ago(4)), broken]
    sink = ListSink()
    report = await pull(settings_for(), partner_for(fake.url("locations")), "locations", sink)
    assert report.invalid == 1 and len(sink.records) == 2
    # L3 is listed, invalid as it is: the CPO has not dropped it.
    assert report.not_full is None and report.listed == {("BE", "BEC", "L1"), ("BE", "BEC", "L2"),
                                                         ("BE", "BEC", "L3")}


async def test_windows_and_nameless_objects_are_no_complete_list(settings_for: Any, fake: FakeSender) -> None:
    settings = settings_for()
    fake.objects["locations"] = [location("L1", hours_ago(5))]
    partner = partner_for(fake.url("locations"))
    report = await pull(settings, partner, "locations", ListSink(), since=hours_ago(24))
    assert report.listed is None and "date_from" in (report.not_full or "")
    report = await pull(settings, partner, "locations", ListSink(), full=True, until=hours_ago(1))
    assert report.listed is None and "--until" in (report.not_full or "")
    fake.objects["locations"].append({"country_code": "BE", "party_id": "BEC", "last_updated": stamp(hours_ago(2))})
    report = await pull(settings, partner, "locations", ListSink(), full=True)
    assert report.listed is None and "name no Location" in (report.not_full or "")
    fake.objects["locations"].pop()
    report = await pull(settings, partner, "locations", ListSink(), full=True)  # --full: from the beginning again
    assert report.listed == {("BE", "BEC", "L1")} and "date_from" not in fake.seen[-1].query
    with pytest.raises(Exception, match="no --since"):
        await pull(settings, partner, "locations", ListSink(), full=True, since=hours_ago(24))


async def test_a_list_cut_short_is_no_complete_list(settings_for: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        page = {"status_code": 1000, "timestamp": "2024-01-01T00:00:00Z", "data": [location("L1", hours_ago(3))]}
        return httpx.Response(200, headers={"X-Total-Count": "4"}, content=json.dumps(page).encode())

    report = await pull(settings_for(), partner_for("http://cpo.example/ocpi/cpo/2.2.1/locations"), "locations",
                        ListSink(), transport=httpx.MockTransport(handler), sleep=Sleeps())
    assert report.unread == 3 and report.listed is None and "unread" in (report.not_full or "")


async def test_a_list_paged_by_cursor_cut_short_or_uncounted_is_no_complete_list(settings_for: Any) -> None:
    """A partner paging otherwise (a cursor, not `offset`): its last page's place is unknown, so `unread` cannot say
    that objects X-Total-Count announced were never read; nor can anything without X-Total-Count. Taken as complete,
    such a list would unlist every stored Location it never returned."""
    base = "http://cpo.example/ocpi/cpo/2.2.1/locations"

    def paged(total: str | None) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            last = "cursor" in request.url.params
            page = {"status_code": 1000, "timestamp": "2024-01-01T00:00:00Z",
                    "data": [location("L2" if last else "L1", hours_ago(3))]}
            headers = {"X-Total-Count": total} if total is not None else {}
            if not last:
                headers["Link"] = f'<{base}?cursor=abc>; rel="next"'
            return httpx.Response(200, headers=headers, content=json.dumps(page).encode())

        return httpx.MockTransport(handler)

    for total in ("3", None):
        report = await pull(settings_for(), partner_for(base), "locations", ListSink(), transport=paged(total),
                            sleep=Sleeps(), not_listed=Stored("L1", "L2", "L3"))
        assert report.pages == 2 and report.objects == 2, total
        assert report.listed is None and report.not_listed is None and report.not_full, total
    report = await pull(settings_for(), partner_for(base), "locations", ListSink(), transport=paged("2"),
                        sleep=Sleeps(), not_listed=Stored("L1", "L2", "L3"))
    assert report.not_full is None and report.not_listed == [("BE", "BEC", "L3")]  # read to its announced end


async def test_an_interrupted_full_crawl_lists_what_every_run_read(settings_for: Any, fake: FakeSender) -> None:
    settings = settings_for()
    fake.objects["locations"] = [location(f"L{i}", hours_ago(10 - i)) for i in range(1, 6)]
    partner = partner_for(fake.url("locations"))
    with pytest.raises(RuntimeError, match="broker down"):
        await pull(settings, partner, "locations", ListSink(fail_on=2))  # the first page acknowledged
    report = await pull(settings, partner, "locations", ListSink())
    assert report.resumed and report.listed == {("BE", "BEC", f"L{i}") for i in range(1, 6)}
    leftovers = sorted(p.name for p in (settings.storage.path / "jobs" / "pull").iterdir() if "listed" in p.name)
    assert leftovers == []


def test_the_stored_locations_a_complete_list_no_longer_holds(settings_for: Any) -> None:
    settings = settings_for()
    migrate(connect(settings.clickhouse_dsn), settings.clickhouse.database)
    client = connect_for(settings)
    until = datetime.now(UTC) - timedelta(minutes=5)
    old, new = until - timedelta(days=1), until + timedelta(minutes=1)
    rows = [("BE", "BEC", "L1", "cpo-be", old, 1, False),  # listed
            ("BE", "BEC", "L2", "cpo-be", old, 1, False),  # dropped by the CPO
            ("BE", "BEC", "L3", "cpo-be", new, 1, False),  # newer than the list: not judged
            ("NL", "ABC", "L4", "cpo-be", old, 1, False),  # another party of the partner
            ("BE", "BEC", "L5", "cpo-other", old, 1, False),  # received from another partner
            # Versions of one Location: the newest row decides (unlisted already, listed again, now another
            # partner's, dated after the list), whatever the older rows say.
            ("BE", "BEC", "L6", "cpo-be", old, 1, False), ("BE", "BEC", "L6", "cpo-be", old, 3, True),
            ("BE", "BEC", "L7", "cpo-be", old, 1, True), ("BE", "BEC", "L7", "cpo-be", old, 3, False),
            ("BE", "BEC", "L8", "cpo-be", old, 1, False), ("BE", "BEC", "L8", "cpo-other", old, 3, False),
            ("BE", "BEC", "L9", "cpo-be", old, 1, False), ("BE", "BEC", "L9", "cpo-be", new, 3, False)]
    client.insert("locations", [[c, p, i, partner, "", "Gent", "BEL", True, 0, updated, "{}", "e", version, updated,
                                 updated, unlisted] for c, p, i, partner, updated, version, unlisted in rows],
                  column_names=["country_code", "party_id", "location_id", "partner_id", "name", "city", "country",
                                "publish", "evse_count", "last_updated", "payload_json", "event_id", "version",
                                "received_at", "personal_at", "unlisted"])
    cpo = partner_for("http://cpo.example/l", ("BE", "BEC", "CPO"), ("NL", "ABC", "CPO"))
    report = PullReport("cpo-be", "locations", None, until, party=("be", "bec"),
                        listed=frozenset({("BE", "BEC", "L1")}))
    assert stored_not_listed(client, cpo, report) == [("BE", "BEC", "L2"), ("BE", "BEC", "L7")]
    # Through a Hub, whose list holds every connected party's objects, any party received from it.
    hub = partner_for("http://hub.example/l", ("NL", "HUB", "HUB"))
    report = PullReport("cpo-be", "locations", None, until, party=("NL", "HUB"), listed=frozenset())
    assert stored_not_listed(client, hub, report) == [("BE", "BEC", "L1"), ("BE", "BEC", "L2"), ("BE", "BEC", "L7"),
                                                      ("NL", "ABC", "L4")]
    assert stored_not_listed(client, cpo, PullReport("cpo-be", "locations", None, until)) == []  # no complete list
    client.close()


class Stored:
    """Stands in for `stored_not_listed` on the store: the stored Locations of BE/BEC, all dated before the list."""

    def __init__(self, *ids: str) -> None:
        self.ids = ids
        self.calls: list[PullReport] = []

    async def __call__(self, partner: Partner, report: PullReport) -> list[tuple[str, str, str]]:
        self.calls.append(report)
        assert report.listed is not None
        return sorted(("BE", "BEC", i) for i in self.ids if ("BE", "BEC", i) not in report.listed)


async def test_a_complete_list_unlists_the_stored_locations_it_no_longer_holds(settings_for: Any,
                                                                             fake: FakeSender) -> None:
    settings = settings_for()
    fake.objects["locations"] = [location("L1", hours_ago(5)), location("L3", hours_ago(4))]
    sink = ListSink()
    stored = Stored("L1", "L2", "L3", "L4")
    report = await pull(settings, partner_for(fake.url("locations")), "locations", sink, not_listed=stored)
    assert (report.not_listed, report.unlisted) == ([("BE", "BEC", "L2"), ("BE", "BEC", "L4")], 2)
    unlists = [e for e in sink.events if e.operation == "UNLIST"]
    assert [(e.object_id, e.level, e.source, e.payload_type, e.payload) for e in unlists] == [
        (i, "LOCATION", "PULL", "LocationPatch", {"last_updated": listed_until(report)}) for i in ("L2", "L4")]
    # Dated by the list's date_to as the partner was sent it (OCPI DateTime: to 100 µs).
    assert format_datetime(listed_until(report)) == fake.seen[0].query["date_to"]
    assert {k for _t, k, _v in sink.records[-2:]} == {b"BE/BEC/L2", b"BE/BEC/L4"}  # keyed like the pushes
    # A windowed pull compares nothing.
    stored.calls.clear()
    await pull(settings, partner_for(fake.url("locations")), "locations", ListSink(), since=hours_ago(24),
               not_listed=stored)
    assert stored.calls == []


async def test_no_full_sync_reports_and_sends_nothing(settings_for: Any, fake: FakeSender) -> None:
    fake.objects["locations"] = [location("L1", hours_ago(5))]
    sink = ListSink()
    report = await pull(settings_for(), partner_for(fake.url("locations")), "locations", sink,
                        not_listed=Stored("L1", "L2"), unlist=False)
    assert (report.not_listed, report.unlisted) == ([("BE", "BEC", "L2")], 0)
    assert [e.operation for e in sink.events] == ["PUT"]


async def test_unlists_kafka_did_not_take_are_sent_again_by_the_rerun(settings_for: Any, fake: FakeSender) -> None:
    """The crawl counts as completed only once its UNLISTs are acknowledged: the rerun of a pull whose UNLISTs
    failed compares and sends them again (a second UNLIST of a Location is a duplicate to the pipeline)."""
    settings = settings_for()
    fake.objects["locations"] = [location("L1", hours_ago(5))]
    partner = partner_for(fake.url("locations"))
    with pytest.raises(RuntimeError, match="broker down"):
        await pull(settings, partner, "locations", ListSink(fail_on=2), not_listed=Stored("L1", "L2"))
    sink = ListSink()
    report = await pull(settings, partner, "locations", sink, not_listed=Stored("L1", "L2"))
    assert report.resumed and report.listed == {("BE", "BEC", "L1")} and report.unlisted == 1
    assert [(e.operation, e.object_id) for e in sink.events] == [("UNLIST", "L2")]
