"""Baselines of bench/receivers.py, served by granian exactly like the receivers
(`granian --interface asgi --working-dir bench bare_app:app`):

(a) a bare Litestar endpoint that only parses the body (msgspec) and answers a fixed OCPI envelope: no auth,
    no validation rules, no Kafka; what HTTP + JSON costs on this box;
(a+kafka) the same, then the body sent as is to Kafka with acks=all and awaited (set BENCH_KAFKA_BOOTSTRAP):
    the ceiling of "answer only after the broker's ack" with this client, server and broker, before any
    OCPI work (auth, validation, event, Avro).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from aiokafka import AIOKafkaProducer
from litestar import Litestar, Request, Response, patch, post, put

_ANSWER = b'{"status_code":1000,"timestamp":"2015-06-29T20:39:09Z"}'
_BOOTSTRAP = os.environ.get("BENCH_KAFKA_BOOTSTRAP")
_TOPIC = os.environ.get("BENCH_KAFKA_TOPIC", "bench")
_producer: AIOKafkaProducer | None = None


@asynccontextmanager
async def _kafka(app: Litestar) -> AsyncIterator[None]:
    global _producer
    if _BOOTSTRAP:
        # As the receivers' publisher on the embedded broker: acks=all, no idempotence (Tansu), linger 1 ms.
        _producer = AIOKafkaProducer(bootstrap_servers=_BOOTSTRAP, acks="all", enable_idempotence=False,
                                     linger_ms=1)
        await _producer.start()
    try:
        yield
    finally:
        if _producer is not None:
            await _producer.stop()


async def _parse(request: Request) -> Response[bytes]:
    body = await request.body()
    msgspec.json.decode(body)
    if _producer is not None:
        await _producer.send_and_wait(_TOPIC, value=body, key=request.url.path.encode())
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


app = Litestar([put_session, patch_session, post_cdr], lifespan=[_kafka], openapi_config=None, debug=False)
