"""Values that parse but that nothing can hold: digits Python will not read, instants past the end of time, NUL
and lone surrogates PostgreSQL refuses, ids longer than their column, line breaks no email header may carry,
NaN. Each is refused up front, as a 4xx problem naming where it was, with nothing written; none reaches the
database or a provider to fail there (a 500, or a delivery retried for hours).

Every case runs on SQLite and on PostgreSQL (which refuses more: NUL in text and JSONB, NaN in JSONB, a string
longer than its column).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa

from notifier.db.models import (
    Delivery,
    Event,
    InboxMessage,
    OrganizationPreferences,
    PreferenceChange,
    User,
    UserPreferences,
)
from tests.conftest import SERVICE_KEY, Service, booking_event, make_settings, running_service
from tests.security.test_hostile_input import assert_problem

AUTH = {"Authorization": f"Bearer {SERVICE_KEY}"}
END_OF_TIME = "9999-12-31T23:59:59-23:59"  # parses, but is past the last instant Python holds in UTC
BOOKING = {"booking_id": "b-1", "guest_name": "Ann Lee", "property": "Seaview 4", "check_in": "2026-12-01"}
APPROVAL = {"approval_id": "a-1", "title": "Paint the fence", "decision": "approved"}


def booking(**data: Any) -> dict[str, Any]:
    return booking_event(data={**BOOKING, **data})


def raw_event(data_json: str) -> bytes:
    """An event body whose ``data`` is written as raw JSON text (json.dumps cannot write NaN, 5000 digits...)."""
    fields = ", ".join(f'"{k}": "{v}"' for k, v in BOOKING.items())
    return f'{{"type": "booking.confirmed", "recipients": ["user-1"], "data": {{{fields}, {data_json}}}}}'.encode()


def cursor(created_at: str, row_id: Any = "00000000-0000-4000-8000-000000000000") -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, row_id]).encode()).decode().rstrip("=")


@dataclass(frozen=True)
class Case:
    """One hostile request and where its answer must say the problem is (``loc``)."""

    method: str
    path: str
    loc: list[Any]
    json: Any = None
    content: bytes | None = None
    params: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    status: int = 422


CASES: dict[str, Case] = {
    # Numbers and digits Python will not read
    "limit=² (a digit to str.isdigit, not to int)": Case(
        "GET", "/v1/events", ["query", "limit"], params={"limit": "²"}
    ),
    "limit of 5000 digits": Case("GET", "/v1/deliveries", ["query", "limit"], params={"limit": "9" * 5000}),
    "limit of Arabic-Indic digits": Case("GET", "/v1/events", ["query", "limit"], params={"limit": "\u0665\u0660"}),
    "5000-digit integer in data": Case("POST", "/v1/events", ["data", "n"], content=raw_event('"n": ' + "9" * 5000)),
    "5000-digit integer in a preference document": Case(
        "PUT", "/v1/users/u-1/preferences", ["version"], content=b'{"version": ' + b"1" * 5000 + b"}"
    ),
    "NaN in data": Case("POST", "/v1/events", ["data", "score"], content=raw_event('"score": NaN')),
    "-Infinity in data": Case("POST", "/v1/events", ["data", "x", 0], content=raw_event('"x": [-Infinity]')),
    "1e400 in data (a float overflows to inf)": Case(
        "POST", "/v1/events", ["data", "x"], content=raw_event('"x": 1e400')
    ),
    # Instants past the end of time
    "send_at at the end of time": Case("POST", "/v1/events", ["send_at"], json=booking_event(send_at=END_OF_TIME)),
    "send_at before the start of time": Case(
        "POST", "/v1/events", ["send_at"], json=booking_event(send_at="0001-01-01T00:00:00+00:01")
    ),
    "muted_until at the end of time": Case(
        "PUT", "/v1/users/u-1/preferences", ["muted_until"], json={"muted_until": END_OF_TIME}
    ),
    "muted_until at the end of time, merge patch": Case(
        "PATCH",
        "/v1/users/u-1/preferences",
        ["muted_until"],
        json={"muted_until": END_OF_TIME},
        content_type="application/merge-patch+json",
    ),
    "since at the end of time (events)": Case("GET", "/v1/events", ["query", "since"], params={"since": END_OF_TIME}),
    "since at the end of time (deliveries)": Case(
        "GET", "/v1/deliveries", ["query", "since"], params={"since": END_OF_TIME}
    ),
    "a cursor at the end of time": Case(
        "GET", "/v1/events", ["query", "cursor"], params={"cursor": cursor(END_OF_TIME)}
    ),
    "a cursor whose id is a number": Case(
        "GET", "/v1/deliveries", ["query", "cursor"], params={"cursor": cursor("2026-01-01T00:00:00+00:00", 5)}
    ),
    # NUL and lone surrogates (PostgreSQL text and JSONB refuse NUL; no encoder takes a lone surrogate)
    "NUL in data": Case("POST", "/v1/events", ["data", "guest_name"], json=booking(guest_name="Ann\u0000")),
    "NUL in a key of data": Case("POST", "/v1/events", ["data", "x\u0000"], json=booking(**{"x\u0000": 1})),
    "NUL in idempotency_key": Case(
        "POST", "/v1/events", ["idempotency_key"], json=booking_event(idempotency_key="k\u0000")
    ),
    "NUL in a role": Case("PUT", "/v1/users/u-1", ["roles", 0], json={"roles": ["ADMIN\u0000"]}),
    "NUL in an email address": Case("PUT", "/v1/users/u-1", ["email"], json={"email": "ann\u0000@example.com"}),
    "NUL in a preference category": Case(
        "PUT", "/v1/users/u-1/preferences", ["categories", "chat\u0000"], json={"categories": {"chat\u0000": {}}}
    ),
    "lone surrogate in data": Case(
        "POST", "/v1/events", ["data", "guest_name"], content=raw_event('"guest_name": "Ann \\ud800"')
    ),
    "lone surrogate in a preview": Case(
        "POST", "/v1/events/preview", ["data", "guest_name"], content=raw_event('"guest_name": "\\udfff"')
    ),
    # Ids: the path, the query, and data that becomes a user id
    "GET /v1/users/%00": Case("GET", "/v1/users/%00", ["path", "user_id"]),
    "PUT /v1/users/%00": Case("PUT", "/v1/users/%00", ["path", "user_id"], json={"name": "Ann"}),
    "a 201-character user id in the path": Case("DELETE", "/v1/users/" + "u" * 201, ["path", "user_id"]),
    "NUL in an inbox path": Case("GET", "/v1/users/%00/inbox", ["path", "user_id"]),
    "NUL in read-all": Case("POST", "/v1/users/u%00/inbox/read-all", ["path", "user_id"]),
    "NUL in a preferences path": Case("PUT", "/v1/users/%00/preferences", ["path", "user_id"], json={}),
    "NUL in an organization path": Case(
        "PUT", "/v1/organizations/%00/preferences", ["path", "organization_id"], json={}
    ),
    "NUL in the type filter": Case("GET", "/v1/events", ["query", "type"], params={"type": "booking\u0000"}),
    "NUL in the user_id filter": Case("GET", "/v1/deliveries", ["query", "user_id"], params={"user_id": "\u0000"}),
    "a 300-character requester_id (becomes the recipient's id)": Case(
        "POST",
        "/v1/events",
        ["data", "requester_id"],
        json={"type": "approval.responded", "data": {**APPROVAL, "requester_id": "r" * 300}},
    ),
    "a requester_id that is an object": Case(
        "POST",
        "/v1/events",
        ["data", "requester_id"],
        json={"type": "approval.responded", "data": {**APPROVAL, "requester_id": {"id": "u-1"}}},
    ),
    "a requester_id with a line feed": Case(
        "POST",
        "/v1/events",
        ["data", "requester_id"],
        json={"type": "approval.responded", "data": {**APPROVAL, "requester_id": "u-1\n"}},
    ),
    # Other values that become a column
    "a 40-character locale (the column holds 35)": Case(
        "PUT", "/v1/users/u-1", ["locale"], json={"locale": "en" + "-abcdefgh" * 4}
    ),
    "a conversation id too long for a digest key": Case(
        "POST",
        "/v1/events",
        ["data", "conversation_id"],
        json={
            "type": "chat.message.offline",
            "recipients": ["u-1"],
            "data": {"conversation_id": "c" * 300, "sender_name": "Bob", "preview": "hi"},
        },
    ),
    "a booking id too long for the action URL": Case(
        "POST", "/v1/events", ["data", "booking_id"], json=booking(booking_id="b" * 2000)
    ),
    # `$` lets a trailing newline through
    "a quiet-hours time with a trailing newline": Case(
        "PUT",
        "/v1/users/u-1/preferences",
        ["quiet_hours", "start"],
        json={"quiet_hours": {"start": "22:00\n", "end": "07:00"}},
    ),
    "a quiet-hours time in Arabic-Indic digits": Case(
        "PUT",
        "/v1/users/u-1/preferences",
        ["quiet_hours", "end"],
        json={"quiet_hours": {"start": "22:00", "end": "0\u0667:0\u0660"}},
    ),
    "an email with a trailing newline": Case("PUT", "/v1/users/u-1", ["email"], json={"email": "ann@example.com\n"}),
    "an inline email with a trailing newline": Case(
        "POST",
        "/v1/events",
        ["recipients", 0, "email"],
        json=booking_event(recipients=[{"id": "u-1", "email": "ann@example.com\n"}]),
    ),
    # Line breaks an email header refuses besides CR/LF (str.splitlines): a subject or a recipient's name
    "U+2028 in data rendered into the email subject": Case(
        "POST", "/v1/events", ["data", "property"], json=booking(property="Seaview\u20284")
    ),
    "U+0085 in data rendered into the email subject": Case(
        "POST", "/v1/events", ["data", "property"], json=booking(property="Seaview\x854")
    ),
    "a vertical tab in data rendered into the email subject": Case(
        "POST", "/v1/events", ["data", "property"], json=booking(property="Seaview\x0b4")
    ),
    "U+2029 in an inline recipient name": Case(
        "POST",
        "/v1/events",
        ["recipients", 0, "name"],
        json=booking_event(recipients=[{"id": "u-1", "email": "ann@example.com", "name": "Ann\u2029Lee"}]),
    ),
    "U+0085 in a profile name": Case("PUT", "/v1/users/u-1", ["name"], json={"name": "Ann\x85Lee"}),
}
TABLES = (Event, Delivery, User, UserPreferences, OrganizationPreferences, PreferenceChange, InboxMessage)


@pytest.fixture
async def client(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    """The service with a client that raises whatever escapes the app: a 500 must be an answer, not a raise."""
    transport = httpx.ASGITransport(app=service.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://notifier.test", headers=AUTH) as http:
        yield http


async def row_counts(service: Service) -> dict[str, int]:
    async with service.runtime.sessions() as session:
        return {
            table.__name__: (await session.execute(sa.select(sa.func.count()).select_from(table))).scalar_one()
            for table in TABLES
        }


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_a_value_nothing_can_hold_is_refused_naming_where_it_is(
    service: Service, client: httpx.AsyncClient, case: Case
) -> None:
    response = await client.request(
        case.method,
        case.path,
        params=case.params,
        json=case.json if case.content is None else None,
        content=case.content,
        headers={"Content-Type": case.content_type} if case.method in ("POST", "PUT", "PATCH") else {},
    )
    body = assert_problem(response, case.status)
    assert case.loc in [error["loc"] for error in body["errors"]], body
    assert set((await row_counts(service)).values()) == {0}, "something was written"


async def test_every_bad_value_of_a_body_is_listed_at_once(client: httpx.AsyncClient) -> None:
    content = raw_event('"a": NaN, "b": "x\\u0000", "c": [1e999, "\\ud83d"], "d": ' + "7" * 4301)
    body = assert_problem(
        await client.post("/v1/events", content=content, headers={"Content-Type": "application/json"}), 422
    )
    assert [e["loc"] for e in body["errors"]] == [
        ["data", "a"],
        ["data", "b"],
        ["data", "c", 0],
        ["data", "c", 1],
        ["data", "d"],
    ]


async def test_the_largest_readable_integer_and_a_finite_float_are_stored(
    service: Service, client: httpx.AsyncClient
) -> None:
    content = raw_event('"n": ' + "9" * 4300 + ', "f": 1.7976931348623157e308, "tiny": 1e-400')
    accepted = await client.post("/v1/events", content=content, headers={"Content-Type": "application/json"})
    assert accepted.status_code == 202, accepted.text
    stored = (await client.get(f"/v1/events/{accepted.json()['event_id']}")).json()["data"]
    # PostgreSQL's JSONB keeps the number's decimal digits, and writes a float this large as an integer
    assert (stored["n"], float(stored["f"]), stored["tiny"]) == (int("9" * 4300), 1.7976931348623157e308, 0.0)


@pytest.mark.parametrize(
    "cookie",
    [
        "².nonce.mac",  # "²".isdigit() is True, int("²") raises
        "1" * 4301 + ".nonce.mac",  # int() refuses more than 4300 digits
        "9999999999.nonce.é",  # hmac.compare_digest refuses non-ASCII text
    ],
    ids=["superscript-digit expiry", "4301-digit expiry", "non-ASCII signature"],
)
async def test_a_malformed_dashboard_cookie_is_no_credential(client: httpx.AsyncClient, cookie: str) -> None:
    # Headers travel as Latin-1: the cookie reaches the service exactly as written here.
    headers = {"Cookie": f"notifier_dashboard={cookie}".encode("latin-1")}
    del client.headers["Authorization"]
    assert_problem(await client.get("/dashboard", headers=headers), 401)
    redirected = await client.get("/dashboard", headers={**headers, "Accept": "text/html"})
    assert redirected.status_code == 303


@pytest.mark.parametrize("ticket", ["².user.mac", "1" * 4301 + ".dXNlcg.mac", "9999999999.dXNlcg.é"])
async def test_a_malformed_demo_ticket_is_no_credential(client: httpx.AsyncClient, ticket: str) -> None:
    del client.headers["Authorization"]
    response = await client.post("/inbox-demo/send", data={"ticket": ticket})
    assert_problem(response, 401)


async def test_a_non_ascii_csrf_token_is_refused_not_crashed_on(client: httpx.AsyncClient) -> None:
    del client.headers["Authorization"]
    signed_in = await client.post("/dashboard/login", data={"key": SERVICE_KEY})
    assert signed_in.status_code == 303
    response = await client.post("/dashboard/logout", data={"csrf": "é"})
    assert_problem(response, 403)


async def test_a_next_with_a_trailing_newline_goes_to_the_dashboard(client: httpx.AsyncClient) -> None:
    del client.headers["Authorization"]
    signed_in = await client.post("/dashboard/login", data={"key": SERVICE_KEY, "next": "/dashboard/deliveries\n"})
    assert (signed_in.status_code, signed_in.headers["location"]) == (303, "/dashboard")


async def test_a_content_length_of_non_ascii_digits_is_not_trusted(client: httpx.AsyncClient) -> None:
    # uvicorn refuses such a header before the app sees it; another server may not.
    headers = {"Content-Type": "application/json", "Content-Length": "²".encode("latin-1")}
    response = await client.post("/v1/events", content=json.dumps(booking_event()).encode(), headers=headers)
    assert response.status_code < 500, response.text


def _qstash_signature(body: bytes, url: str, key: str) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode().rstrip("=")
    now = int(time.time())
    claims = {"iss": "Upstash", "sub": url, "exp": now + 60, "nbf": now - 1, "body": digest, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, key, algorithm="HS256")


@pytest.mark.parametrize("message_id", ["m" * 201, "msg\u0000", "msg\x85"], ids=["201 characters", "NUL", "U+0085"])
async def test_a_qstash_message_id_nothing_can_store_is_refused(database_url: str, message_id: str) -> None:
    key = "sig_current_0123456789abcdef0123456789"
    settings = make_settings(database_url, public_url="http://notifier.test", qstash_current_signing_key=key)
    async with running_service(settings) as svc:
        body = json.dumps(booking_event()).encode()
        headers = {
            "Content-Type": "application/json",
            "Upstash-Signature": _qstash_signature(body, "http://notifier.test/v1/events", key),
            "Upstash-Message-Id": message_id.encode("latin-1"),
        }
        transport = httpx.ASGITransport(app=svc.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://notifier.test") as http:
            body_out = assert_problem(await http.post("/v1/events", content=body, headers=headers), 422)
        assert ["header", "Upstash-Message-Id"] in [e["loc"] for e in body_out["errors"]]
        assert set((await row_counts(svc)).values()) == {0}
