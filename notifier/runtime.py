"""The resources one running service owns, built by ``app.create_app``'s lifespan and handed to handlers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from notifier.catalog import Catalog
from notifier.channels.base import PresenceChecker
from notifier.config import Settings
from notifier.dispatch.base import Dispatcher
from notifier.security import Authenticator, QStashVerifier

if TYPE_CHECKING:
    from notifier.channels.ably import AblyRealtime
    from notifier.channels.registry import ChannelRegistry
    from notifier.delivery import DeliveryRunner
    from notifier.metrics import Metrics


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    catalog: Catalog
    channels: ChannelRegistry
    authenticator: Authenticator
    qstash: QStashVerifier
    presence: PresenceChecker | None
    runner: DeliveryRunner
    dispatcher: Dispatcher
    metrics: Metrics
    realtime: AblyRealtime | None = None  # Ably, when configured: signs the inbox component's token requests
