"""Failed dashboard sign-ins counted per client address, so a service key cannot be guessed at speed.

After ``limit`` failures from one address within ``window`` seconds the address is locked out until the
oldest of them is ``window`` seconds old; meanwhile the caller answers 429 without checking the key. A
successful sign-in forgets the address. Memory is bounded: at most ``max_addresses`` addresses (the one
that failed least recently is evicted first), each with at most ``limit`` timestamps; addresses whose
failures have all expired are pruned as new failures arrive.

The count lives in one process: with N worker processes or replicas an address gets up to N times ``limit``
tries per window.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from starlette.requests import Request

log = logging.getLogger("notifier.dashboard")

Clock = Callable[[], float]


class SignInLimiter:
    """Failed sign-ins per address over a sliding window; an address with ``limit`` of them is locked out."""

    def __init__(
        self, *, limit: int = 5, window: float = 300.0, max_addresses: int = 10_000, clock: Clock = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._clock = clock
        # Ordered by each address's latest failure, oldest first: eviction and pruning both take from the front.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        """The number of addresses with failures on record."""
        return len(self._failures)

    def retry_after(self, address: str) -> float | None:
        """Return the seconds until ``address`` may try again, or None if it is not locked out."""
        now = self._clock()
        failures = self._recent(address, now)
        if failures is None or len(failures) < self.limit:
            return None
        return failures[0] + self.window - now

    def record_failure(self, address: str) -> None:
        """Count a failed sign-in from ``address``; the one that reaches ``limit`` starts a lockout (logged)."""
        now = self._clock()
        self._prune(now)
        failures = self._recent(address, now) or deque(maxlen=self.limit)
        before = len(failures)
        failures.append(now)
        self._failures[address] = failures
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
        if before == self.limit - 1:
            log.warning(
                "dashboard sign-in locked for %s: %d failed attempts within %d s; answering 429 for %d s",
                address, self.limit, self.window, round(failures[0] + self.window - now),
            )  # fmt: skip

    def record_success(self, address: str) -> None:
        """Forget the failures of ``address``."""
        self._failures.pop(address, None)

    def _recent(self, address: str, now: float) -> deque[float] | None:
        """Return the failures of ``address`` still inside the window (dropping the rest), or None if none are."""
        failures = self._failures.get(address)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        return failures

    def _prune(self, now: float) -> None:
        """Drop addresses whose latest failure has left the window."""
        while self._failures:
            address, failures = next(iter(self._failures.items()))
            if failures[-1] > now - self.window:
                return
            del self._failures[address]


def signin_limiter(request: Request) -> SignInLimiter:
    """This app's sign-in limiter (``create_app`` makes it; tests may swap in one with their own clock)."""
    limiter: SignInLimiter = request.app.state.signin_limiter
    return limiter
