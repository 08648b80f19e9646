"""The OpenAPI document states the API's rules in a form every client reads (docs/api.md): checked here without a
server; tests/test_fuzz.py checks with one that what the document allows, the API accepts."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from ledger_service.api.app import create_app
from ledger_service.api.bodies import openapi_pattern
from ledger_service.api.params import INSTANT_OPENAPI_PATTERN, KEY_OPENAPI_PATTERN, NAME_OPENAPI_PATTERN
from ledger_service.settings import Settings


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    app = create_app(Settings.from_env({"LEDGER_DATABASE_URL": "postgresql://unused@/unused"}))  # no database use
    return app.openapi_schema.to_schema()


def walk(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


def test_patterns_are_ecma_262(document: dict[str, Any]) -> None:
    """Anchored with ^ and $, no Python-only escapes (\\A, \\Z, \\U): what JSON Schema, Go and JS read."""
    patterns = [node["pattern"] for node in walk(document) if isinstance(node.get("pattern"), str)]
    assert patterns
    for pattern in patterns:
        assert pattern.startswith("^"), pattern
        assert pattern.endswith("$"), pattern
        assert not re.search(r"\\[AZUxu]", pattern), pattern
        re.compile(pattern)


def test_every_v1_parameter_is_constrained(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []) if path.startswith("/v1") else []:
                schema = parameter["schema"]
                assert "oneOf" not in schema, (method, path, parameter["name"])
                constrained = schema.get("type") == "integer" and "minimum" in schema and "maximum" in schema
                assert constrained or "enum" in schema or "pattern" in schema, (method, path, parameter["name"])


def test_request_bodies_are_closed_and_integer_bounds_exact(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name, schema in schemas.items():
        if name.endswith("Command") or name == "BatchOperation":
            assert schema["additionalProperties"] is False, name
    for node in walk(document):
        for bound in ("minimum", "maximum"):
            assert not isinstance(node.get(bound), float), node  # 2^63-1 as a float rounds above it


@pytest.mark.parametrize(
    ("pattern", "value", "allowed"),
    [
        (KEY_OPENAPI_PATTERN, "fuzz-hold:1.a_b", True),
        (KEY_OPENAPI_PATTERN, "a/b", False),
        (NAME_OPENAPI_PATTERN, "gpt-4o/mini", True),
        (NAME_OPENAPI_PATTERN, "gpt\u200b4o", False),
        (NAME_OPENAPI_PATTERN, "a\U000110bdb", False),
        (INSTANT_OPENAPI_PATTERN, "2026-03-01T00:00:00.123456+01:00", True),
        (INSTANT_OPENAPI_PATTERN, "0000-03-01T00:00:00Z", False),
        (INSTANT_OPENAPI_PATTERN, "2026-13-01T00:00:00Z", False),
        (openapi_pattern(r"\A[^\x00]*\Z"), "line\nbreak", True),
        (openapi_pattern(r"\A[^\x00]*\Z"), "nul\x00", False),
    ],
)
def test_openapi_patterns(pattern: str, value: str, allowed: bool) -> None:
    assert (re.fullmatch(pattern[1:-1], value) is not None) is allowed
