"""Schemathesis over the documented API: no input, valid or hostile, gets a 5xx or an undocumented answer.

The schema is the document ``/openapi.json`` serves (built by the same code; the last test checks they
are equal), loaded at import so every operation is its own test. Each operation gets 25 generated
requests (positive and negative), derandomized so a failure reproduces, against the real service under
uvicorn with the service key: no 5xx, only documented status codes, only documented content types.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from notifier.app import create_app
from tests.conftest import SERVICE_KEY, LiveService, live_service, make_settings

# Hypothesis keeps caches in .hypothesis/ of the working directory; keep them out of the source tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "notifier-hypothesis")
DOCUMENT = create_app(make_settings("sqlite+aiosqlite:///unused.db")).state.openapi
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    database = tmp_path_factory.mktemp("fuzz") / "notifier.db"
    with live_service(make_settings(f"sqlite+aiosqlite:///{database}")) as live:
        yield live


@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_without_5xx_as_documented(case: schemathesis.Case, live_api: LiveService) -> None:
    case.call_and_validate(
        base_url=live_api.url,
        headers={"Authorization": f"Bearer {SERVICE_KEY}"},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance],
    )


async def test_the_fuzzed_document_is_the_one_the_service_serves(live_api: LiveService) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        served = (await client.get(f"{live_api.url}/openapi.json")).json()
    assert served == DOCUMENT
    assert sum(map(len, served["paths"].values())) >= 40  # every route, not a stub
