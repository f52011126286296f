"""The explicit channel registry: which provider serves each channel in this deployment."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from notifier.channels.base import Channel
from notifier.types import ALL_CHANNELS, ChannelInfo, ChannelName

log = logging.getLogger("notifier.channels")


class ChannelRegistry:
    """Maps each live channel to its one provider; registering a channel twice fails at start."""

    def __init__(self, channels: Iterable[Channel] = ()) -> None:
        self._channels: dict[ChannelName, Channel] = {}
        for channel in channels:
            self.register(channel)

    def register(self, channel: Channel) -> None:
        if channel.channel in self._channels:
            existing = self._channels[channel.channel].provider
            raise ValueError(f"channel '{channel.channel}' is already served by '{existing}'")
        self._channels[channel.channel] = channel

    def get(self, name: ChannelName | str) -> Channel | None:
        return self._channels.get(ChannelName(name))

    @property
    def live(self) -> Mapping[ChannelName, ChannelInfo]:
        return {
            name: ChannelInfo(
                provider=channel.provider, needs_email=channel.needs_email, group_limit=channel.group_limit
            )
            for name, channel in self._channels.items()
        }

    def describe(self) -> dict[str, str | None]:
        """Which provider serves each channel (None: not configured); safe to log."""
        return {str(name): (self._channels[name].provider if name in self._channels else None) for name in ALL_CHANNELS}

    def log_live(self) -> None:
        for name, provider in self.describe().items():
            if provider:
                log.info("channel %s is live via %s", name, provider)
            else:
                log.info("channel %s is off: its provider is not configured", name)

    async def aclose(self) -> None:
        for channel in reversed(list(self._channels.values())):
            try:
                await channel.aclose()
            except Exception:
                log.exception("closing channel %s failed", channel.channel)
