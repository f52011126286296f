"""Group commit: concurrent callers' writes coalesced into one transaction.

Sixteen workers finishing sixteen attempts each want a transaction; a transaction costs the same
round trips (BEGIN, COMMIT, a context switch to the database) whether it writes one row or
sixteen. ``GroupCommit.submit`` queues an item; whoever holds the writer lock writes everything
queued so far in one call and resolves every waiter. No background task: the first caller becomes
the writer, so nothing runs outside a caller's own await (safe in QStash mode, where nothing may
run after a response).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger("notifier.batching")

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    """Coalesce concurrent ``submit`` calls into calls of ``write`` with up to ``max_batch`` items.

    ``linger`` (seconds) delays each write a little so that items arriving just after it join it.

    ``write`` gets the items in submission order and returns one result per item, in order. If a
    batch fails, each of its items is written again on its own, so one bad item fails only itself.
    """

    def __init__(
        self,
        write: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch: int = 64,
        linger: float = 0.0,
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._linger = linger
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._writer = asyncio.Lock()

    async def submit(self, item: Item) -> Result:
        """Write ``item`` (with whatever else is queued) and return its result.

        Shielded: once submitted, the item is written even if the caller is cancelled meanwhile,
        so a shutdown never leaves an outcome half-recorded.
        """
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        return await asyncio.shield(self._write_until_done(future))

    async def _write_until_done(self, future: asyncio.Future[Result]) -> Result:
        while not future.done():
            async with self._writer:
                if future.done():
                    break
                if self._linger and len(self._pending) < self._max_batch:
                    # A moment for the items that are about to come to join this write.
                    await asyncio.sleep(self._linger)
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    await self._write_batch(batch)
                finally:
                    # Cancelled mid-write (the loop is shutting down): nobody may wait forever.
                    for _, unresolved in batch:
                        if not unresolved.done():
                            unresolved.set_exception(RuntimeError("the group commit was interrupted"))
        return future.result()

    async def _write_batch(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._write([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            log.warning("a batch of %d writes failed (%s); writing each on its own", len(batch), type(exc).__name__)
            for item, future in batch:
                try:
                    [result] = await self._write([item])
                except Exception as single:
                    future.set_exception(single)
                else:
                    future.set_result(result)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
