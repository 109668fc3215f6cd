"""`create_app()`: the only place the receivers' Litestar app is assembled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler

from infra.clickhouse.client import connect_for
from infra.kafka.bootstrap import resolve_bootstrap
from infra.kafka.publisher import Publisher
from infra.settings import Settings, get_settings
from receivers import cdrs, credentials, locations, sessions, versions
from receivers.auth import authenticate
from receivers.paths import DecodePathParams, OcpiLitestar
from receivers.publishing import EventPublisher, RecordSink
from receivers.registry import PartnerDirectory, PartnerRegistry
from receivers.rejections import RejectionRecorder
from receivers.state import StateReader
from receivers.transport import EXCEPTION_HANDLERS, REJECTIONS_STATE_KEY, echo_headers, refuse_content_coding

MAX_BODY_BYTES = 4 * 1024 * 1024  # a Location with hundreds of EVSEs fits; anything larger is refused (413)


async def admit(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The app's guard: authentication (a 401 first), then the refusal of a coded body. One guard rather than two:
    Litestar copies the route handler for each guard of each request."""
    await authenticate(connection, handler)
    await refuse_content_coding(connection, handler)


def create_app(settings: Settings | None = None, *, sink: RecordSink | None = None,
               registry_factory: Callable[[], PartnerRegistry] | None = None,
               state_reader: StateReader | None = None, rejection_sink: RecordSink | None = None,
               on_startup: Sequence[Callable[[], object]] = ()) -> Litestar:
    """The receivers app. `sink`, `registry_factory` and `state_reader` replace Kafka and ClickHouse in unit
    tests. Refused pushes are recorded (receivers.rejections) through the Kafka publisher, or through
    `rejection_sink` when given; with an injected `sink` and no `rejection_sink`, they are not recorded.
    `on_startup`: called once the lifespan has started (publisher, partner registry)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        publisher: Publisher | None = None
        records = sink
        if records is None:
            publisher = Publisher(settings.kafka, resolve_bootstrap(settings))
            await publisher.start()
            records = publisher
        registry = (registry_factory or (lambda: PartnerRegistry(connect_for(settings))))()
        app.state.partners = PartnerDirectory(registry)
        app.state.credential_locks = credentials.PartnerLocks()
        app.state.events = EventPublisher(records, settings.kafka)
        app.state.stored = state_reader or StateReader.for_settings(settings)  # connects on the first GET
        await app.state.partners.reload()
        rejection_records = rejection_sink or publisher
        rejections = None
        if rejection_records is not None:
            rejections = RejectionRecorder(rejection_records, settings.kafka.topic_rejections)
            setattr(app.state, REJECTIONS_STATE_KEY, rejections)
            rejections.start()
        try:
            yield
        finally:
            if rejections is not None:
                await asyncio.shield(rejections.stop())
            if state_reader is None:
                app.state.stored.close()
            if publisher is not None:
                await asyncio.shield(publisher.stop())

    def provide_events(state: State) -> EventPublisher:
        return state.events

    def provide_stored(state: State) -> StateReader:
        return state.stored

    def provide_settings() -> Settings:
        return settings

    dependencies: dict[str, Any] = {
        "events": Provide(provide_events, sync_to_thread=False),
        "settings": Provide(provide_settings, sync_to_thread=False),
        "stored": Provide(provide_stored, sync_to_thread=False),
    }
    # Routed on the undecoded path, so an id's encoded `/` stays in its segment (receivers.paths).
    return OcpiLitestar(
        route_handlers=[versions.router, credentials.router, locations.router, sessions.router, cdrs.router],
        middleware=[DecodePathParams()],
        guards=[admit],
        dependencies=dependencies,
        exception_handlers=EXCEPTION_HANDLERS,
        before_send=[echo_headers],
        lifespan=[lifespan],
        on_startup=list(on_startup),
        state=State({"settings": settings}),
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=None,
        debug=False,
    )
