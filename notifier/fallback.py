"""Planning the fallback of a failed delivery (e.g. chat push → email) with routing's own rules."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from notifier import store
from notifier.catalog import Catalog
from notifier.dispatch.base import DispatchItem
from notifier.models import Delivery, Event
from notifier.routing import ChannelInfo, Profile, plan_deliveries
from notifier.types import ChannelName


async def plan_fallback(
    session: AsyncSession,
    *,
    delivery: Delivery,
    event: Event,
    catalog: Catalog,
    live_channels: Mapping[ChannelName, ChannelInfo],
    now: dt.datetime,
) -> list[DispatchItem]:
    """Add the fallback delivery for failed ``delivery`` if its event type names one; return what to dispatch.

    The fallback channel counts as a default channel but explicit opt-outs still hold; a fallback
    never has a fallback, and an existing (event, user, channel) row is left alone.
    """
    event_type = catalog.get(event.type)
    fallback = event_type.fallback.get(ChannelName(delivery.channel)) if event_type else None
    if event_type is None or fallback is None or delivery.fallback_of is not None:
        return []
    # The query ingest plans with: the user, their preferences and the organization document applied to them.
    stored = await store.load_recipients(
        session, user_ids=[delivery.user_id], event_organization_id=event.organization_id, catalog=catalog
    )
    profile = stored.profiles.get(delivery.user_id) or Profile(id=delivery.user_id)
    orgs = stored.organization_preferences
    if profile.id not in stored.profiles and event.organization_id:  # a user deleted since: the event's organization
        orgs = await store.load_organization_preferences(
            session, organization_ids=[event.organization_id], catalog=catalog
        )
    [decision] = plan_deliveries(
        event_type=event_type,
        data=event.data,
        recipients=[profile],
        actor=event.actor,
        preferences=stored.preferences,
        organization_preferences=orgs,
        live_channels=live_channels,
        now=now,
        channels=[fallback],
        fallback_for=ChannelName(delivery.channel),
        event_organization_id=event.organization_id,
    )
    if decision.status is None:
        return []
    row: dict[str, Any] = {
        "id": uuid.uuid4(),
        "event_id": event.id,
        "event_type": event.type,
        "user_id": profile.id,
        "channel": str(fallback),
        "provider": decision.provider,
        "status": str(decision.status),
        "reason": str(decision.reason) if decision.reason else None,
        "not_before": decision.not_before,
        "fallback_of": delivery.id,
        "created_at": now,
        "updated_at": now,
    }
    if not await store.insert_deliveries_ignoring_duplicates(session, rows=[row]):
        return []
    move = store.NewTransition(
        delivery_id=row["id"],
        from_status=None,
        to_status=row["status"],
        reason=row["reason"],
        note=f"fallback for {delivery.channel} delivery {delivery.id}",
        context={"channel": row["channel"], "event_id": str(event.id)},
    )
    await store.record_transitions(session, transitions=[move], at=now)
    return [DispatchItem(row["id"], decision.not_before)] if decision.dispatchable else []
