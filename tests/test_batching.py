"""GroupCommit: concurrent submissions share writes, a bad item fails alone, cancellation loses nothing.
Coalesce: concurrent submissions share a send, later ones start their own at once, a failed send fails its items."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from notifier.batching import Coalesce, GroupCommit


class Recorder:
    """A write function that records each batch and takes a little time, like a transaction."""

    def __init__(self, *, refuse: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.refuse = refuse

    async def write(self, items: Sequence[int]) -> list[int]:
        await asyncio.sleep(0.01)
        if self.refuse in items:
            raise ValueError(f"refused {self.refuse}")
        self.batches.append(list(items))
        return [item * 10 for item in items]


async def test_concurrent_submissions_share_batches_and_get_their_own_results() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.write)
    results = await asyncio.gather(*(group.submit(i) for i in range(20)))
    assert results == [i * 10 for i in range(20)]
    # the first writes alone, everything queued meanwhile goes in the next write
    assert len(recorder.batches) < 20
    assert sorted(item for batch in recorder.batches for item in batch) == list(range(20))


async def test_batches_respect_max_batch() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.write, max_batch=3)
    await asyncio.gather(*(group.submit(i) for i in range(10)))
    assert max(len(batch) for batch in recorder.batches) == 3
    assert sorted(item for batch in recorder.batches for item in batch) == list(range(10))


async def test_a_failing_item_fails_alone() -> None:
    recorder = Recorder(refuse=7)
    group = GroupCommit(recorder.write)
    results = await asyncio.gather(*(group.submit(i) for i in range(10)), return_exceptions=True)
    assert isinstance(results[7], ValueError)
    assert [r for i, r in enumerate(results) if i != 7] == [i * 10 for i in range(10) if i != 7]


async def test_a_cancelled_submitter_still_gets_its_item_written() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.write)
    blocker = asyncio.create_task(group.submit(1))  # holds the writer for a moment
    await asyncio.sleep(0)
    waiting = asyncio.create_task(group.submit(2))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await blocker == 10
    for _ in range(50):
        if [2] in recorder.batches:
            break
        await asyncio.sleep(0.01)
    assert [2] in recorder.batches


async def test_items_submitted_during_the_linger_join_the_write() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.write, linger=0.05)
    first = asyncio.create_task(group.submit(1))
    await asyncio.sleep(0.01)  # the first write is lingering, not yet written
    assert recorder.batches == []
    second = asyncio.create_task(group.submit(2))
    assert (await first, await second) == (10, 20)
    assert recorder.batches == [[1, 2]]


class Sender:
    """A send function that records each call and waits until ``release`` is set, like a provider request."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail = fail

    async def send(self, items: Sequence[int]) -> list[int]:
        self.calls.append(list(items))
        await self.release.wait()
        if self.fail:
            raise ConnectionError("provider down")
        return [item * 10 for item in items]


async def test_coalesce_sends_concurrent_items_together_and_answers_each() -> None:
    sender = Sender()
    sender.release.set()
    coalesce = Coalesce(sender.send, max_batch=100, linger=0.01)
    results = await asyncio.gather(*(coalesce.submit(i) for i in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert sender.calls == [[0, 1, 2, 3, 4]]


async def test_coalesce_starts_a_new_send_beside_one_in_flight() -> None:
    sender = Sender()
    coalesce = Coalesce(sender.send, max_batch=100, linger=0.005)
    first = asyncio.create_task(coalesce.submit(1))
    while not sender.calls:
        await asyncio.sleep(0.001)
    second = asyncio.create_task(coalesce.submit(2))  # the first send has not answered: this one goes beside it
    while len(sender.calls) < 2:
        await asyncio.sleep(0.001)
    assert sender.calls == [[1], [2]]
    sender.release.set()
    assert (await first, await second) == (10, 20)


async def test_coalesce_splits_at_max_batch() -> None:
    sender = Sender()
    sender.release.set()
    coalesce = Coalesce(sender.send, max_batch=3, linger=0.01)
    assert await asyncio.gather(*(coalesce.submit(i) for i in range(7))) == [i * 10 for i in range(7)]
    assert sender.calls == [[0, 1, 2], [3, 4, 5], [6]]


async def test_a_send_that_raises_fails_every_item_it_carried() -> None:
    sender = Sender(fail=True)
    sender.release.set()
    coalesce = Coalesce(sender.send, max_batch=100, linger=0.01)
    results = await asyncio.gather(*(coalesce.submit(i) for i in range(3)), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError] * 3
    assert sender.calls == [[0, 1, 2]]


async def test_a_cancelled_submitter_does_not_cancel_the_send_of_the_others() -> None:
    sender = Sender()
    coalesce = Coalesce(sender.send, max_batch=100, linger=0.01)
    leader = asyncio.create_task(coalesce.submit(1))
    follower = asyncio.create_task(coalesce.submit(2))
    while not sender.calls:
        await asyncio.sleep(0.001)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    sender.release.set()
    assert await follower == 20
    assert sender.calls == [[1, 2]]
