"""Credentials as ``notifier.security`` checks them, through the app: the user-token clock leeway."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from tests.conftest import USER_JWT_SECRET, Service

PREFERENCES = "/v1/users/alice/preferences"


def token(**offsets: int) -> str:
    """alice's token with ``exp``/``iat``/``nbf`` at now + the given offsets (``exp`` one hour ahead unless given)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "alice", "exp": now + 3600}
    claims.update({name: now + offset for name, offset in offsets.items()})
    return jwt.encode(claims, USER_JWT_SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    ("offsets", "status"),
    [
        ({"iat": 3}, 200),  # the issuer's clock a little ahead: refused before the leeway
        ({"iat": 25}, 200),
        ({"iat": 35}, 401),
        ({"nbf": 25}, 200),
        ({"nbf": 35}, 401),
        ({"exp": -25}, 200),  # expired by the issuer's clock, not yet by the leeway
        ({"exp": -35}, 401),
    ],
    ids=lambda value: str(value),
)
async def test_user_tokens_get_thirty_seconds_of_clock_leeway_and_no_more(
    service: Service, offsets: dict[str, int], status: int
) -> None:
    response = await service.client.get(PREFERENCES, headers={"Authorization": f"Bearer {token(**offsets)}"})
    assert response.status_code == status, response.text
