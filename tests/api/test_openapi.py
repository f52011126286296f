"""/openapi.json is a valid document of the OpenAPI version it declares.

The meta-schemas are the official ones schemathesis (a dev dependency) bundles; the JSON Schema validator is its
dependency jsonschema_rs. The OpenAPI 3.1 meta-schema does not descend into Schema Objects (they are JSON Schema
2020-12), so each component schema is also checked against that dialect.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema_rs
import pytest
from schemathesis.specs.openapi import definitions

from notifier.app import create_app
from tests.conftest import make_settings

VALIDATORS = {"3.0": "OPENAPI_30_VALIDATOR", "3.1": "OPENAPI_31_VALIDATOR", "3.2": "OPENAPI_32_VALIDATOR"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    built: dict[str, Any] = create_app(make_settings("sqlite+aiosqlite:///unused.db")).state.openapi
    return built


def test_the_document_is_valid_for_the_openapi_version_it_declares(document: dict[str, Any]) -> None:
    version = re.fullmatch(r"(3\.[0-9]+)\.[0-9]+", document["openapi"])
    assert version, document["openapi"]
    validator = getattr(definitions, VALIDATORS[version.group(1)])
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message[:200]}" for e in validator.iter_errors(document)]
    assert errors == []


def test_every_component_schema_is_valid_json_schema_2020_12(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")  # 3.1's default dialect; a 3.0 document has its own subset
    for name, schema in document["components"]["schemas"].items():
        jsonschema_rs.meta.validate(schema)  # raises ValidationError naming the bad keyword
        assert "$schema" not in schema, name  # the document's dialect applies


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    references = set(re.findall(r'"\$ref": ?"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert references
    assert references <= set(document["components"]["schemas"])
