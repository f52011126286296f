"""Coalescing concurrent callers' work: writes into one transaction (``GroupCommit``), provider requests into
one request (``Coalesce``).

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


class Coalesce(Generic[Item, Result]):
    """Concurrent ``submit`` calls gathered into calls of ``send`` with up to ``max_batch`` items.

    The first caller of a gathering waits ``linger`` for others to join, then sends what was gathered; a caller
    arriving meanwhile starts the next gathering at once. Unlike ``GroupCommit`` the sends may overlap: these
    are provider requests, and a slow provider must not queue every later item behind one request. ``send``
    returns one result per item, in order, and classifies failures rather than raising; if it raises anyway,
    every item of that call gets the error. No background task: the first caller sends.
    """

    def __init__(
        self, send: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]], *, max_batch: int, linger: float
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._linger = linger
        self._gathering: list[tuple[Item, asyncio.Future[Result]]] | None = None

    async def submit(self, item: Item) -> Result:
        """Send ``item`` with whatever joins it and return its result (shielded, as ``GroupCommit.submit``)."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        gathering = self._gathering
        if gathering is not None and len(gathering) < self._max_batch:
            gathering.append((item, future))
            return await asyncio.shield(future)
        self._gathering = gathering = [(item, future)]
        return await asyncio.shield(self._lead(gathering, future))

    async def _lead(self, gathering: list[tuple[Item, asyncio.Future[Result]]], own: asyncio.Future[Result]) -> Result:
        try:
            try:
                await asyncio.sleep(self._linger)
            finally:
                if self._gathering is gathering:
                    self._gathering = None
            results = await self._send([item for item, _ in gathering])
        except Exception as exc:
            for _, future in gathering:
                future.set_exception(exc)
        else:
            for (_, future), result in zip(gathering, results, strict=True):
                future.set_result(result)
        finally:
            for _, future in gathering:  # cancelled (the loop is shutting down): nobody may wait forever
                if not future.done():
                    future.set_exception(RuntimeError("the coalesced send was interrupted"))
        return await own
