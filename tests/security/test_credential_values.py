"""Credential parts the database keeps (a QStash signature's ``jti``, remembered so that it cannot be replayed):
one that no column can hold, or that a log line could not show, makes the credential no credential (401), on
SQLite and PostgreSQL alike; it never reaches the database to fail there as a 500."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import time

import httpx
import jwt
import pytest
import sqlalchemy as sa

from notifier.db.models import RevokedCredential
from notifier.logs import JsonFormatter
from tests.conftest import booking_event, make_settings, running_service
from tests.security.test_hostile_input import assert_problem
from tests.security.test_hostile_values import row_counts

KEY = "sig_current_0123456789abcdef0123456789"
URL = "http://notifier.test/v1/events"


def _signature(body: bytes, jti: str) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode().rstrip("=")
    now = int(time.time())
    claims = {"iss": "Upstash", "sub": URL, "exp": now + 60, "nbf": now - 1, "body": digest, "jti": jti}
    return jwt.encode(claims, KEY, algorithm="HS256")


@pytest.mark.parametrize(
    "jti",
    ["jwt_\x00abc", "jwt_\ud800abc", "jwt_\x85abc", "jwt_\u2028abc", "", "j" * 201],
    ids=["NUL", "lone surrogate", "U+0085", "U+2028", "empty", "201 characters"],
)
async def test_a_qstash_signature_whose_jti_cannot_be_kept_is_no_credential(database_url: str, jti: str) -> None:
    settings = make_settings(database_url, public_url="http://notifier.test", qstash_current_signing_key=KEY)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    try:
        async with running_service(settings) as svc:
            body = json.dumps(booking_event()).encode()
            headers = {"Content-Type": "application/json", "Upstash-Signature": _signature(body, jti)}
            transport = httpx.ASGITransport(app=svc.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://notifier.test") as http:
                assert_problem(await http.post("/v1/events", content=body, headers=headers), 401)
            assert set((await row_counts(svc)).values()) == {0}
            async with svc.runtime.sessions() as session:
                kept = await session.execute(sa.select(sa.func.count()).select_from(RevokedCredential))
            assert kept.scalar_one() == 0
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert not [line for line in lines if line["level"] == "error"], lines
    if jti:
        assert jti not in stream.getvalue()
        assert json.dumps(jti)[1:-1] not in stream.getvalue()  # nor escaped, as a JSON log line would carry it
