"""gateway.feed.ChangeFeed: a request's change wakes only its streams; the queue moving wakes only streams
of waiting requests; nothing is missed between taking a cursor and waiting.

Synchronisation is by yielding to the event loop (`asyncio.sleep(0)`), never by timed
sleeps; `wait_for(..., 5)` is only a safety net against a hang.
"""

from __future__ import annotations

import asyncio

from gateway.feed import ChangeFeed

SAFETY_S = 5


async def settle() -> None:
    """Lets every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_change_wakes_only_that_requests_streams() -> None:
    feed = ChangeFeed()
    with feed.watch("a") as a, feed.watch("b") as b:
        on_a = asyncio.create_task(a.wait(a.cursor(), in_queue=False))
        on_b = asyncio.create_task(b.wait(b.cursor(), in_queue=True))
        await settle()
        feed.changed("a")
        await asyncio.wait_for(on_a, SAFETY_S)
        await settle()
        assert not on_b.done(), "another request's step does not wake this stream"
        feed.changed("b")
        await asyncio.wait_for(on_b, SAFETY_S)


async def test_the_queue_moving_wakes_only_streams_of_waiting_requests() -> None:
    feed = ChangeFeed()
    with feed.watch("waiting") as waiting, feed.watch("running") as running:
        queued = asyncio.create_task(waiting.wait(waiting.cursor(), in_queue=True))
        busy = asyncio.create_task(running.wait(running.cursor(), in_queue=False))
        await settle()
        feed.queue_moved()
        await asyncio.wait_for(queued, SAFETY_S)
        await settle()
        assert not busy.done(), "a running request's position does not exist"
        feed.everything()
        await asyncio.wait_for(busy, SAFETY_S)


async def test_a_change_between_cursor_and_wait_is_not_missed() -> None:
    feed = ChangeFeed()
    with feed.watch("a") as a:
        cursor = a.cursor()
        feed.changed("a")
        after = await asyncio.wait_for(a.wait(cursor, in_queue=False), SAFETY_S)
        assert after != cursor
        queue_cursor = a.cursor()
        feed.queue_moved()
        assert await asyncio.wait_for(a.wait(queue_cursor, in_queue=True), SAFETY_S) != queue_cursor


async def test_one_change_wakes_every_stream_of_the_request_and_watches_are_released() -> None:
    feed = ChangeFeed()
    with feed.watch("a") as first, feed.watch("a") as second:
        waiters = [asyncio.create_task(w.wait(w.cursor(), in_queue=False)) for w in (first, second)]
        await settle()
        assert feed.streams == 2
        feed.changed("a")
        await asyncio.wait_for(asyncio.gather(*waiters), SAFETY_S)
    assert feed.streams == 0
    feed.changed("a")  # nobody watches: nothing is kept for it


async def test_close_wakes_every_stream_and_marks_closed() -> None:
    feed = ChangeFeed()
    with feed.watch("a") as a:
        waiter = asyncio.create_task(a.wait(a.cursor(), in_queue=False))
        await settle()
        feed.close()
        assert feed.closed
        await asyncio.wait_for(waiter, SAFETY_S)
        assert await asyncio.wait_for(a.wait(a.cursor(), in_queue=False), SAFETY_S)
