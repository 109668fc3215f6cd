"""Refused pushes, recorded for the partner health report: fire-and-forget JSON records on a Kafka topic.

A push answered with a 2xxx or 3xxx status never reaches the module topics (but for a CDR POSTed again with other
content under a held id: `receivers.cdrs`), so without this record nobody downstream would know a partner's pushes
are failing. Recording must never change or delay the answer:
`note()` only puts the record on a bounded in-memory queue; one background task sends it. When the queue is
full (Kafka slow or down) the record is dropped with a log line; a send that fails is dropped the same way.

Only authenticated pushes (PUT, PATCH, POST) on a functional module are recorded: an unauthenticated
request is not a partner's traffic, and recording it would let anybody fill the topic.

The record is `infra.rejections.Rejection` (JSON, key = partner id); `pipeline.rejections` writes it to the
`rejections` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Any, Final

from litestar import Request

from infra.rejections import Rejection, encode_rejection
from receivers.publishing import RecordSink
from receivers.transport import message_ids, request_path

log = logging.getLogger(__name__)

PUSH_METHODS: Final = frozenset({"PUT", "PATCH", "POST"})
FUNCTIONAL_MODULES: Final = frozenset({"locations", "sessions", "cdrs"})
QUEUE_MAX: Final = 1000  # a burst of refusals while Kafka is slow; beyond that they are dropped (logged)
MAX_TEXT: Final = 500  # a reason or path longer than this is cut: the record is a pointer, not the body


def rejection_of(request: Request[Any, Any, Any], *, ocpi_status: int, http_status: int, message: str,
                 data: Any) -> Rejection | None:
    """The record of a refused push, or None when the request is not a partner's functional-module push."""
    if ocpi_status < 2000 or ocpi_status >= 4000 or request.method not in PUSH_METHODS:
        return None
    partner = getattr(request.state, "partner", None)
    if partner is None:
        return None  # refused before authentication
    handler = request.scope.get("route_handler")
    opt = getattr(handler, "opt", None) or {}
    module = opt.get("ocpi_module")
    if module not in FUNCTIONAL_MODULES:
        return None
    field_path = data.get("path") if isinstance(data, dict) else None
    request_id, correlation_id = message_ids(request.scope)
    return Rejection(
        rejection_id=str(uuid.uuid4()), partner_id=str(partner.partner_id), module=module, method=request.method,
        path=request_path(request)[:MAX_TEXT], ocpi_status=int(ocpi_status), http_status=int(http_status),
        reason=message[:MAX_TEXT], field_path=str(field_path or "")[:MAX_TEXT], request_id=request_id,
        correlation_id=correlation_id, rejected_at=datetime.now(UTC))


class RejectionRecorder:
    """The bounded queue and the one task that sends its records (started and stopped by the app lifespan)."""

    def __init__(self, sink: RecordSink, topic: str, *, maxsize: int = QUEUE_MAX) -> None:
        self._sink = sink
        self._topic = topic
        self._queue: asyncio.Queue[Rejection] = asyncio.Queue(maxsize=maxsize)
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="rejection-recorder")

    async def stop(self, grace_s: float = 2.0) -> None:
        """Send what is queued (for at most `grace_s`), then stop."""
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), grace_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def observe(self, request: Request[Any, Any, Any], *, ocpi_status: int, http_status: int, message: str,
                data: Any) -> None:
        """Called by the transport layer for every error answer; records it if it refuses a push."""
        try:
            rejection = rejection_of(request, ocpi_status=ocpi_status, http_status=http_status, message=message,
                                     data=data)
        except Exception:  # recording must never turn an answer into a 500
            log.exception("could not build the rejection record of %s %s", request.method, request_path(request))
            return
        if rejection is not None:
            self.note(rejection)

    def note(self, rejection: Rejection) -> None:
        """Queue a record; never blocks, never raises."""
        try:
            self._queue.put_nowait(rejection)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("rejection of %s %s by %s not recorded: queue full", rejection.method, rejection.path,
                        rejection.partner_id)

    async def _run(self) -> None:
        while True:
            rejection = await self._queue.get()
            try:
                await self._sink.publish(self._topic, rejection.partner_id.encode(), encode_rejection(rejection))
                self.sent += 1
            except Exception as exc:  # the record is best effort: never let one failure stop the recorder
                self.dropped += 1
                log.warning("rejection of %s %s by %s not recorded: %s", rejection.method, rejection.path,
                            rejection.partner_id, exc)
            finally:
                self._queue.task_done()
