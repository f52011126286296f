"""Create the workload's users and preferences through notifier's own API (``PUT /v1/users/...``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx

from bench.services import API_KEY
from bench.workload import User


async def _create(base_url: str, users: Sequence[User], concurrency: int) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:

        async def one(user: User) -> None:
            async with slots:
                reply = await client.put(f"/v1/users/{user.id}", json=user.profile)
                if reply.status_code not in (200, 201):
                    raise RuntimeError(f"PUT /v1/users/{user.id}: {reply.status_code} {reply.text[:300]}")
                if user.preferences is not None:
                    reply = await client.put(f"/v1/users/{user.id}/preferences", json=user.preferences)
                    if reply.status_code not in (200, 201):
                        raise RuntimeError(f"PUT preferences of {user.id}: {reply.status_code} {reply.text[:300]}")

        await asyncio.gather(*(one(u) for u in users))


def create_people(base_url: str, users: Sequence[User], *, concurrency: int = 16) -> None:
    asyncio.run(_create(base_url, users, concurrency))
