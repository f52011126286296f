"""User profiles: upserted by producers, erased on request (profile, preferences and inbox)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlmodel import col
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifier import store
from notifier.api.common import ApiRoute, read_json, require_service, runtime_of
from notifier.errors import NotFound
from notifier.ingest import ProfileIn
from notifier.models import InboxMessage, PreferenceChange, User, utcnow
from notifier.validation import parse_model


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


def _user_id(request: Request) -> str:
    user_id: str = request.path_params["user_id"]
    if not user_id or len(user_id) > 200:
        raise NotFound("user not found")
    return user_id


async def put_user(request: Request) -> Response:
    require_service(request)
    user_id = _user_id(request)
    profile = parse_model(ProfileIn, await read_json(request))
    async with runtime_of(request).sessions() as session, session.begin():
        existed = await session.get(User, user_id) is not None
        await store.upsert_users(
            session, profiles=[{"id": user_id, **profile.model_dump(exclude_unset=True)}], now=utcnow()
        )
    async with runtime_of(request).sessions() as session:
        user = await session.get(User, user_id)
        assert user is not None
        return JSONResponse(user_public(user), status_code=200 if existed else 201)


async def get_user(request: Request) -> Response:
    require_service(request)
    user_id = _user_id(request)
    async with runtime_of(request).sessions() as session:
        user = await session.get(User, user_id)
    if user is None:
        raise NotFound(f"user '{user_id}' not found")
    return JSONResponse(user_public(user))


async def delete_user(request: Request) -> Response:
    require_service(request)
    user_id = _user_id(request)
    async with runtime_of(request).sessions() as session, session.begin():
        user = await session.get(User, user_id)
        if user is None:
            raise NotFound(f"user '{user_id}' not found")
        await session.execute(sa.delete(InboxMessage).where(col(InboxMessage.user_id) == user_id))
        # The preference history holds the user's documents: erase it with them.
        await session.execute(
            sa.delete(PreferenceChange).where(
                col(PreferenceChange.subject_kind) == "user", col(PreferenceChange.subject_id) == user_id
            )
        )
        await session.delete(user)  # preferences go with it (ON DELETE CASCADE)
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
