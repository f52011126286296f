"""User profiles: upserted by producers, erased on request (profile, preferences and inbox)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifier.api.common import ApiRoute, collect, collect_json, path_id, refuse_if, runtime_of
from notifier.db import users
from notifier.db.models import User
from notifier.errors import FieldError, NotFound
from notifier.ingest.schemas import ProfileIn, parse_model
from notifier.types import utcnow


def user_public(user: User) -> dict[str, object]:
    return {
        "id": user.id,
        "organization_id": user.organization_id,
        "roles": user.roles,
        "email": user.email,
        "name": user.name,
        "locale": user.locale,
        "timezone": user.timezone,
        "created_at": user.created_at.isoformat(),
        "updated_at": user.updated_at.isoformat(),
    }


async def put_user(request: Request) -> Response:
    errors: list[FieldError] = []
    user_id = collect(errors, lambda: path_id(request, "user_id"), "")
    profile = await collect_json(errors, request, lambda raw: parse_model(ProfileIn, raw), ProfileIn())
    refuse_if(errors)
    async with runtime_of(request).sessions() as session, session.begin():
        user, created = await users.put(
            session, user_id=user_id, fields=profile.model_dump(exclude_unset=True), now=utcnow()
        )
    return JSONResponse(user_public(user), status_code=201 if created else 200)


async def get_user(request: Request) -> Response:
    user_id = path_id(request, "user_id")
    async with runtime_of(request).sessions() as session:
        user = await users.get(session, user_id)
    if user is None:
        raise NotFound(f"user '{user_id}' not found")
    return JSONResponse(user_public(user))


async def delete_user(request: Request) -> Response:
    user_id = path_id(request, "user_id")
    async with runtime_of(request).sessions() as session, session.begin():
        if not await users.erase(session, user_id=user_id):
            raise NotFound(f"user '{user_id}' not found")  # the transaction rolls back: nothing was erased
    return Response(status_code=204)


ROUTES = [
    ApiRoute(
        "PUT",
        "/v1/users/{user_id}",
        put_user,
        "Create or update a user profile",
        "service",
        body=ProfileIn,
        responses={200: "Updated", 201: "Created"},
        tag="users",
    ),
    ApiRoute(
        "GET", "/v1/users/{user_id}", get_user, "A user profile", "service", responses={200: "The user"}, tag="users"
    ),
    ApiRoute(
        "DELETE",
        "/v1/users/{user_id}",
        delete_user,
        "Erase a user's profile, preferences and inbox",
        "service",
        responses={204: "Erased"},
        tag="users",
    ),
]
