"""Every failure the contract lists is problem+json with the right status, and nothing is written."""

from __future__ import annotations

import json

import sqlalchemy as sa

from tests.conftest import Service, booking_event, user_token


def assert_problem(response: object, status: int) -> dict[str, object]:
    assert response.status_code == status
    headers = response.headers
    assert headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert {"type", "title", "status", "detail"} <= set(body)
    return body


async def test_malformed_json_is_400(service: Service) -> None:
    response = await service.client.post(
        "/v1/events", content=b'{"type": ', headers={**service.auth, "content-type": "application/json"}
    )
    assert_problem(response, 400)


async def test_invalid_utf8_is_400(service: Service) -> None:
    response = await service.client.post(
        "/v1/events", content=b'{"type": "\xff"}', headers={**service.auth, "content-type": "application/json"}
    )
    assert "UTF-8" in str(assert_problem(response, 400)["detail"])


async def test_deep_nesting_is_400(service: Service) -> None:
    deep = "[" * 100 + "]" * 100
    response = await service.client.post(
        "/v1/events", content=deep.encode(), headers={**service.auth, "content-type": "application/json"}
    )
    assert_problem(response, 400)


async def test_not_json_is_415(service: Service) -> None:
    response = await service.client.post(
        "/v1/events", content=b"type=x", headers={**service.auth, "content-type": "application/x-www-form-urlencoded"}
    )
    assert_problem(response, 415)


async def test_body_over_the_limit_is_413_with_or_without_content_length(service: Service) -> None:
    limit = service.runtime.settings.max_body_bytes
    big = json.dumps(booking_event(data={"blob": "x" * limit})).encode()
    assert_problem(
        await service.client.post(
            "/v1/events", content=big, headers={**service.auth, "content-type": "application/json"}
        ),
        413,
    )

    async def stream() -> object:
        for _ in range(limit // 1000 + 2):
            yield b" " * 1000

    chunked = await service.client.post(
        "/v1/events",
        content=stream(),
        headers={  # type: ignore[arg-type]
            **service.auth,
            "content-type": "application/json",
        },
    )
    assert "content-length" not in chunked.request.headers
    assert_problem(chunked, 413)


async def test_credentials(service: Service) -> None:
    assert_problem(await service.client.post("/v1/events", json=booking_event()), 401)
    assert_problem(
        await service.client.post("/v1/events", json=booking_event(), headers={"Authorization": "Bearer wrong"}), 401
    )
    unauthorized = await service.client.get("/v1/events")
    assert unauthorized.headers["www-authenticate"].startswith("Bearer")
    # a valid user token outside its scope is 403; an expired one is 401
    assert_problem(
        await service.client.post(
            "/v1/events", json=booking_event(), headers={"Authorization": f"Bearer {user_token('u-1')}"}
        ),
        403,
    )
    expired = user_token("u-1", expires_in=-60)
    assert_problem(await service.client.get("/v1/users/u-1/inbox", headers={"Authorization": f"Bearer {expired}"}), 401)


async def test_unknown_things_are_404(service: Service) -> None:
    assert_problem(await service.get("/v1/events/00000000-0000-0000-0000-000000000000"), 404)
    assert_problem(await service.get("/v1/events/not-a-uuid"), 404)
    assert_problem(await service.get("/v1/users/nobody"), 404)
    assert_problem(await service.get("/v1/nothing-here"), 404)


async def test_a_method_the_path_does_not_serve_is_405_listing_every_one_it_does(service: Service) -> None:
    allowed = {
        "/v1/events": {"GET", "HEAD", "POST"},
        "/v1/users/u-1/preferences": {"GET", "HEAD", "PUT", "PATCH"},
        "/v1/users/u-1": {"GET", "HEAD", "PUT", "DELETE"},
    }
    for path, methods in allowed.items():
        response = await service.client.request(
            "POST" if "POST" not in methods else "DELETE", path, headers=service.auth
        )
        assert_problem(response, 405)
        assert {m.strip() for m in response.headers["allow"].split(",")} == methods, path


async def test_readyz_is_503_when_the_schema_is_not_current(service: Service) -> None:
    assert (await service.client.get("/readyz")).status_code == 200
    engine = service.runtime.engine
    async with engine.begin() as connection:
        head = (await connection.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar_one()
        await connection.execute(sa.text("UPDATE alembic_version SET version_num = 'stale'"))
    try:
        body = assert_problem(await service.client.get("/readyz"), 503)
        assert "notifier migrate" in str(body["detail"])
    finally:  # the PostgreSQL database is shared by the session's tests
        async with engine.begin() as connection:
            await connection.execute(sa.text("UPDATE alembic_version SET version_num = :head"), {"head": head})


async def test_openapi_describes_every_route(service: Service) -> None:
    document = (await service.client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    from notifier.app import API_ROUTES

    for route in API_ROUTES:
        assert route.method.lower() in document["paths"][route.path], route.path
    assert "EventIn" in document["components"]["schemas"]
    docs = await service.client.get("/docs")
    assert docs.status_code == 200
    assert "swagger-ui" in docs.text
    assert (await service.client.get("/docs/static/swagger-ui-bundle.js")).status_code == 200
