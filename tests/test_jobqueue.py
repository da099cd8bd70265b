"""The daemon's queue: one job per connection in turn, in order within a connection."""

from __future__ import annotations

import pytest

from sdbridge.daemon.jobqueue import FairQueue


def drain(queue: FairQueue[str]) -> list[str]:
    return [queue.pop() for _ in range(len(queue))]


def test_a_second_connection_waits_for_one_job_of_a_batch_not_all_of_it() -> None:
    queue: FairQueue[str] = FairQueue()
    for index in range(16):
        queue.push("batch", f"b{index}")
    assert queue.pop() == "b0"  # running when the second artist asks
    assert queue.push("single", "s0") == 0  # next: it has never been served
    assert drain(queue) == ["s0", *(f"b{index}" for index in range(1, 16))]


def test_connections_take_turns_and_each_keeps_its_own_order() -> None:
    queue: FairQueue[str] = FairQueue()
    for owner, count in (("a", 3), ("b", 2), ("c", 1)):
        for index in range(count):
            queue.push(owner, f"{owner}{index}")
    assert list(queue) == ["a0", "b0", "c0", "a1", "b1", "a2"]
    assert drain(queue) == ["a0", "b0", "c0", "a1", "b1", "a2"]


def test_the_position_given_on_push_is_where_the_job_runs() -> None:
    queue: FairQueue[str] = FairQueue()
    positions = {job: queue.push(owner, job) for owner, job in [("a", "a0"), ("a", "a1")]}
    positions["b0"] = queue.push("b", "b0")
    assert positions == {"a0": 0, "a1": 1, "b0": 1}
    assert list(queue) == ["a0", "b0", "a1"]


def test_emptying_a_queue_does_not_jump_ahead_of_connections_that_waited() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "a0")
    queue.push("b", "b0")
    queue.push("b", "b1")
    assert queue.pop() == "a0"  # a's queue is now empty
    queue.push("a", "a1")  # a queues again: b, served longer ago, goes first
    assert drain(queue) == ["b0", "a1", "b1"]


def test_cancelling_and_dropping_a_connection_remove_its_waiting_jobs() -> None:
    queue: FairQueue[str] = FairQueue()
    for owner, job in [("a", "a0"), ("a", "a1"), ("b", "b0"), ("b", "b1")]:
        queue.push(owner, job)
    queue.remove("a", "a1")
    assert queue.drop("b") == ["b0", "b1"]
    assert list(queue) == ["a0"]
    with pytest.raises(ValueError):
        queue.remove("b", "b0")
    assert queue.clear() == ["a0"]
    assert not queue
    with pytest.raises(IndexError):
        queue.pop()
