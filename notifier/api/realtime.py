"""Realtime credentials for the inbox component: a signed Ably token request for the user's own channel.

Each new inbox message is published on Ably channel ``notifications:{user_id}``. A browser showing that
user's inbox gets, from this route, a *token request* signed with the service's Ably key (no network
call): the browser posts it to Ably (``token_url``) and receives a short-lived token whose only
capability is ``subscribe`` on that one channel, with the user id as its client id. It then streams the
channel with ``EventSource`` (``sse_url`` plus ``&accessToken=<token>``). The Ably key never leaves the
service. Only the user's own JWT may ask: a service key never needs a subscribe token for a user.

Without Ably, or for a user id Ably would read as a wildcard (``*``) or that would split the SSE
``channels`` list (``,``), the answer is ``{"mode": "polling"}`` and the component polls the unread count.
"""

from __future__ import annotations

import datetime as dt

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifier.api.common import ApiRoute, runtime_of
from notifier.channels.in_app import realtime_channel_for

# A token request goes straight to the browser that asked for it; no cache may keep or share it.
NO_STORE = {"Cache-Control": "no-store"}
UNSAFE_IN_CHANNEL_NAMES = ("*", ",")


async def realtime_token(request: Request) -> Response:
    """Answer the component's realtime mode: Ably with a signed subscribe-only token request, or polling."""
    user_id: str = request.path_params["user_id"]
    runtime = runtime_of(request)
    realtime = runtime.realtime
    if realtime is None:
        return JSONResponse({"mode": "polling", "reason": "realtime (Ably) is not configured"}, headers=NO_STORE)
    if any(character in user_id for character in UNSAFE_IN_CHANNEL_NAMES):
        # In a capability a trailing '*' is a wildcard over other channels; a ',' would split the SSE channel list.
        reason = "this user id cannot be streamed safely (it contains '*' or ',')"
        return JSONResponse({"mode": "polling", "reason": reason}, headers=NO_STORE)
    channel = realtime_channel_for(user_id)
    ttl = dt.timedelta(seconds=runtime.settings.realtime_token_ttl_seconds)
    token_request = await realtime.subscribe_token_request(channel_name=channel, client_id=user_id, ttl=ttl)
    body = {
        "mode": "ably",
        "channel": channel,
        "token_request": token_request,
        "token_url": realtime.token_url,
        "sse_url": realtime.sse_url(channel),
        "ttl_seconds": int(ttl.total_seconds()),
    }
    return JSONResponse(body, headers=NO_STORE)


ROUTES = [
    ApiRoute(
        "POST",
        "/v1/users/{user_id}/inbox/realtime-token",
        realtime_token,
        "A signed Ably token request to subscribe to the user's own inbox channel (or: poll)",
        "user",
        responses={200: '{"mode": "ably", token_request, token_url, sse_url, ...} or {"mode": "polling"}'},
        tag="inbox",
    ),
]
