"""Failed dashboard sign-ins counted per client address, so a service key cannot be guessed at speed.

After ``limit`` failures from one address within ``window`` seconds the address is locked out until the
oldest of them is ``window`` seconds old; meanwhile the caller answers 429 without checking the key. A
successful sign-in forgets the address. Memory is bounded: at most ``max_addresses`` addresses (the one
that failed least recently is evicted first), each with at most ``limit`` timestamps; addresses whose
failures have all expired are pruned as new failures arrive.

The count lives in one process: with N worker processes or replicas an address gets up to N times ``limit``
tries per window.

``signin_refusal`` and ``record_signin`` are what the sign-in forms (dashboard, inbox demo) call: the address's
own lockout first, then the cap on failed sign-ins from all addresses (``failure_caps``), which an address
vouched for by a recent valid service key is not held to.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from notifier.api.failure_caps import failure_caps

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


@dataclass(frozen=True)
class SignInRefusal:
    """Why a sign-in is answered 429 without its key being checked, and for how many whole seconds."""

    seconds: int
    everyone: bool  # the cap on failed sign-ins from all addresses, not this address's own lockout


def signin_refusal(request: Request, address: str) -> SignInRefusal | None:
    """Return why a sign-in from ``address`` must not be checked now, or None if its key may be checked."""
    wait = signin_limiter(request).retry_after(address)
    if wait is not None:
        return SignInRefusal(max(1, math.ceil(wait)), everyone=False)
    caps = failure_caps(request)
    if caps.vouched.vouched("service", address):
        return None
    wait = caps.signin.retry_after()
    return SignInRefusal(max(1, math.ceil(wait)), everyone=True) if wait is not None else None


def record_signin(request: Request, address: str, *, valid: bool) -> None:
    """Count a checked sign-in: a failure against the address and the global cap; a success clears the
    address's failures and vouches for it."""
    limiter, caps = signin_limiter(request), failure_caps(request)
    if valid:
        limiter.record_success(address)
        caps.vouched.vouch("service", address)
    else:
        limiter.record_failure(address)
        caps.signin.record_failure()
