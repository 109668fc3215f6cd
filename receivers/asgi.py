"""ASGI entry point for granian: `granian --interface asgi receivers.asgi:app`."""

from receivers.app import create_app

app = create_app()
