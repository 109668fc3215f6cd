"""The cyclic garbage collector's settings of our long-running processes (the worker, the receivers)."""

from __future__ import annotations

import gc

# The first-generation threshold (CPython's default is 700). A worker batch allocates hundreds of thousands of
# short-lived objects (decoded events, rows, state) that reference counting frees; at the default, collections run
# every few hundred allocations and cost about a sixth of the worker's CPU (README, Benchmarks). The older
# generations keep CPython's defaults.
GC_FIRST_GENERATION_THRESHOLD = 50_000


def tune_gc() -> None:
    """Fewer cyclic collections, and none of them walking the startup objects (modules, the app, clients): those
    are frozen into the permanent generation. In the receivers, the collections of the oldest generation walking
    them were the tail of the push latency (bench/README.md)."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_FIRST_GENERATION_THRESHOLD, second, third)
