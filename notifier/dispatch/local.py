"""The in-process dispatcher: claims due deliveries from the database and attempts them.

One feeder claims batches of due rows and starts their attempts in one transaction
(``DeliveryRunner.claim_due``: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several replicas never
take the same row; SQLite serialises writers anyway) and hands them to N workers through a bounded
queue; the workers' outcomes are recorded in shared transactions. A claim is a lease with a
fencing token: a crashed process's rows are taken over once the lease runs out, and a worker whose
lease was taken over cannot record over the new owner. On shutdown the feeder stops, in-flight
attempts get a grace period, and anything still claimed is released back to ``queued``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from notifier.db import delivery_reads
from notifier.delivery.messages import Batch
from notifier.delivery.runner import DeliveryRunner
from notifier.dispatch.base import DispatchItem
from notifier.types import utcnow

log = logging.getLogger("notifier.dispatch.local")

CONTENDED_RETRY_SECONDS = 0.01
"""How long the feeder first waits to claim again after a contended claim (the other claim's transaction)."""


class LocalDispatcher:
    name = "local"

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        runner: DeliveryRunner,
        workers: int,
        poll_interval: float,
        lease_seconds: float,
        grace_seconds: float,
    ) -> None:
        self._sessions = sessions
        self._runner = runner
        self._workers = workers
        self._poll_interval = poll_interval
        self._lease = dt.timedelta(seconds=lease_seconds)
        self._grace = grace_seconds
        self._queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=workers * 2)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._feeder: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight: set[uuid.UUID] = set()
        self._more_due = False  # more rows may be due: the last claim was a full batch, or new ones were dispatched
        self._idle = asyncio.Event()  # set whenever nothing is in flight
        self._idle.set()

    async def start(self) -> None:
        self._feeder = asyncio.create_task(self._feed(), name="notifier-feeder")
        self._tasks = [asyncio.create_task(self._work(i), name=f"notifier-worker-{i}") for i in range(self._workers)]

    async def dispatch(self, items: Sequence[DispatchItem]) -> int:
        if items:
            self._nudge()
        return len(items)

    def _nudge(self) -> None:
        """More deliveries are due: claim now, or, while the queue is over half full, once the workers drain it."""
        self._more_due = True
        self._wake.set()

    async def drain(self, seconds: float = 10.0) -> None:
        """Wait until no delivery is in flight or pending with a due time inside the next ``seconds``.

        For tests and benchmarks; raises TimeoutError if work is still pending when the time is up.
        """
        deadline = utcnow() + dt.timedelta(seconds=seconds)
        async with asyncio.timeout(seconds):
            while True:
                self._wake.set()
                await asyncio.sleep(0.02)
                if self._queue.empty() and not self._in_flight and not await self._pending_before(deadline):
                    return

    async def _pending_before(self, deadline: dt.datetime) -> bool:
        async with self._sessions() as session:
            return await delivery_reads.any_pending_before(session, deadline=deadline)

    async def _feed(self) -> None:
        backoff = CONTENDED_RETRY_SECONDS
        while not self._stopping.is_set():
            self._wake.clear()  # before claiming: a wake that arrives during the claim is not lost
            claimed = asked = 0
            contended = False
            try:
                if self._queue.qsize() <= self._workers:
                    # Refill only once the queue is half empty, in one batch: a claim per event woken
                    # for would claim a row or two at a time, a transaction each.
                    asked = self._queue.maxsize - self._queue.qsize()
                    batches = await self._runner.claim_due(limit=asked, lease=self._lease)
                    for batch in batches:  # no more batches than rows asked for: each fits the queue
                        self._queue.put_nowait(batch)
                    claimed = sum(len(batch.claims) for batch in batches)
                    contended = batches.contended
                    if batches.planned:  # fallbacks of rows the claim failed: due now, not at the next poll
                        self._wake.set()
                    # A full claim: probably more are due. A contended one: a send group was left out because
                    # another replica's claim held part of it; it is due again once that claim commits. A wake
                    # during the claim: its rows may have committed after the claim's snapshot. Forgetting that
                    # one while the queue is over half full stalled them until the poll (seen with two workers).
                    self._more_due = claimed >= asked or contended or self._wake.is_set()
            except Exception:
                log.exception("claiming due deliveries failed; retrying after the poll interval")
            if claimed and claimed >= asked:
                continue  # there may be more due right now
            if contended:
                # Not the poll interval: with two worker processes sharing a fan-out backlog, both claims kept
                # cutting each other's groups and waited a second each time (bench: stalls of 1-3 s). Doubled
                # while it repeats, up to the poll interval, should a long transaction hold a due row.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._poll_interval)
                continue
            backoff = CONTENDED_RETRY_SECONDS
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()

    async def _work(self, index: int) -> None:
        while True:
            batch = await self._queue.get()
            delivery_id = batch.claims[0].delivery.id  # in flight stands for the batch
            if self._more_due and self._queue.qsize() <= self._workers:
                # Half empty with a backlog in the database: have the feeder refill now, in one batch,
                # rather than at its next poll (the workers would run dry meanwhile).
                self._wake.set()
            self._in_flight.add(delivery_id)
            self._idle.clear()
            try:
                if not await self._still_held(batch):
                    log.warning("the claim of delivery %s was taken over while it waited in the queue", delivery_id)
                    continue
                reports = await self._runner.complete(batch)
                if any(report.follow_up or report.kind == "retry" for report in reports):
                    self._nudge()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("attempting delivery %s failed unexpectedly", delivery_id)
            finally:
                self._in_flight.discard(delivery_id)
                if not self._in_flight:
                    self._idle.set()
                self._queue.task_done()

    async def _still_held(self, batch: Batch) -> bool:
        """Renew a lease that waited in the queue for more than half its length; False if it was lost.

        A lease counts from the claim, but the attempt starts when a worker is free: without the
        renewal a slow provider could let another replica take the row over mid-send.
        """
        claimed_until = batch.claims[0].delivery.claimed_until
        if claimed_until is not None and claimed_until - utcnow() > self._lease / 2:
            return True
        return await self._runner.renew(batch, self._lease)

    async def aclose(self) -> None:
        """Stop claiming, let in-flight attempts finish within the grace period, release the rest."""
        self._stopping.set()
        self._wake.set()
        if self._feeder is not None:
            await self._feeder
        unstarted = []
        while not self._queue.empty():
            unstarted.append(self._queue.get_nowait())
            self._queue.task_done()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._grace):
                await self._idle.wait()
        for task in self._tasks:
            task.cancel()  # an attempt cancelled mid-send releases its own claim (DeliveryRunner.complete)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if unstarted:
            await self._release_unstarted(unstarted)

    async def _release_unstarted(self, batches: list[Batch]) -> None:
        await self._runner.release(batches, "released before sending: shutdown", unsent=True)
        log.info("released %d claimed deliveries that had not started", sum(len(b.claims) for b in batches))
