"""Progress events are throttled: first and last step always, between them one per interval (fake clock)."""

from __future__ import annotations

from serving.app import throttled


def test_first_and_last_step_always_and_one_per_interval_between() -> None:
    now = [0.0]
    seen: list[tuple[int, int]] = []
    on_step = throttled(lambda step, total: seen.append((step, total)), interval=0.25, clock=lambda: now[0])
    for step in range(1, 11):  # 10 steps, 0.1 s apart
        now[0] = step * 0.1
        on_step(step, 10)
    assert seen == [(1, 10), (4, 10), (7, 10), (10, 10)]


def test_fast_steps_still_report_the_last_one() -> None:
    seen: list[int] = []
    on_step = throttled(lambda step, _total: seen.append(step), interval=10.0, clock=lambda: 5.0)
    for step in range(1, 5):
        on_step(step, 4)
    assert seen == [1, 4]
