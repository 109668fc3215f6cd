"""The garbage-collector tuning of the worker and the receivers (infra.gc_tuning.tune_gc)."""

import gc

from infra.gc_tuning import GC_FIRST_GENERATION_THRESHOLD, tune_gc


def test_tune_gc_raises_the_first_threshold_and_freezes_startup_objects() -> None:
    before = gc.get_threshold()
    try:
        startup_object = {"created": "before tuning"}
        tune_gc()
        assert gc.get_threshold() == (GC_FIRST_GENERATION_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
        assert all(tracked is not startup_object for tracked in gc.get_objects())  # frozen: never walked again
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_served_receivers_tune_it_once_started() -> None:
    """After the lifespan started the publisher and loaded the partners (what granian serves: receivers.asgi)."""
    from receivers import asgi

    assert tune_gc in asgi.app.on_startup
