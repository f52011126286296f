"""GroupCommit: concurrent submissions share writes, a bad item fails alone, cancellation loses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from notifier.delivery.batching import GroupCommit


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
