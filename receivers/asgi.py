"""ASGI entry point for granian: `granian --interface asgi receivers.asgi:app`."""

from infra.gc_tuning import tune_gc
from receivers.app import create_app

# Once started, the startup objects are frozen out of the garbage collector's walks, as in the worker: collections
# of the oldest generation walking them were most of the pushes' p99 latency (bench/README.md).
app = create_app(on_startup=[tune_gc])
