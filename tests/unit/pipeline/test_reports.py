"""The named reports (`pipeline.reports`) against rows written the way the pipeline writes them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from clickhouse_connect.driver.client import Client

from pipeline import reports
from pipeline.cdrs import process_cdrs
from pipeline.sink import Batch, ClickHouseSink
from pipeline.state import CdrState

from .builders import Harness, cdr, event

pytestmark = pytest.mark.clickhouse


def write(client: Client, batch: Batch) -> None:
    asyncio.run(ClickHouseSink(lambda: client).write(batch))


def test_party_filter_selects_every_party_the_pipeline_stores(client: Client) -> None:
    """A party id is a CiString(3) and a country code a CiString(2) (printable ASCII, at most that long), which the
    receivers and the pipeline take and store as such: `--party` refused every party but two letters / three
    letters or digits, so a stored party such as NL/T1 or DE/A-B could not be reported on its own."""
    cdrs = Harness(process_cdrs, CdrState)
    write(client, cdrs.run(event("CDR", cdr("C1", kwh="10", cost="2.50", pid="T1"), pid="T1"),
                           event("CDR", cdr("C2", kwh="8", cost="2.00", cc="DE", pid="a-b"), cc="DE", pid="a-b"),
                           event("CDR", cdr("C4", kwh="4", cost="1.00"))).batch)
    for party, want in (("nl/t1", ("NL", "T1", Decimal("2.5000"))), ("DE/A-B", ("DE", "A-B", Decimal("2.0000"))),
                        ("NL/TNM", ("NL", "TNM", Decimal("1.0000")))):
        _columns, rows = reports.run(client, reports.revenue(reports.Period(), party=party))
        assert [(r[0], r[1], r[6]) for r in rows] == [want], party
    for bad in ("NLTNM", "NL/", "/TNM", "NLD/TNM", "NL/TNMX", "NL/TN\u00e9", "NL/A/B"):
        with pytest.raises(reports.ReportError, match="COUNTRY_CODE/PARTY_ID"):
            reports.parse_party(bad)


def test_a_party_whose_id_holds_a_slash_can_be_reported_on_its_own(client: Client) -> None:
    """A CiString may hold `/` and the receivers take such a party (`receivers.paths`: `%2F` in a URL), but `--party`
    refused it (`NL/T/M` is three parts) with no other way to name it, so its totals could not be reported alone. A
    `/` or `%` in either part is written `%2F` / `%25`, as in the pipeline's keys (`ocpi.identity.owner_key_part`)."""
    cdrs = Harness(process_cdrs, CdrState)
    write(client, cdrs.run(event("CDR", cdr("C1", kwh="10", cost="2.50", pid="T/M"), pid="T/M"),
                           event("CDR", cdr("C2", kwh="8", cost="2.00", cc="N%", pid="T"), cc="N%", pid="T"),
                           event("CDR", cdr("C3", kwh="4", cost="1.00", pid="T"), pid="T")).batch)
    for party, want in (("NL/T%2FM", ("NL", "T/M", Decimal("2.5000"))), ("nl/t%2fm", ("NL", "T/M", Decimal("2.5000"))),
                        ("N%25/T", ("N%", "T", Decimal("2.0000"))), ("NL/T", ("NL", "T", Decimal("1.0000")))):
        _columns, rows = reports.run(client, reports.revenue(reports.Period(), party=party))
        assert [(r[0], r[1], r[6]) for r in rows] == [want], party
    for bad in ("NL/T/M", "NL/TN%2FM", "NL%2FX/T"):
        with pytest.raises(reports.ReportError, match="COUNTRY_CODE/PARTY_ID"):
            reports.parse_party(bad)


def test_revenue_shows_home_charging_compensation_apart_from_charging(client: Client) -> None:
    """A CDR with home_charging_compensation true is energy compensated TO the driver: the report counted it as the
    location's charging revenue. Its own row now (`kind`), with its credit, by party, location and day."""
    cdrs = Harness(process_cdrs, CdrState)
    home = {"home_charging_compensation": True}
    write(client, cdrs.run(event("CDR", cdr("C1", kwh="10", cost="2.50", pid="HCC")),
                           event("CDR", cdr("H1", kwh="4", cost="1.00", pid="HCC") | home),
                           event("CDR", cdr("H2", kwh="3", cost="0.90", pid="HCC") | home),
                           event("CDR", cdr("H1-C", kwh="4", cost="-1.00", credit=True, credit_reference="H1",
                                            pid="HCC") | home)).batch)
    for by in ("party", "location", "day"):
        columns, rows = reports.run(client, reports.revenue(reports.Period(), by=by, party="NL/HCC"))
        got = [{k: v for k, v in zip(columns, r, strict=True)
                if k in ("kind", "cdrs", "credit_cdrs", "energy_kwh", "revenue_excl_vat")} for r in rows]
        assert got == [
            {"cdrs": 1, "credit_cdrs": 0, "energy_kwh": Decimal("10.0000"), "revenue_excl_vat": Decimal("2.5000"),
             "kind": "CHARGING"},
            {"cdrs": 2, "credit_cdrs": 1, "energy_kwh": Decimal("3.0000"), "revenue_excl_vat": Decimal("0.9000"),
             "kind": "HOME_CHARGING_COMPENSATION"}], by
        assert columns[-1] == "kind", by  # after the columns the report had before: their positions stay

def test_rejections_are_listed_in_one_order_whatever_the_engine_groups_them_in(client: Client) -> None:
    """Rows of one partner, module, count, OCPI status and field path were left in the order ClickHouse's hash
    aggregation happened to give them (PATCH 400, PUT 400, POST 400, PUT 200, POST 200 here): the method and HTTP
    status break the tie now, so the same refusals give the same table or CSV on every run and server."""
    refusals = [("PUT", 400), ("POST", 200), ("PATCH", 400), ("POST", 400), ("PUT", 200), ("PUT", 400)]
    # Recent: rejections keep OCPI_RETENTION_RAW_DAYS (a TTL), and ClickHouse may drop expired rows as it inserts.
    recent = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    client.insert("rejections", [[f"r{n}", "p1", "cdrs", method, 2001, status, "bad", "$.x",
                                  recent] for n, (method, status) in enumerate(refusals)],
                  column_names=["rejection_id", "partner_id", "module", "method", "ocpi_status", "http_status",
                                "reason", "field_path", "rejected_at"])
    _columns, rows = reports.run(client, reports.rejections(reports.Period()))
    assert [(r[2], r[4], r[6]) for r in rows] == [("PUT", 400, 2), ("PATCH", 400, 1), ("POST", 200, 1),
                                                  ("POST", 400, 1), ("PUT", 200, 1)]
