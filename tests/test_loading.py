"""``Loader`` makes the same detached, clean objects from plain rows as loading through the ORM and expunging."""

from __future__ import annotations

import sqlalchemy as sa

from notifier.db.loading import Loader
from notifier.db.models import User
from notifier.types import utcnow
from tests.conftest import Sessions

NOW = utcnow()


async def test_a_loaded_row_is_what_the_orm_loads_detached_and_clean(sessions: Sessions) -> None:
    loader = Loader(User)
    async with sessions() as session, session.begin():
        session.add(User(id="u-1", organization_id="org", roles=["GUEST"], email="u@example.com", created_at=NOW))
    async with sessions() as session:
        [row] = (await session.execute(sa.select(*loader.columns))).all()
        through_orm = await session.get(User, "u-1")
        assert through_orm is not None
        session.expunge(through_orm)
    loaded = loader.load(tuple(row))
    ours, theirs = sa.inspect(loaded), sa.inspect(through_orm)
    assert ours.detached
    assert not ours.modified
    assert not ours.expired_attributes
    assert ours.key == theirs.key == (User, ("u-1",), None)
    assert {c.key: getattr(loaded, c.key) for c in loader.columns} == {
        c.key: getattr(through_orm, c.key) for c in loader.columns
    }

    # A change is tracked as on an ORM-loaded object, and attaching the object to a session flushes just that.
    loaded.email = "new@example.com"
    assert ours.modified
    assert ours.attrs.email.history.deleted == ["u@example.com"]
    async with sessions() as session, session.begin():
        session.add(loaded)
    async with sessions() as session:
        stored = await session.get(User, "u-1")
        assert stored is not None
        assert (stored.email, stored.roles) == ("new@example.com", ["GUEST"])


def test_a_copy_holds_the_same_values_and_changes_apart() -> None:
    loader = Loader(User)
    original = loader.load(tuple(f"v{n}" if c.key != "roles" else ["GUEST"] for n, c in enumerate(loader.columns)))
    copy = loader.copy(original)
    assert copy is not original
    assert {c.key: getattr(copy, c.key) for c in loader.columns} == {
        c.key: getattr(original, c.key) for c in loader.columns
    }
    assert sa.inspect(copy).detached
    assert not sa.inspect(copy).modified
    copy.email = "changed@example.com"
    assert original.email != "changed@example.com"
