"""Planning the fallback of a failed delivery (e.g. chat push → email) with routing's own rules."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from notifier.catalog import Catalog
from notifier.db import driver
from notifier.db.models import Delivery, Event
from notifier.delivery import state
from notifier.delivery.recipients import load_organization_preferences, load_recipients
from notifier.delivery.state import DeliveryStates
from notifier.routing import Profile, plan_deliveries
from notifier.types import ChannelInfo, ChannelName, DispatchItem


async def plan_fallback(
    session: driver.Target,
    *,
    states: DeliveryStates,
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
    stored = await load_recipients(
        session, user_ids=[delivery.user_id], event_organization_id=event.organization_id, catalog=catalog
    )
    profile = stored.profiles.get(delivery.user_id) or Profile(id=delivery.user_id)
    organizations = stored.organization_preferences
    if profile.id not in stored.profiles and event.organization_id:  # a user deleted since: the event's organization
        organizations = await load_organization_preferences(
            session, organization_ids=[event.organization_id], catalog=catalog
        )
    [decision] = plan_deliveries(
        event_type=event_type,
        data=event.data,
        recipients=[profile],
        actor=event.actor,
        preferences=stored.preferences,
        organization_preferences=organizations,
        live_channels=live_channels,
        now=now,
        channels=[fallback],
        fallback_for=ChannelName(delivery.channel),
        event_organization_id=event.organization_id,
    )
    if not decision.creates_delivery:
        return []
    note = f"fallback for {delivery.channel} delivery {delivery.id}"
    new = state.planned(decision, event_id=event.id, event_type=event.type, now=now, fallback_of=delivery.id, note=note)
    if not await states.create_unless_planned(session, new, now=now):
        return []
    return [DispatchItem(new.row["id"], decision.not_before)] if decision.dispatchable else []
