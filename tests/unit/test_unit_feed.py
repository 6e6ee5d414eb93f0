"""gateway.feed.ChangeFeed: waiters return at once when already past, otherwise on notify.

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


async def test_wait_past_returns_at_once_when_already_past() -> None:
    feed = ChangeFeed()
    assert feed.version == 0 and not feed.closed
    assert await asyncio.wait_for(feed.wait_past(-1), SAFETY_S) == 0
    feed.notify()
    feed.notify()
    assert feed.version == 2
    assert await asyncio.wait_for(feed.wait_past(0), SAFETY_S) == 2
    assert await asyncio.wait_for(feed.wait_past(1), SAFETY_S) == 2
    await settle()


async def test_waiter_blocks_until_notify() -> None:
    feed = ChangeFeed()
    waiter = asyncio.create_task(feed.wait_past(0))
    await settle()
    assert not waiter.done(), "nothing changed yet"
    feed.notify()
    assert await asyncio.wait_for(waiter, SAFETY_S) == 1


async def test_one_notify_wakes_every_waiter() -> None:
    feed = ChangeFeed()
    waiters = [asyncio.create_task(feed.wait_past(0)) for _ in range(5)]
    await settle()
    assert not any(w.done() for w in waiters)
    feed.notify()
    assert await asyncio.wait_for(asyncio.gather(*waiters), SAFETY_S) == [1] * 5


async def test_waiter_for_a_later_version_waits_for_the_next_notify() -> None:
    feed = ChangeFeed()
    early = asyncio.create_task(feed.wait_past(0))
    late = asyncio.create_task(feed.wait_past(1))
    await settle()
    feed.notify()
    assert await asyncio.wait_for(early, SAFETY_S) == 1
    await settle()
    assert not late.done(), "version 1 is not past 1"
    feed.notify()
    assert await asyncio.wait_for(late, SAFETY_S) == 2


async def test_notify_loop_as_subscribers_use_it() -> None:
    """A subscriber that re-reads after each wake sees every version, in order, or a later one."""
    feed = ChangeFeed()
    seen: list[int] = []

    async def subscriber() -> None:
        version = feed.version
        while version < 3:
            version = await feed.wait_past(version)
            seen.append(version)

    task = asyncio.create_task(subscriber())
    for _ in range(3):
        await settle()
        feed.notify()
    await asyncio.wait_for(task, SAFETY_S)
    assert seen == sorted(seen) and seen[-1] == 3


async def test_close_wakes_waiters_and_marks_closed() -> None:
    feed = ChangeFeed()
    waiter = asyncio.create_task(feed.wait_past(0))
    await settle()
    feed.close()
    assert feed.closed
    assert await asyncio.wait_for(waiter, SAFETY_S) == 1
