"""Attempting deliveries: claim → render → send → record → classify.

The unit of an attempt is a ``Batch``: the members of one send group, sent with one provider call under the
group's idempotency key, or one delivery alone under its own. The QStash endpoints call ``attempt`` (a
delivery, or the group it belongs to) and ``attempt_group``; the local dispatcher claims due batches
(``claim_due``: leases, attempt rows and transitions for all of them in one transaction) and hands each to
``complete``. Outcomes of concurrent attempts are recorded together (``notifier.delivery.outcomes``: one
transaction for everything finished meanwhile), because on a small machine the cost of a delivery is mostly
its transactions. Every status change goes through ``notifier.delivery.state``; every member of an attempt gets
its own attempt row, status and transition; the outcome write is shielded from cancellation, so a shutdown
never leaves a row half-recorded.

A QStash callback writes twice: the claim and the outcome. The route's ``Upstash-Signature`` is spent (its
replay protection) by the claim -- the ``spend`` ``attempt``/``attempt_group`` take -- not in a
transaction of its own before the handler: one transaction fewer per callback, by the same reasoning. On
PostgreSQL the usual claim is not even a transaction block: the unit's rows are read without a lock, and one
statement spends the signature and claims them if none changed since (``notifier.db.claiming``); otherwise the
claim is the transaction that locks them.

The retry budget (1 + NOTIFIER_MAX_RETRIES attempts since the last operator retry) is enforced when an
outcome is recorded and again when a delivery is claimed: a delivery whose attempts are spent (its last
outcome could not be stored) is failed ``retries_exhausted`` by the claim and never sent again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from notifier import db
from notifier.catalog import Catalog
from notifier.channels.base import SendResult
from notifier.channels.registry import ChannelRegistry
from notifier.config import Settings
from notifier.db import deliveries, delivery_reads, digests, driver, revocations
from notifier.db.deliveries import DeliveryContext
from notifier.db.delivery_reads import DeliveryHistory
from notifier.db.models import Delivery, Event
from notifier.delivery import state
from notifier.delivery.fallback import plan_fallback
from notifier.delivery.messages import Batch, Claim, ClaimedBatches, group_message
from notifier.delivery.outcomes import AttemptReport, Finished, OutcomeRecorder
from notifier.delivery.state import DeliveryStates, Move
from notifier.errors import Conflict, NotFound
from notifier.metrics import Metrics
from notifier.types import TERMINAL_STATUSES, DeliveryStatus, DispatchItem, utcnow

log = logging.getLogger("notifier.delivery")

Spend = revocations.PendingRevocation
"""A QStash request's signature, spent by the attempt's claim: in the claim's statement (``notifier.db.claiming``)
or first in its transaction, before any row is locked. A replay raises its refusal with nothing claimed, and
nothing of the claim kept."""


class DeliveryRunner:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        catalog: Catalog,
        channels: ChannelRegistry,
        settings: Settings,
        metrics: Metrics,
        states: DeliveryStates,
    ) -> None:
        self._sessions = sessions
        self._catalog = catalog
        self._channels = channels
        self._settings = settings
        self._metrics = metrics
        self._states = states
        self._outcomes = OutcomeRecorder(
            sessions=sessions,
            channels=channels,
            settings=settings,
            metrics=metrics,
            states=states,
            fallback=self.fallback,
        )

    @property
    def lease(self) -> dt.timedelta:
        return dt.timedelta(seconds=self._settings.claim_lease_seconds)

    async def attempt(
        self, delivery_id: uuid.UUID, *, via: str, generation: int | None = None, spend: Spend | None = None
    ) -> list[AttemptReport]:
        """Attempt ``delivery_id`` once -- with its whole send group, when it is in one. Never raises for
        provider faults; returns what happened to each delivery attempted (or why none was). ``spend`` runs
        first in the claim's transaction, which commits it whatever the claim finds (even no delivery at all);
        what it raises is raised here, with nothing claimed."""
        return await self._attempt_unit(delivery_id=delivery_id, via=via, generation=generation, spend=spend)

    async def attempt_group(
        self, group_id: uuid.UUID, *, via: str, generation: int | None = None, spend: Spend | None = None
    ) -> list[AttemptReport]:
        """Attempt the members of send group ``group_id`` once, with one provider call (``spend`` as in
        ``attempt``)."""
        return await self._attempt_unit(send_group=group_id, via=via, generation=generation, spend=spend)

    async def claim_due(self, *, limit: int, lease: dt.timedelta, via: str = "local") -> ClaimedBatches:
        """Lease about ``limit`` due deliveries (whole send groups) and start an attempt on each, in one transaction.

        Deliveries whose retry budget is already spent are failed here instead (their fallbacks are queued).
        """
        async with driver.transaction(self._sessions) as session:  # no ORM session on PostgreSQL (``driver``)
            now = await db.transaction_time(session)
            rows, contended = await deliveries.claim_due(session, now=now, limit=limit)
            batches, exhausted = await self._start(session, rows, via=via, lease=lease, now=now)
        claimed = ClaimedBatches(batches)
        claimed.contended = contended
        claimed.planned = sum(len(report.follow_up) for report in exhausted)
        return claimed

    async def complete(self, batch: Batch) -> list[AttemptReport]:
        """Send a claimed batch and record the outcomes (in one transaction with other workers' outcomes)."""
        started_at, started = utcnow(), time.perf_counter()
        try:
            results = await self._prepare_and_send(batch)
        except asyncio.CancelledError:
            await asyncio.shield(self.release([batch], "attempt interrupted by shutdown"))
            raise
        return await self._outcomes.submit(Finished(batch, results, started_at, time.perf_counter() - started))

    async def renew(self, batch: Batch, lease: dt.timedelta) -> bool:
        """Extend ``batch``'s lease from now; False if any of its rows was taken over (the token no longer matches)."""
        claimed_until = utcnow() + lease
        async with self._sessions() as session, session.begin():
            renewed = await deliveries.renew_lease(
                session, delivery_ids=batch.delivery_ids, token=batch.token, claimed_until=claimed_until
            )
        if renewed:
            for claim in batch.claims:
                claim.delivery.claimed_until = claimed_until
        return renewed

    async def _attempt_unit(
        self,
        *,
        via: str,
        generation: int | None,
        spend: Spend | None,
        delivery_id: uuid.UUID | None = None,
        send_group: uuid.UUID | None = None,
    ) -> list[AttemptReport]:
        begun = await self._begin(
            via=via, generation=generation, spend=spend, delivery_id=delivery_id, send_group=send_group
        )
        if not isinstance(begun, Batch):
            return begun
        return await self.complete(begun)

    async def _begin(
        self,
        *,
        via: str,
        generation: int | None,
        spend: Spend | None,
        delivery_id: uuid.UUID | None,
        send_group: uuid.UUID | None,
    ) -> Batch | list[AttemptReport]:
        """Claim a delivery (its group, when it is in one) or a group for one attempt; or say why not."""
        if spend is not None:
            async with driver.alone(self._sessions) as connection:
                if connection is not None:  # PostgreSQL
                    begun = await self._claim_unlocked(
                        connection,
                        via=via,
                        generation=generation,
                        spend=spend,
                        delivery_id=delivery_id,
                        send_group=send_group,
                    )
                    if begun is not None:
                        return begun
            spend = None if spend.done else spend  # spent by a claim whose rows changed meanwhile
        async with self._sessions() as session, session.begin():
            if spend is not None:  # before any lock: a replayed signature is refused without waiting on a row
                await spend(session)
            rows = await deliveries.lock_unit(session, delivery_id=delivery_id, send_group=send_group)
            if rows and send_group is None and (group := rows[0][0].send_group) is not None:
                rows = await deliveries.lock_unit(session, send_group=group)
            now = utcnow()  # once the rows are locked: after every transition of theirs committed before
            if not rows:
                return [AttemptReport("missing", delivery_id or send_group or uuid.UUID(int=0), detail="none found")]
            pending = [row for row in rows if row[0].status not in TERMINAL_STATUSES]
            # A message of an earlier dispatch generation: a newer one was published and is answered instead. The
            # newest generation among the pending members decides: a re-dispatch raises only theirs, and a member
            # sent before it keeps the old one.
            if generation is not None and max(d.dispatch_generation for d, _, _ in pending or rows) > generation:
                return [AttemptReport("superseded", d.id, d.status, d.reason) for d, _, _ in rows]
            if not pending:
                return [AttemptReport("terminal", d.id, d.status, d.reason) for d, _, _ in rows]
            busy = [report for d, _, _ in pending if (report := _busy(d, now)) is not None]
            if busy:  # never a part of a group: its members go together, under one key
                return busy
            batches, exhausted = await self._start(session, pending, via=via, lease=self.lease, now=now)
            return batches[0] if batches else exhausted

    async def _claim_unlocked(
        self,
        connection: driver.Lent,
        *,
        via: str,
        generation: int | None,
        spend: Spend,
        delivery_id: uuid.UUID | None,
        send_group: uuid.UUID | None,
    ) -> Batch | None:
        """``_begin``'s claim for its common case, without a transaction block (``notifier.db.claiming``): a unit
        whose pending rows all wait for this message -- queued or deferred, of no newer generation, within their
        retry budget. None when the unit is not that case, or a row changed between the read and the claim:
        ``_begin`` then claims in a transaction (``spend.done`` says whether the signature was spent here). A
        replay raises ``spend``'s refusal, with nothing written."""
        rows = await deliveries.read_unit(connection, delivery_id=delivery_id, send_group=send_group)
        pending = [row for row in rows if row[0].status not in TERMINAL_STATUSES]
        if not pending or (send_group is None and rows[0][0].send_group is not None):
            return None
        for delivery, _, _ in pending:
            newer = generation is not None and delivery.dispatch_generation > generation
            if newer or delivery.status == DeliveryStatus.sending or self._budget_spent(delivery):
                return None
        now = utcnow()  # after the read: every transition of these rows committed before it (the claim checks)
        read_at = [delivery.updated_at for delivery, _, _ in pending]
        batches, moves, attempts = _claims(pending, via=via, claimed_until=now + self.lease, now=now, digest_counts={})
        claims = [
            state.UnlockedClaim(move, read, attempt)
            for move, read, attempt in zip(moves, read_at, attempts, strict=True)
        ]
        spent = await self._states.claim_unlocked(connection, claims, spend.parameters(now), now=now)
        spend.settle(spent.first_use)
        if not spent.claimed:
            return None
        # Counted once claimed, in a statement of its own: it then sees every message folded into them.
        counted = await digests.counts(connection, heads=[d for d, _, _ in pending if d.digest_key])
        for claim in batches[0].claims:
            claim.digest_count = counted.get(claim.delivery.id, 0)
        return batches[0]

    async def _start(
        self,
        session: driver.Target,
        rows: Sequence[DeliveryContext],
        *,
        via: str,
        lease: dt.timedelta,
        now: dt.datetime,
    ) -> tuple[list[Batch], list[AttemptReport]]:
        """Move locked rows to ``sending``, each batch under a token of its own, and open an attempt row for each;
        fail the ones whose retry budget is spent. Returns the batches and the reports of the failed ones."""
        spent = [row for row in rows if self._budget_spent(row[0])]
        exhausted = [await self.exhaust(session, row, now=now, note=_SPENT) for row in spent]
        claimable = [row for row in rows if not self._budget_spent(row[0])]
        abandoned = [delivery.id for delivery, _, _ in claimable if delivery.status == DeliveryStatus.sending]
        await deliveries.close_interrupted_attempts(session, delivery_ids=abandoned, now=now)
        digest_counts = await digests.counts(session, heads=[d for d, _, _ in claimable if d.digest_key])
        batches, moves, attempts = _claims(
            claimable, via=via, claimed_until=now + lease, now=now, digest_counts=digest_counts
        )
        async with driver.together(session):  # the delivery, transition and attempt rows: one statement
            await self._states.record(session, moves, now=now)
            await deliveries.insert_attempts(session, rows=attempts)
        return batches, exhausted

    def _budget_spent(self, delivery: Delivery) -> bool:
        return delivery.attempts - delivery.retry_base >= 1 + self._settings.max_retries

    async def _prepare_and_send(self, batch: Batch) -> list[SendResult]:
        """One result per claim: the provider's, or why the member was not sent."""
        group, results = group_message(
            batch.key, batch.claims, catalog=self._catalog, channels=self._channels, app_url=self._settings.app_url
        )
        if group is None:
            return [result or SendResult.retry("not sent") for result in results]
        channel = self._channels.get(batch.claims[0].delivery.channel)
        assert channel is not None  # checked in group_message
        started = time.perf_counter()
        try:
            # Channels bound their own provider calls; this outer bound only guards against a channel bug.
            timeout = self._settings.provider_timeout_seconds * 3 + 5
            sent = await asyncio.wait_for(channel.send_group(group), timeout)
        except TimeoutError:
            sent = [SendResult.retry("provider call did not finish in time")] * len(group.messages)
        except Exception as exc:  # a channel must classify, but a bug there must not kill the worker
            log.exception("channel %s raised instead of classifying", channel.provider)
            sent = [SendResult.retry(f"channel error: {type(exc).__name__}")] * len(group.messages)
        self._metrics.provider_latency.labels(channel=str(channel.channel), provider=channel.provider).observe(
            time.perf_counter() - started
        )
        answers = iter(sent)
        return [result if result is not None else next(answers) for result in results]

    async def fallback(
        self, session: driver.Target, delivery: Delivery, event: Event, now: dt.datetime
    ) -> list[DispatchItem]:
        """Plan the fallback of a failed ``delivery`` within the caller's transaction; return what to dispatch."""
        return await plan_fallback(
            session,
            states=self._states,
            delivery=delivery,
            event=event,
            catalog=self._catalog,
            live_channels=self._channels.live,
            now=now,
        )

    async def exhaust(
        self, session: driver.Target, row: DeliveryContext, *, now: dt.datetime, note: str
    ) -> AttemptReport:
        """Fail one locked, pending delivery ``retries_exhausted`` and plan its fallback, within the caller's
        transaction."""
        delivery, event, _ = row
        if delivery.status == DeliveryStatus.sending:
            await deliveries.close_interrupted_attempts(session, delivery_ids=[delivery.id], now=now)
        await self._states.record(session, [state.exhaust(delivery, note=note, now=now)], now=now)
        follow_up = await self.fallback(session, delivery, event, now)
        return AttemptReport("failed", delivery.id, delivery.status, delivery.reason, detail=note, follow_up=follow_up)

    async def release(self, batches: Sequence[Batch], note: str, *, unsent: bool = False) -> None:
        """Give claims back (status queued, due now); the next attempt reuses the idempotency key.

        Their open attempt rows are closed as ``interrupted``. A claim taken over meanwhile is left to
        its new owner. ``unsent``: nothing of these batches reached the provider, so their attempts are given back
        to the retry budget (``state.release``).
        """
        tokens = {delivery_id: batch.token for batch in batches for delivery_id in batch.delivery_ids}
        async with self._sessions() as session, session.begin():
            locked = await deliveries.lock_many(session, list(tokens))
            now = utcnow()  # once the rows are locked (see ``_begin``)
            owned = [delivery for delivery in locked.values() if delivery.claim_token == tokens[delivery.id]]
            await deliveries.close_interrupted_attempts(session, delivery_ids=[d.id for d in owned], now=now)
            moves = [state.release(d, note=note, now=now, unsent=unsent) for d in owned]
            await self._states.record(session, moves, now=now)

    async def requeue_failed(
        self, delivery_id: uuid.UUID, *, note: str = "retried by an operator"
    ) -> tuple[DispatchItem, DeliveryHistory]:
        """Give a failed delivery a fresh retry budget; raise ``NotFound``, or ``Conflict`` unless it is ``failed``.

        It goes alone (it leaves its send group) under its own idempotency key, as a new dispatch generation.
        Returns what to dispatch and the delivery with its history as re-queued, read in the same transaction: a
        worker polling for due rows may claim it the moment the transaction commits.
        """
        async with self._sessions() as session, session.begin():
            delivery = (await deliveries.lock_many(session, [delivery_id])).get(delivery_id)
            now = utcnow()  # once the row is locked (see ``_begin``)
            if delivery is None:
                raise NotFound(f"delivery '{delivery_id}' not found")
            if delivery.status != DeliveryStatus.failed:
                raise Conflict(f"only failed deliveries can be retried; this one is {delivery.status}")
            await self._states.record(session, [state.requeue(delivery, note=note, now=now)], now=now)
            history = await delivery_reads.with_history(session, delivery_id)
            assert history is not None  # locked above
            return DispatchItem(delivery.id, None, generation=delivery.dispatch_generation), history


def _claims(
    rows: Sequence[DeliveryContext],
    *,
    via: str,
    claimed_until: dt.datetime,
    now: dt.datetime,
    digest_counts: Mapping[uuid.UUID, int],
) -> tuple[list[Batch], list[Move], list[dict[str, object]]]:
    """Claim ``rows`` (``state.claim``), each send group's members in one batch under one token, one delivery
    alone in a batch of its own; the batches, the moves and, per move, its attempt row."""
    units: dict[uuid.UUID, Batch] = {}
    moves: list[Move] = []
    attempts: list[dict[str, object]] = []
    for delivery, event, user in rows:
        batch = units.setdefault(delivery.send_group or delivery.id, Batch([], uuid.uuid4(), via))
        moves.append(state.claim(delivery, token=batch.token, claimed_until=claimed_until, via=via, now=now))
        batch.claims.append(Claim(delivery, event, user, delivery.attempts, digest_counts.get(delivery.id, 0)))
        attempts.append(
            {
                "id": uuid.uuid4(),
                "delivery_id": delivery.id,
                "number": delivery.attempts,
                "started_at": now,
                "via": via,
                "send_group": delivery.send_group,
            }
        )
    return list(units.values()), moves, attempts


_SPENT = (
    "the retry budget was spent before this attempt (the last one was cut off by a shutdown or its outcome could "
    "not be stored); not sent again"
)


def _busy(delivery: Delivery, now: dt.datetime) -> AttemptReport | None:
    """``busy`` (with the seconds left) while an attempt holds ``delivery``'s lease, else None."""
    if delivery.status != DeliveryStatus.sending or delivery.claimed_until is None:
        return None
    remaining = (delivery.claimed_until - now).total_seconds()
    if remaining <= 0:
        return None
    return AttemptReport("busy", delivery.id, delivery.status, retry_after=math.ceil(remaining))
