"""Upstash-Signature against the live service: every forgery is a 401 that stores and changes nothing."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from tests.conftest import SERVICE_KEY
from tests.fakes.base import Fault
from tests.qstash.conftest import Stack, chat_event

EVENT = json.dumps(chat_event()).encode()
Forge = Callable[[Stack, bytes, str], tuple[bytes, dict[str, str]]]


def _signed(**claims: Any) -> Forge:
    """A valid body whose signature was made with ``claims`` overridden."""

    def forge(stack: Stack, body: bytes, url: str) -> tuple[bytes, dict[str, str]]:
        return body, {"Upstash-Signature": stack.emulator.sign(body, url, **claims)}

    return forge


def _tampered(stack: Stack, body: bytes, url: str) -> tuple[bytes, dict[str, str]]:
    signature = stack.emulator.sign(body, url)
    return body + b" ", {"Upstash-Signature": signature}  # still valid JSON, another hash


def _other_url(stack: Stack, body: bytes, url: str) -> tuple[bytes, dict[str, str]]:
    return body, {"Upstash-Signature": stack.emulator.sign(body, url.replace("127.0.0.1", "localhost"))}


def _unsigned(stack: Stack, body: bytes, url: str) -> tuple[bytes, dict[str, str]]:
    return body, {}


def _alg_none(stack: Stack, body: bytes, url: str) -> tuple[bytes, dict[str, str]]:
    valid = jwt.decode(stack.emulator.sign(body, url), options={"verify_signature": False})
    return body, {"Upstash-Signature": jwt.encode(valid, "", algorithm="none")}


def _service_key_instead(stack: Stack, body: bytes, url: str) -> tuple[bytes, dict[str, str]]:
    return body, {"Authorization": f"Bearer {SERVICE_KEY}"}


FORGERIES: dict[str, Forge] = {
    "tampered-body": _tampered,
    "other-url": _other_url,
    "expired": _signed(exp_delta=-60),
    "not-yet-valid": _signed(nbf_delta=60),
    "unknown-key": _signed(key=f"sig_unknown_{secrets.token_hex(16)}"),
    "wrong-iss": _signed(iss="Upstash-Impostor"),
    "no-iss": _signed(iss=None),
    "no-sub": _signed(sub=None),
    "alg-none": _alg_none,
    "missing-header": _unsigned,
}


async def _post(stack: Stack, path: str, forge: Forge, body: bytes, **headers: str) -> Any:
    content, signed = forge(stack, body, stack.url(path))
    return await stack.http.post(
        stack.url(path), content=content, headers={"Content-Type": "application/json", **signed, **headers}
    )


@pytest.mark.parametrize("forgery", list(FORGERIES))
async def test_a_forged_event_is_refused_and_nothing_is_stored(stack: Stack, forgery: str) -> None:
    response = await _post(stack, "/v1/events", FORGERIES[forgery], EVENT, **{"Upstash-Message-Id": "msg_forged"})

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert await stack.events() == []
    assert stack.emulator.requests == []  # nothing was published either


@pytest.mark.parametrize("forgery", [*FORGERIES, "service-key"])
async def test_a_forged_delivery_call_is_refused_and_changes_nothing(stack: Stack, forgery: str) -> None:
    stack.emulator.fail_next(Fault.http(500))  # the publish fails, so the rows wait for us, untouched
    event_id = uuid.UUID((await stack.post_event(chat_event())).json()["event_id"])
    push = await stack.delivery(event_id, "user-1", "push")
    body = json.dumps({"delivery_id": str(push.id)}).encode()
    forge = _service_key_instead if forgery == "service-key" else FORGERIES[forgery]

    attempt = await _post(stack, f"/v1/qstash/deliveries/{push.id}", forge, body)
    callback = await _post(
        stack, "/v1/qstash/failures", forge, json.dumps({"url": stack.delivery_url(push.id)}).encode()
    )
    sweep = await _post(stack, "/v1/qstash/cron/sweep", forge, b'{"job": "notifier-sweep"}')
    retention = await _post(stack, "/v1/qstash/cron/retention", forge, b'{"job": "notifier-retention"}')

    # a forged signature is no credential (401); a valid service key is one outside its scope (403)
    expected = 403 if forgery == "service-key" else 401
    assert [r.status_code for r in (attempt, callback, sweep, retention)] == [expected] * 4
    push = await stack.delivery(event_id, "user-1", "push")
    assert (push.status, push.attempts) == ("queued", 0)
    assert stack.onesignal.requests == []


async def test_a_signature_for_one_delivery_does_not_open_another(stack: Stack) -> None:
    stack.emulator.fail_next(Fault.http(500))
    event_id = uuid.UUID((await stack.post_event(chat_event())).json()["event_id"])
    push = await stack.delivery(event_id, "user-1", "push")
    in_app = await stack.delivery(event_id, "user-1", "in_app")
    body = json.dumps({"delivery_id": str(in_app.id)}).encode()

    response = await stack.http.post(
        stack.delivery_url(push.id),
        content=body,
        headers={"Upstash-Signature": stack.emulator.sign(body, stack.delivery_url(in_app.id))},
    )

    assert response.status_code == 401
    assert {(d.status, d.attempts) for d in await stack.deliveries(event_id)} == {("queued", 0)}


@pytest.mark.parametrize("key", ["current", "next"])
async def test_a_valid_signature_with_either_key_is_accepted(stack: Stack, key: str) -> None:
    signing_key = stack.emulator.current_key if key == "current" else stack.emulator.next_key

    response = await _post(stack, "/v1/events", _signed(key=signing_key), EVENT, **{"Upstash-Message-Id": "msg_ok"})
    await stack.emulator.drain()

    assert response.status_code == 202
    [event] = await stack.events()
    assert (event.source, event.idempotency_key) == ("qstash", "qstash:msg_ok")
    assert {d.status for d in await stack.deliveries(event.id)} == {"sent"}


async def test_a_replay_after_expiry_is_refused(stack: Stack) -> None:
    # exp 3 s ago is inside the verifier's 5 s leeway now, and outside it 3 s later.
    body, headers = _signed(exp_delta=-3)(stack, EVENT, stack.url("/v1/events"))
    headers |= {"Content-Type": "application/json", "Upstash-Message-Id": "msg_replayed"}
    first = await stack.http.post(stack.url("/v1/events"), content=body, headers=headers)
    await stack.emulator.drain()
    await asyncio.sleep(3)

    replay = await stack.http.post(stack.url("/v1/events"), content=body, headers=headers)

    assert (first.status_code, replay.status_code) == (202, 401)
    assert len(await stack.events()) == 1


async def test_one_key_rotation_is_absorbed_and_a_second_breaks_verification(stack: Stack) -> None:
    stack.emulator.rotate_keys()  # current <- next: the service still knows the new current key
    await stack.publish_event(chat_event(conversation="after-one-rotation"))
    await stack.emulator.drain()
    stack.emulator.rotate_keys()  # now signed with a key the deployment has never seen
    message_id = await stack.publish_event(chat_event(conversation="after-two-rotations"), **{"Upstash-Retries": "1"})
    await stack.emulator.drain()

    [event] = await stack.events()
    assert event.data["conversation_id"] == "after-one-rotation"
    refused = stack.emulator.attempts(message_id=message_id)
    assert [a.status for a in refused] == [401, 401]  # the first delivery and its one retry
