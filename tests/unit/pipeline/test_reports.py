"""The named reports (`pipeline.reports`) against rows written the way the pipeline writes them."""

from __future__ import annotations

import asyncio
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
    letters or digits, so a stored party such as NL/T1 or DE/A-B could not be reported on its own (a `/`, which
    separates the two, cannot be in a URL path segment either)."""
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
