"""The embedded stack's pieces that need no broker: the shim URL handed to the children and the run file."""

from __future__ import annotations

import asyncio

import pytest

from infra.clickhouse.client import chdb_path, connect
from infra.clickhouse.shim import ChdbEngine, ClickHouseShim
from pipeline.stack import shim_url


@pytest.mark.clickhouse
async def test_the_shim_url_works_with_any_admin_token(chdb_dsn: str) -> None:
    # OCPI_ADMIN_TOKEN is free text: `openssl rand -base64 32` gives '/' and '+'; '%', '#', '?', '@' are as likely.
    token = "ab/cd+ef==#g?h%41i@j:k"
    connect(chdb_dsn)  # this process holds the engine, as `dev` does
    shim = await ClickHouseShim(ChdbEngine(chdb_path(chdb_dsn)), token).start()

    def use() -> list[int]:
        url = shim_url(token, shim.port)
        # The worker and the receivers get the URL as OCPI_CLICKHOUSE_DSN (the password comes from it);
        # `query` and `partners` read it from the run file and send the token as the password.
        from_dsn = connect(url, compress=False).query("SELECT 1").result_rows[0][0]
        with_password = connect(url, password=token, compress=False).query("SELECT 2").result_rows[0][0]
        return [from_dsn, with_password]

    try:
        assert await asyncio.to_thread(use) == [1, 2]
    finally:
        await shim.stop()
