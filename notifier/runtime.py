"""The resources one running service owns, built by ``app.create_app``'s lifespan and handed to handlers."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from notifier.catalog import Catalog
from notifier.channels.ably import AblyRealtime
from notifier.channels.registry import ChannelRegistry
from notifier.config import Settings
from notifier.delivery.recovery import QStashRecovery
from notifier.delivery.runner import DeliveryRunner
from notifier.delivery.state import DeliveryStates
from notifier.dispatch.base import Dispatcher
from notifier.ingest.events import EventIntake
from notifier.metrics import Metrics
from notifier.security import Authenticator, QStashVerifier


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    catalog: Catalog
    channels: ChannelRegistry
    authenticator: Authenticator
    qstash: QStashVerifier
    states: DeliveryStates
    intake: EventIntake
    runner: DeliveryRunner
    recovery: QStashRecovery
    dispatcher: Dispatcher
    metrics: Metrics
    realtime: AblyRealtime | None  # Ably, when configured: announcements, presence, the inbox component's tokens
