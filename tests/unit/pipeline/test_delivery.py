"""The batch inbox between Faust's fetcher and an agent: batching, backpressure and rebalance clearing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from pipeline.delivery import Inbox


def records(*offsets: int, size: int = 100) -> list[Any]:
    return [SimpleNamespace(topic="t", partition=0, offset=o, value=b"x" * size) for o in offsets]


async def test_a_full_batch_is_taken_at_once_and_the_rest_waits_in_order() -> None:
    inbox = Inbox("t", capacity=10)
    inbox.put_all(records(*range(5)))
    batch = await asyncio.wait_for(inbox.take(3, within=5.0), 1.0)  # full: no waiting for `within`
    assert [r.offset for r in batch] == [0, 1, 2]
    assert [r.offset for r in await inbox.take(3, within=0.01)] == [3, 4]


async def test_a_batch_takes_at_most_its_bytes_and_at_least_one_record() -> None:
    """Large pushes (Location trees up to 4 MB) close a batch by size long before its count: thousands of them
    decoded at once would take the worker's memory on every restart of such a backlog."""
    inbox = Inbox("t", capacity=100, batch_bytes=1000)
    inbox.put_all(records(0, 1, 2, size=400))
    inbox.put_all(records(3, size=5000))  # alone larger than a batch
    inbox.put_all(records(4, size=10))
    batch = await asyncio.wait_for(inbox.take(50, within=5.0), 1.0)  # the bytes are there: no waiting for more
    assert [r.offset for r in batch] == [0, 1]
    assert [r.offset for r in await inbox.take(50, within=0.0)] == [2]
    assert [r.offset for r in await inbox.take(50, within=0.0)] == [3]
    assert [r.offset for r in await inbox.take(50, within=0.0)] == [4]


async def test_an_inbox_holding_two_batches_of_bytes_makes_the_fetcher_wait() -> None:
    inbox = Inbox("t", capacity=100, batch_bytes=1000)
    inbox.put_all(records(0, 1, 2, 3, size=500))
    assert inbox.full  # four records of a hundred, but two batches' bytes
    with pytest.raises(TimeoutError):
        await inbox.wait_for_room(0.05)
    await inbox.take(50, within=0.0)
    assert not inbox.full
    await asyncio.wait_for(inbox.wait_for_room(1.0), 1.0)
    inbox.put_all(records(4, 5, size=500))
    inbox.clear()  # a rebalance: nothing waits, whatever its size
    assert not inbox.full


async def test_a_partial_batch_waits_up_to_within_for_more() -> None:
    inbox = Inbox("t", capacity=10)
    inbox.put_all(records(0))

    async def later() -> None:
        await asyncio.sleep(0.05)
        inbox.put_all(records(1, 2))

    feeder = asyncio.ensure_future(later())
    batch = await inbox.take(3, within=2.0)
    await feeder
    assert [r.offset for r in batch] == [0, 1, 2]


async def test_take_waits_for_the_first_record() -> None:
    inbox = Inbox("t", capacity=10)
    taker = asyncio.ensure_future(inbox.take(2, within=0.01))
    await asyncio.sleep(0.05)
    assert not taker.done()
    inbox.put_all(records(7))
    assert [r.offset for r in await asyncio.wait_for(taker, 1.0)] == [7]


async def test_a_full_inbox_makes_the_fetcher_wait_until_the_agent_takes_a_batch() -> None:
    inbox = Inbox("t", capacity=4)
    inbox.put_all(records(*range(4)))
    assert inbox.full
    with pytest.raises(TimeoutError):
        await inbox.wait_for_room(0.05)
    await inbox.take(1, within=0.0)  # one below capacity: room again
    assert not inbox.full
    await asyncio.wait_for(inbox.wait_for_room(1.0), 1.0)


async def test_clear_drops_what_waits_and_frees_the_fetcher() -> None:
    inbox = Inbox("t", capacity=2)
    inbox.put_all(records(0, 1, 2))
    inbox.clear()  # a rebalance: the records were never tracked, so nothing of them is acked or committed
    assert len(inbox) == 0 and not inbox.full
    await asyncio.wait_for(inbox.wait_for_room(1.0), 1.0)  # the fetcher goes on
    taker = asyncio.ensure_future(inbox.take(1, within=0.0))
    await asyncio.sleep(0.02)
    assert not taker.done()  # nothing stale is handed out
    inbox.put_all(records(5))
    assert [r.offset for r in await asyncio.wait_for(taker, 1.0)] == [5]


def test_the_clear_of_a_resuming_flow_keeps_what_was_fetched_after_the_seek() -> None:
    suspended = [False]
    inbox = Inbox("t", capacity=10, suspended=lambda: suspended[0])
    inbox.put_all(records(0, 1))
    inbox.clear()  # flow control resuming after recovery: these were fetched from the committed offset on
    assert len(inbox) == 2
    suspended[0] = True
    inbox.clear()  # a rebalance suspending the flow
    assert len(inbox) == 0


def _consumer(generation: int, read: dict[Any, int | None], *, flow_active: bool = True) -> Any:
    from pipeline.delivery import BatchConsumer

    consumer = object.__new__(BatchConsumer)  # only what `_hand_over` reads
    consumer.app = SimpleNamespace(consumer_generation_id=generation)  # type: ignore[assignment]
    consumer.flow_active = flow_active
    consumer._read_offset = read  # type: ignore[assignment]
    consumer.inboxes = {"t": Inbox("t", capacity=10), "u": Inbox("u", capacity=10)}
    return consumer


def test_a_rounds_records_go_to_their_inbox_and_only_then_count_as_read() -> None:
    tp, other = TP("t", 0), TP("u", 3)
    consumer = _consumer(5, {tp: 9, other: None})
    consumer._hand_over({tp: records(10, 11, 12), other: records(0)}, {tp: 9, other: None}, 5)
    assert [r.offset for r in consumer.inboxes["t"]._records] == [10, 11, 12]
    assert [r.offset for r in consumer.inboxes["u"]._records] == [0]
    assert consumer._read_offset == {tp: 12, other: 0}


@pytest.mark.parametrize("case", ["sought back during the round", "another generation", "flow suspended"])
def test_a_rounds_records_of_a_position_that_no_longer_holds_are_left_to_be_fetched_again(case: str) -> None:
    # Counted as read, they would make the fetch from the sought (committed) offset drop everything before them.
    tp = TP("t", 0)
    read_now = 4 if case == "sought back during the round" else 9  # the seek to the committed offset, 4
    consumer = _consumer(6 if case == "another generation" else 5, {tp: read_now},
                         flow_active=case != "flow suspended")
    consumer._hand_over({tp: records(10, 11)}, {tp: 9}, 5)
    assert len(consumer.inboxes["t"]) == 0
    assert consumer._read_offset == {tp: read_now}
