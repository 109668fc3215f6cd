"""Baseline (a) of bench/receivers.py: a bare Litestar endpoint that only parses the body (msgspec) and
answers a fixed OCPI envelope. No auth, no validation rules, no Kafka: what HTTP + JSON costs on this box.

Served by granian exactly like the receivers: `granian --interface asgi --working-dir bench bare_app:app`.
"""

from __future__ import annotations

import msgspec
from litestar import Litestar, Request, Response, patch, post, put

_ANSWER = b'{"status_code":1000,"timestamp":"2015-06-29T20:39:09Z"}'


async def _parse(request: Request) -> Response[bytes]:
    msgspec.json.decode(await request.body())
    return Response(_ANSWER, media_type="application/json")


@put("/ocpi/emsp/2.2.1/sessions/{country_code:str}/{party_id:str}/{session_id:str}")
async def put_session(request: Request) -> Response[bytes]:
    return await _parse(request)


@patch("/ocpi/emsp/2.2.1/sessions/{country_code:str}/{party_id:str}/{session_id:str}")
async def patch_session(request: Request) -> Response[bytes]:
    return await _parse(request)


@post("/ocpi/emsp/2.2.1/cdrs", status_code=201)
async def post_cdr(request: Request) -> Response[bytes]:
    return await _parse(request)


app = Litestar([put_session, patch_session, post_cdr], openapi_config=None, debug=False)
