"""How a delivery id reaches ``notifier.delivery``: the dispatcher protocol.

A dispatcher is told about deliveries only after the transaction that created (or re-queued)
them has committed. It must not raise for transport trouble: the rows stay ``queued`` in the
database, which is the source of truth, and the sweep (or the local poller) picks them up again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from notifier.types import DispatchItem

__all__ = ["DispatchItem", "Dispatcher"]


class Dispatcher(Protocol):
    name: str

    async def start(self) -> None:
        """Begin work (the local dispatcher starts its workers; QStash has nothing to start)."""
        ...

    async def dispatch(self, items: Sequence[DispatchItem]) -> int:
        """Hand committed deliveries over for attempting; return how many were handed over (published to
        QStash, announced to workers). Never raises for transport failures."""
        ...

    async def aclose(self) -> None:
        """Stop: finish or release in-flight attempts, close clients."""
        ...
