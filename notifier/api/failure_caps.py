"""Caps on failed authentications across all client addresses, so that an attacker with many addresses cannot
guess credentials at speed either.

Two caps, each a sliding window of one minute: failed sign-ins on the dashboard and inbox-demo forms
(``NOTIFIER_SIGNIN_FAILURES_PER_MINUTE``, default 30; the per-address limit of ``signin_limit`` still applies
first), and failed bearer credentials on every bearer route (``NOTIFIER_BEARER_FAILURES_PER_MINUTE``, default
300). Only a credential that was presented and refused counts: a request without one guesses nothing.

Past a cap, a request whose credential would be checked is answered 429 with ``Retry-After`` (the seconds until
the oldest counted failure leaves the window) *without the credential being checked*. Checking it first, in
constant time, and answering 429 only when it is wrong was considered and rejected: a valid credential would then
still get through, so "429" would simply mean "wrong" and "2xx" "right", at any rate; the cap would slow nobody
and the oracle would be open again. The answer past the cap must not depend on the credential at all.

Valid credentials keep working through *where they come from* instead: an address that presented a valid
credential of the same kind (a service key, or a user token) within the last hour is vouched for, and its
requests are still checked past the cap (their failures still count). A producer or operator already at work is
not locked out by someone else's guessing; an address never seen with a valid credential waits until the
guessing stops. What this leaves open: an attacker behind the same address as a vouched-for client (one NAT, one
unconfigured proxy) is not slowed by the bearer cap; the sign-in forms keep their per-address limit there. The
kind of a credential is read from its shape (a JWT has two dots; anything else is taken for a service key), which
tells the attacker nothing: a user token's validity never vouches for an address guessing service keys.

Memory is bounded: each cap keeps at most ``limit`` timestamps, the vouched-for addresses at most
``max_addresses`` per kind (the least recently vouched evicted first). Everything lives in one process: with N
processes or replicas the caps allow N times as many failures, and an address is vouched for per process.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from notifier.config import Settings

log = logging.getLogger("notifier.security")

Clock = Callable[[], float]
CredentialShape = Literal["service", "user"]


def client_address(request: Request) -> str:
    """The address uvicorn reports for the client: the peer, or the client a trusted proxy names."""
    return request.client.host if request.client else "unknown"


def credential_shape(token: str) -> CredentialShape:
    """What a bearer credential claims to be, from its shape alone (as ``Authenticator.authenticate`` tries it)."""
    return "user" if token.count(".") == 2 else "service"


class FailureCap:
    """At most ``limit`` counted failures per ``window`` seconds from all addresses together."""

    def __init__(self, *, name: str, limit: int, window: float = 60.0, clock: Clock = time.monotonic) -> None:
        if limit < 1:
            raise ValueError(f"a failure cap needs a positive limit, got {limit}")
        self.name, self.limit, self.window = name, limit, window
        self._clock = clock
        self._failures: deque[float] = deque(maxlen=limit)

    def __len__(self) -> int:
        """The number of failures on record (at most ``limit``)."""
        return len(self._failures)

    def retry_after(self) -> float | None:
        """Return the seconds until the cap lets an unvouched credential be checked again, or None if it does."""
        now = self._clock()
        self._expire(now)
        if len(self._failures) < self.limit:
            return None
        return self._failures[0] + self.window - now

    def record_failure(self) -> None:
        """Count one failure; the one that reaches the cap is logged (once per saturation, never the credential)."""
        now = self._clock()
        self._expire(now)
        before = len(self._failures)
        self._failures.append(now)
        if before == self.limit - 1:
            log.warning(
                "%s cap reached: %d failures within %d s from all addresses; unvouched addresses get 429 unchecked "
                "for %d s", self.name, self.limit, self.window, round(self._failures[0] + self.window - now),
            )  # fmt: skip

    def _expire(self, now: float) -> None:
        while self._failures and self._failures[0] <= now - self.window:
            self._failures.popleft()


class VouchedAddresses:
    """Addresses that presented a valid credential of a kind within the last ``ttl`` seconds."""

    def __init__(self, *, ttl: float = 3600.0, max_addresses: int = 10_000, clock: Clock = time.monotonic) -> None:
        self.ttl, self.max_addresses = ttl, max_addresses
        self._clock = clock
        # Per kind, ordered by the latest valid credential, oldest first: eviction takes from the front.
        self._seen: dict[CredentialShape, OrderedDict[str, float]] = {"service": OrderedDict(), "user": OrderedDict()}

    def __len__(self) -> int:
        return sum(len(seen) for seen in self._seen.values())

    def vouch(self, kind: CredentialShape, address: str) -> None:
        """Remember that ``address`` just presented a valid credential of ``kind``."""
        seen = self._seen[kind]
        seen[address] = self._clock()
        seen.move_to_end(address)
        while len(seen) > self.max_addresses:
            seen.popitem(last=False)

    def vouched(self, kind: CredentialShape, address: str) -> bool:
        """Whether ``address`` presented a valid credential of ``kind`` within ``ttl`` seconds."""
        seen = self._seen[kind]
        at = seen.get(address)
        if at is None:
            return False
        if at <= self._clock() - self.ttl:
            del seen[address]
            return False
        return True


@dataclass(frozen=True)
class FailureCaps:
    """This process's caps and vouched-for addresses (``create_app`` makes them; tests may swap in their own)."""

    signin: FailureCap
    bearer: FailureCap
    vouched: VouchedAddresses

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock = time.monotonic) -> FailureCaps:
        return cls(
            signin=FailureCap(name="failed sign-in", limit=settings.signin_failures_per_minute, clock=clock),
            bearer=FailureCap(name="failed bearer credential", limit=settings.bearer_failures_per_minute, clock=clock),
            vouched=VouchedAddresses(clock=clock),
        )


def failure_caps(request: Request) -> FailureCaps:
    """This app's ``FailureCaps``."""
    caps: FailureCaps = request.app.state.failure_caps
    return caps
