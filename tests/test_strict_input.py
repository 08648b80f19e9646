"""Strict input (hostile review, issue 14): bytes that are not UTF-8, duplicate JSON keys, repeated query parameters
and headers, invisible characters in names, loose instants and loose ratio strings are refused with 400 and change
nothing; none is a 500."""

from __future__ import annotations

import pytest

from tests.support import LedgerClient, assert_problem, db_state
from tests.test_validation import ENDPOINTS, SETTLE, Endpoint, assert_same_state, dumps, send, world

__all__ = ["world"]  # the fixture, imported so that pytest finds it here

BATCH = Endpoint(
    "batch",
    "POST",
    "/v1/batch",
    "relay",
    {"operations": [{"op": "settle", "request_id": "open-hold-1", "body": SETTLE.body}]},
    ("operations",),
)
REVERSE = Endpoint(
    "reverse", "POST", "/v1/entries/1/reverse", "admin", {"reference": "strict-reversal"}, ("reference",)
)
BODY_ROUTES = (*ENDPOINTS, BATCH, REVERSE)
"""Every route that takes a body (test_validation checks that there are no others)."""


async def refused_everywhere(ledger: LedgerClient, bodies: dict[str, bytes]) -> None:
    """POST or PUT each route's body; every one must be a 400 validation_error problem and write nothing."""
    before = await db_state(ledger)
    failures = []
    for endpoint in BODY_ROUTES:
        response = await send(ledger, endpoint.method, endpoint.path, bodies[endpoint.name], endpoint.role)
        if response.status_code != 400 or response.json().get("code") != "validation_error":
            failures.append(f"{endpoint.name}: {response.status_code} {response.text[:200]}")
    assert failures == []
    assert_same_state(before, await db_state(ledger))


# Item 6: bodies that are not UTF-8 -------------------------------------------------------------------------------


LATIN1 = b'"caf\xe9"'
"""A Latin-1 é inside a JSON string: not UTF-8."""


def string_field(endpoint: Endpoint) -> str | None:
    return next((field for field, value in endpoint.body.items() if isinstance(value, str)), None)


@pytest.mark.parametrize("where", ["key", "value"])
async def test_a_body_that_is_not_utf8_is_refused_on_every_route(world: LedgerClient, where: str) -> None:
    bodies = {}
    for endpoint in BODY_ROUTES:
        field = string_field(endpoint)
        if where == "value" and field is not None:
            bodies[endpoint.name] = dumps({**endpoint.body, field: "caf"}).replace(b'"caf"', LATIN1)
        else:  # a field name that is not UTF-8 (the only string some bodies have)
            bodies[endpoint.name] = dumps({**endpoint.body, "caf": 1}).replace(b'"caf"', LATIN1)
    await refused_everywhere(world, bodies)
    response = await send(world, "POST", "/v1/topups", b'{"user_id": 1, "amount": 5, "reference": "caf\xe9"}', "admin")
    assert_problem(response, 400, "validation_error")
    assert "UTF-8" in response.json()["detail"]
