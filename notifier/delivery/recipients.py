"""What routing needs to know about recipients, loaded from the database: their profiles, their preference
documents and the defaults of the organization that applies to each (their own, else the event's).

Ingest plans with it, and so does the fallback planner, so a fallback is decided on the same facts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from notifier.catalog import Catalog
from notifier.db import driver, preferences, users
from notifier.preferences.document import PreferenceDocument, load_stored
from notifier.routing import Profile


@dataclass(frozen=True)
class Recipients:
    """The stored facts about some recipients, as routing reads them."""

    profiles: dict[str, Profile]  # the users that exist, by id
    preferences: dict[str, PreferenceDocument]  # by user id, for users with a document
    organization_preferences: dict[str, PreferenceDocument]  # by organization id, for those with a document
    checked_organizations: frozenset[str] = frozenset()  # looked up, found or not


async def load_recipients(
    session: driver.Target, *, user_ids: Iterable[str], event_organization_id: str | None, catalog: Catalog
) -> Recipients:
    """Load the users among ``user_ids`` that exist, their documents and their organizations' (one query).

    Users that do not exist are absent from the result, and so is their organization (the event's).
    """
    stored = await users.recipients(session, user_ids=user_ids, event_organization_id=event_organization_id)
    profiles: dict[str, Profile] = {}
    documents: dict[str, PreferenceDocument] = {}
    organizations: dict[str, PreferenceDocument] = {}
    checked: set[str] = set()
    for row in stored.values():
        profiles[row.id] = Profile(
            id=row.id, organization_id=row.organization_id, email=row.email, locale=row.locale, timezone=row.timezone
        )
        if row.document is not None:
            documents[row.id] = load_stored(row.document, catalog)
        applied = row.organization_id or event_organization_id
        if applied and applied not in checked:
            checked.add(applied)
            if row.organization_document is not None:
                organizations[applied] = load_stored(row.organization_document, catalog)
    return Recipients(profiles, documents, organizations, frozenset(checked))


async def load_organization_preferences(
    session: driver.Target, *, organization_ids: Iterable[str], catalog: Catalog
) -> dict[str, PreferenceDocument]:
    """The default documents of these organizations that have one, parsed, by organization id."""
    stored = await preferences.organization_documents(session, organization_ids=organization_ids)
    return {organization_id: load_stored(document, catalog) for organization_id, document in stored.items()}
