"""Bad input gets a 4xx problem response and changes nothing; no request gets a 500 (contract sections 4, 5, 8).

Every writing endpoint has a valid base body (checked to succeed in `test_base_bodies_are_valid`); each bad case
breaks exactly one thing about it, so a case that is wrongly accepted would really write something. After the bad
request the database must be exactly as it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest
from litestar.routes import HTTPRoute

from ledger_service.api.app import create_app
from ledger_service.api.bodies import StrictBody
from ledger_service.settings import Settings
from tests.support import LedgerClient, assert_problem, db_state

MAX_ID = 2**63 - 1
MAX_AMOUNT = 10**15
KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"

OPEN_HOLD = "open-hold-1"
"""An open hold the settle cases aim at: a settle that slipped through would write an entry."""
REFUND_HOLD = "open-hold-2"
"""An open hold the refund cases aim at."""
NEW_TOKEN = 2
"""The token the PUT /v1/tokens cases would create."""


# Helpers ---------------------------------------------------------------------------------------------------------


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    changed = {name: (before[name], after[name]) for name in before if before[name] != after[name]}
    assert changed == {}, f"a refused request wrote to the database: {changed}"


async def send(ledger: LedgerClient, method: str, path: str, content: bytes | None, role: str | None) -> httpx.Response:
    headers = ledger.headers(role)
    if content is not None:
        headers["Content-Type"] = "application/json"
    return await ledger.client.request(method, path, content=content, headers=headers)


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


# The writing endpoints and their valid base bodies ---------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str
    role: str
    body: dict[str, Any]
    required: tuple[str, ...]
    body_optional: bool = False
    """The whole body may be left out (refund)."""


HOLD = Endpoint(
    "holds",
    "POST",
    "/v1/holds",
    "relay",
    {
        "request_id": "valid-hold",
        "user_id": 1,
        "token_id": 1,
        "group": "default",
        "model": "gpt-4o",
        "prompt_tokens": 10,
        "max_tokens": 10,
        "amount": 100,
        "expires_in": 600,
    },
    ("request_id", "user_id", "token_id", "model", "prompt_tokens"),
)
SETTLE = Endpoint(
    "settle",
    "POST",
    f"/v1/holds/{OPEN_HOLD}/settle",
    "relay",
    {"channel_id": 1, "prompt_tokens": 10, "completion_tokens": 10, "quota": 50},
    ("channel_id", "prompt_tokens", "completion_tokens"),
)
REFUND = Endpoint(
    "refund",
    "POST",
    f"/v1/holds/{REFUND_HOLD}/refund",
    "relay",
    {"reason": "client went away"},
    (),
    body_optional=True,
)
CONSUME = Endpoint(
    "consumptions",
    "POST",
    "/v1/consumptions",
    "relay",
    {
        "request_id": "valid-consumption",
        "user_id": 1,
        "token_id": 1,
        "channel_id": 1,
        "group": "default",
        "model": "gpt-4o",
        "prompt_tokens": 10,
        "completion_tokens": 10,
        "quota": 5,
    },
    ("request_id", "user_id", "token_id", "channel_id", "model", "prompt_tokens", "completion_tokens"),
)
TOPUP = Endpoint(
    "topups",
    "POST",
    "/v1/topups",
    "admin",
    {"user_id": 1, "amount": 100, "reference": "valid-topup", "note": "promo"},
    ("user_id", "amount", "reference"),
)
ADJUST = Endpoint(
    "adjustments",
    "POST",
    "/v1/adjustments",
    "admin",
    {"user_id": 1, "amount": -5, "reference": "valid-adjustment", "note": "correction"},
    ("user_id", "amount", "reference"),
)
TOKEN = Endpoint(
    "tokens",
    "PUT",
    f"/v1/tokens/{NEW_TOKEN}",
    "relay",
    {"user_id": 1, "unlimited": False, "remaining": 100},
    ("user_id", "unlimited"),
)
MODEL = Endpoint(
    "pricing-model",
    "PUT",
    "/v1/pricing/models/new-model",
    "admin",
    {"model_ratio": "1.5", "completion_ratio": "2"},
    ("model_ratio",),
)
GROUP = Endpoint(
    "pricing-group",
    "PUT",
    "/v1/pricing/groups/new-group",
    "admin",
    {"group_ratio": "1.2"},
    ("group_ratio",),
)
API_KEY = Endpoint(
    "api-keys",
    "POST",
    "/v1/api-keys",
    "admin",
    {"name": "a new key", "role": "relay"},
    ("name", "role"),
)
ENDPOINTS = (HOLD, SETTLE, REFUND, CONSUME, TOPUP, ADJUST, TOKEN, MODEL, GROUP, API_KEY)


# Bad values by kind ---------------------------------------------------------------------------------------------

WRONG_INT_TYPES: dict[str, Any] = {"string": "1", "float": 1.5, "bool": True, "object": {}, "array": [1]}
BAD_IDS: dict[str, Any] = {
    "zero": 0,
    "negative": -1,
    "2^63": 2**63,
    "10^30": 10**30,
    "null": None,
    **WRONG_INT_TYPES,
}
BAD_COUNTS: dict[str, Any] = {"negative": -1, "10^15+1": MAX_AMOUNT + 1, "10^30": 10**30, **WRONG_INT_TYPES}
BAD_KEYS: dict[str, Any] = {
    "space": "bad id",
    "unicode": "caf\u00e9",
    "newline": "line\nbreak",
    "nul": "nul\x00byte",
    "tab": "a\tb",
    "slash": "a/b",
    "empty": "",
    "129-chars": "k" * 129,
    "int": 123,
    "null": None,
}
BAD_EXPIRES_IN: dict[str, Any] = {"zero": 0, "86401": 86401, "negative": -1, **WRONG_INT_TYPES}
BAD_RATIOS: dict[str, Any] = {
    "nan-string": "NaN",
    "snan-string": "sNaN",
    "infinity-string": "Infinity",
    "minus-infinity-string": "-Infinity",
    "inf-string": "inf",
    "negative": -1,
    "negative-string": "-0.5",
    "absurd-1e30": 10**30,
    "absurd-string-1e30": "1e30",
    "absurd-400-digits": "1" + "0" * 400,
    "absurd-exponent": "1e999999999",
    "word": "abc",
    "empty-string": "",
    "bool": True,
    "array": [1],
    "object": {},
}
RAW = "__raw_literal__"
"""A placeholder replaced by a literal that json.dumps cannot write."""
RAW_RATIOS: dict[str, bytes] = {
    "nan-literal": b"NaN",
    "infinity-literal": b"Infinity",
    "minus-infinity-literal": b"-Infinity",
    "float-overflow-literal": b"1e400",
}


@dataclass(frozen=True)
class Case:
    id: str
    """`<endpoint name>-<what is wrong>`; the endpoint name groups the cases into one test."""
    method: str
    path: str
    role: str
    content: bytes | None


def with_field(endpoint: Endpoint, field: str, value: Any) -> bytes:
    return dumps({**endpoint.body, field: value})


def without(endpoint: Endpoint, *fields: str) -> bytes:
    return dumps({key: value for key, value in endpoint.body.items() if key not in fields})


def field_cases(endpoint: Endpoint, field: str, values: dict[str, Any]) -> Iterator[Case]:
    for label, value in values.items():
        if value is None and field not in endpoint.required:
            continue  # null is how an optional field is left out
        yield Case(
            f"{endpoint.name}-{field}-{label}",
            endpoint.method,
            endpoint.path,
            endpoint.role,
            with_field(endpoint, field, value),
        )


def generic_cases(endpoint: Endpoint) -> Iterator[Case]:
    """Bodies that are not JSON, not an object, or carry an unknown or missing field."""
    valid = dumps(endpoint.body)
    raw: dict[str, bytes] = {
        "malformed-json": b'{"user_id": 1,',
        "truncated-json": valid[: len(valid) // 2],
        "trailing-garbage": valid + b" }x",
        "single-quotes": valid.replace(b'"', b"'"),
        "deeply-nested": b"[" * 5_000 + b"]" * 5_000,
        "array": b"[]",
        "array-of-body": b"[" + valid + b"]",
        "string": b'"a string"',
        "number": b"42",
    }
    if not endpoint.body_optional:
        raw["null"] = b"null"
        raw["empty-body"] = b""
        raw["whitespace-body"] = b" \r\n\t"
        raw["form-feed-body"] = b"\x0c"
    for label, content in raw.items():
        yield Case(f"{endpoint.name}-{label}", endpoint.method, endpoint.path, endpoint.role, content)
    yield Case(
        f"{endpoint.name}-unknown-field",
        endpoint.method,
        endpoint.path,
        endpoint.role,
        dumps({**endpoint.body, "surprise": 1}),
    )
    for field in endpoint.required:
        yield Case(
            f"{endpoint.name}-missing-{field}", endpoint.method, endpoint.path, endpoint.role, without(endpoint, field)
        )


BAD_HOLD_PATHS: dict[str, str] = {
    "space": "bad%20id",
    "unicode": "caf%C3%A9",
    "newline": "a%0Ab",
    "nul": "a%00b",
    "129-chars": "k" * 129,
}
BAD_ID_PATHS: dict[str, str] = {
    "zero": "0",
    "negative": "-1",
    "word": "abc",
    "float": "1.5",
    "2^63": str(2**63),
    "20-digits": "99999999999999999999",
    "exponent": "1e3",
    "underscore": "1_000",
    "leading-space": "%201",
    "fullwidth-digit": "%EF%BC%91",
}


def path_cases() -> Iterator[Case]:
    for label, raw in BAD_HOLD_PATHS.items():
        yield Case(f"settle-path-{label}", "POST", f"/v1/holds/{raw}/settle", "relay", dumps(SETTLE.body))
        yield Case(f"refund-path-{label}", "POST", f"/v1/holds/{raw}/refund", "relay", dumps(REFUND.body))
    for label, raw in BAD_ID_PATHS.items():
        yield Case(f"tokens-path-{label}", "PUT", f"/v1/tokens/{raw}", "relay", dumps(TOKEN.body))
    for label, raw in {"newline": "a%0Ab", "nul": "a%00b", "escape": "a%1Bb"}.items():
        yield Case(f"pricing-model-path-{label}", "PUT", f"/v1/pricing/models/{raw}", "admin", dumps(MODEL.body))
        yield Case(f"pricing-group-path-{label}", "PUT", f"/v1/pricing/groups/{raw}", "admin", dumps(GROUP.body))


def all_cases() -> Iterator[Case]:
    for endpoint in ENDPOINTS:
        yield from generic_cases(endpoint)

    yield from field_cases(HOLD, "request_id", BAD_KEYS)
    for field in ("user_id", "token_id"):
        yield from field_cases(HOLD, field, BAD_IDS)
    for field in ("prompt_tokens", "max_tokens", "amount"):
        yield from field_cases(HOLD, field, {**BAD_COUNTS, "null": None})
    yield from field_cases(HOLD, "expires_in", BAD_EXPIRES_IN)
    for field in ("model", "group"):
        yield from field_cases(HOLD, field, {"empty": "", "int": 7, "newline": "gpt\n4o", "nul": "gpt\x00"})

    yield from field_cases(SETTLE, "channel_id", BAD_IDS)
    for field in ("prompt_tokens", "completion_tokens", "quota"):
        yield from field_cases(SETTLE, field, BAD_COUNTS)

    yield from field_cases(REFUND, "reason", {"int": 1, "array": ["x"], "object": {}})

    yield from field_cases(CONSUME, "request_id", BAD_KEYS)
    for field in ("user_id", "token_id", "channel_id"):
        yield from field_cases(CONSUME, field, BAD_IDS)
    for field in ("prompt_tokens", "completion_tokens", "quota"):
        yield from field_cases(CONSUME, field, BAD_COUNTS)
    for field in ("model", "group"):
        yield from field_cases(CONSUME, field, {"empty": "", "int": 7})

    yield from field_cases(TOPUP, "user_id", BAD_IDS)
    yield from field_cases(TOPUP, "amount", {"zero": 0, **BAD_COUNTS, "null": None})
    yield from field_cases(TOPUP, "reference", BAD_KEYS)
    yield from field_cases(TOPUP, "note", {"int": 1, "object": {}})

    yield from field_cases(ADJUST, "user_id", BAD_IDS)
    signed = {label: value for label, value in BAD_COUNTS.items() if label != "negative"}
    yield from field_cases(ADJUST, "amount", {"zero": 0, "-(10^15+1)": -(MAX_AMOUNT + 1), **signed, "null": None})
    yield from field_cases(ADJUST, "reference", BAD_KEYS)
    yield from field_cases(ADJUST, "note", {"int": 1, "object": {}})

    yield from field_cases(TOKEN, "user_id", BAD_IDS)
    yield from field_cases(TOKEN, "unlimited", {"string": "false", "int": 0, "null": None})
    yield from field_cases(TOKEN, "remaining", BAD_COUNTS)
    yield Case("tokens-limited-without-remaining", "PUT", TOKEN.path, "relay", without(TOKEN, "remaining"))
    yield Case("tokens-limited-remaining-null", "PUT", TOKEN.path, "relay", with_field(TOKEN, "remaining", None))

    for field in ("model_ratio", "completion_ratio", "model_price"):
        yield from field_cases(MODEL, field, BAD_RATIOS)
        for label, literal in RAW_RATIOS.items():
            content = with_field(MODEL, field, RAW).replace(dumps(RAW), literal)
            yield Case(f"pricing-model-{field}-{label}", "PUT", MODEL.path, "admin", content)
    yield Case("pricing-model-empty-object", "PUT", MODEL.path, "admin", b"{}")
    yield Case("pricing-model-completion-ratio-only", "PUT", MODEL.path, "admin", dumps({"completion_ratio": "2"}))

    yield from field_cases(GROUP, "group_ratio", BAD_RATIOS)
    for label, literal in RAW_RATIOS.items():
        content = with_field(GROUP, "group_ratio", RAW).replace(dumps(RAW), literal)
        yield Case(f"pricing-group-group_ratio-{label}", "PUT", GROUP.path, "admin", content)

    yield from field_cases(
        API_KEY,
        "name",
        {"empty": "", "201-chars": "n" * 201, "newline": "a\nb", "nul": "a\x00b", "int": 5, "null": None},
    )
    yield from field_cases(
        API_KEY,
        "role",
        {"unknown": "root", "empty": "", "uppercase": "ADMIN", "int": 1, "null": None, "array": ["admin"]},
    )

    yield from path_cases()


CASES = list(all_cases())
assert len({case.id for case in CASES}) == len(CASES), "duplicate case ids"


# Fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture
async def world(ledger: LedgerClient) -> LedgerClient:
    """A funded user 1 with a limited token 1 and two open holds, so a bad write that slipped through would show."""
    await ledger.fund(1, 1_000_000)
    await ledger.token(1, 1, remaining=1_000_000)
    for request_id in (OPEN_HOLD, REFUND_HOLD):
        response = await ledger.hold(request_id=request_id, amount=1_000)
        assert response.status_code == 201, response.text
    return ledger


# Tests -----------------------------------------------------------------------------------------------------------


async def test_base_bodies_are_valid(world: LedgerClient) -> None:
    """The bodies every bad case is derived from succeed, so each bad case differs from a good call by one defect."""
    before = await db_state(world)
    for endpoint in ENDPOINTS:
        response = await send(world, endpoint.method, endpoint.path, dumps(endpoint.body), endpoint.role)
        assert response.status_code in (200, 201), f"{endpoint.name}: {response.status_code} {response.text}"
    after = await db_state(world)
    assert after["entries"] > before["entries"]
    assert after["postings"] > before["postings"]
    for table, added in (("requests", 2), ("tokens", 1), ("api_keys", 1)):
        assert await world.count(f"SELECT count(*) FROM {table}") == len(before[table].split(" | ")) + added
    assert after["model_prices"] != before["model_prices"]
    assert after["group_ratios"] != before["group_ratios"]
    statuses = {row["request_id"]: row["status"] for row in await world.conn.fetch("SELECT * FROM requests")}
    assert statuses[OPEN_HOLD] == "settled"
    assert statuses[REFUND_HOLD] == "refunded"


def endpoint_of(case: Case) -> str:
    return next(e.name for e in sorted(ENDPOINTS, key=lambda e: -len(e.name)) if case.id.startswith(e.name + "-"))


def refusal_problems(response: httpx.Response, before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What is wrong with how a bad write was answered: not a 400 validation_error problem, or something written."""
    problems: list[str] = []
    try:
        assert_problem(response, 400, "validation_error")
    except AssertionError as error:
        problems.append(str(error).splitlines()[0])
    try:
        assert_same_state(before, after)
    except AssertionError as error:
        problems.append(str(error).splitlines()[0])
    return problems


CASES_BY_ENDPOINT: dict[str, list[Case]] = {
    endpoint.name: [case for case in CASES if endpoint_of(case) == endpoint.name] for endpoint in ENDPOINTS
}


@pytest.mark.parametrize("endpoint", [endpoint.name for endpoint in ENDPOINTS])
async def test_bad_writes_are_refused_and_write_nothing(world: LedgerClient, endpoint: str) -> None:
    """Every bad case of one endpoint, one after the other on one database (a fresh database per case is slow).

    Each case must answer a 400 validation_error problem and leave the database as it was; the failure message
    lists every case that did not, with the request and the response.
    """
    cases = CASES_BY_ENDPOINT[endpoint]
    assert len(cases) >= 15
    failures: list[str] = []
    before = await db_state(world)
    for case in cases:
        response = await send(world, case.method, case.path, case.content, case.role)
        after = await db_state(world)
        problems = refusal_problems(response, before, after)
        if problems:
            body = case.content if case.content is None or len(case.content) < 300 else case.content[:300] + b"..."
            failures.append(f"[{case.id}] body={body!r}: " + "; ".join(problems))
        before = after
    assert failures == [], f"{len(failures)} of {len(cases)} bad {endpoint} requests were mishandled:\n" + "\n".join(
        failures
    )


def test_every_request_body_is_decoded_by_strict_body() -> None:
    """The strict decoding above is StrictBody's (api/bodies.py), which the app's StrictBodies plugin gives every
    `data` parameter. A handler whose body Litestar decoded itself would accept "1" for 1 and floats for ratios."""
    app = create_app(Settings.from_env({"LEDGER_DATABASE_URL": "postgresql://unused@/unused"}))
    with_body = [
        handler
        for route in app.routes
        if isinstance(route, HTTPRoute)
        for handler in route.route_handlers
        if handler.parsed_data_field is not None
    ]
    # Every endpoint above, the batch, the reversal of an entry, and the four external reconciliation bodies (a
    # run, an explanation, a channel-map entry, a provider price; their bad input is in their own test modules).
    assert len(with_body) == len(ENDPOINTS) + 6
    for handler in with_body:
        dto = handler.resolve_data_dto()
        assert dto is not None, handler
        assert issubclass(dto, StrictBody), handler
        assert handler.resolve_return_dto() is None, handler  # answers keep Litestar's own encoding


async def test_refund_without_body_or_with_null_is_not_a_server_error(world: LedgerClient) -> None:
    """The refund body is optional: no body is a plain refund; `null` may be taken as no body or refused."""
    response = await send(world, "POST", f"/v1/holds/{REFUND_HOLD}/refund", None, "relay")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "refunded"
    response = await send(world, "POST", f"/v1/holds/{OPEN_HOLD}/refund", b"null", "relay")
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_problem(response, 400, "validation_error")
    else:
        assert response.json()["status"] == "refunded"
        return
    before = await db_state(world)
    for not_json in (b"\x0c", b" \x0b\n"):  # whitespace to Python, not to JSON: refused, and nothing refunded
        response = await send(world, "POST", f"/v1/holds/{OPEN_HOLD}/refund", not_json, "relay")
        assert_problem(response, 400, "validation_error")
    assert await db_state(world) == before
    response = await send(world, "POST", f"/v1/holds/{OPEN_HOLD}/refund", b" \r\n\t", "relay")  # JSON's: no body
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "refunded"


BAD_READ_PATHS: list[tuple[str, str]] = [
    ("/v1/users/abc", "relay"),
    ("/v1/users/0", "relay"),
    ("/v1/users/-1", "relay"),
    ("/v1/users/99999999999999999999", "relay"),
    (f"/v1/users/{2**63}", "relay"),
    ("/v1/users/1.5", "relay"),
    ("/v1/users/1e3", "relay"),
    ("/v1/users/1_000", "relay"),
    ("/v1/users/%201", "relay"),
    ("/v1/users/%EF%BC%91", "relay"),
    ("/v1/tokens/-1", "relay"),
    ("/v1/tokens/0", "relay"),
    ("/v1/tokens/abc", "relay"),
    ("/v1/channels/0", "relay"),
    ("/v1/channels/x", "relay"),
    ("/v1/holds/bad%20id", "relay"),
    ("/v1/holds/caf%C3%A9", "relay"),
    ("/v1/holds/a%0Ab", "relay"),
    ("/v1/holds/a%00b", "relay"),
    ("/v1/holds/" + "k" * 129, "relay"),
    ("/v1/entries/1.5", "auditor"),
    ("/v1/entries/0", "auditor"),
    ("/v1/entries/abc", "auditor"),
    (f"/v1/entries/{2**63}", "auditor"),
]


def problem_failures(label: str, response: httpx.Response, status: int, code: str | None = None) -> list[str]:
    try:
        assert_problem(response, status, code)
    except AssertionError as error:
        return [f"[{label}] {str(error).splitlines()[0]}"]
    return []


async def test_malformed_path_param_is_a_validation_error(ledger: LedgerClient) -> None:
    """Each path, with a role the route admits (so the guard is not what answers), is a 400 validation_error."""
    failures: list[str] = []
    for path, role in BAD_READ_PATHS:
        failures += problem_failures(path, await ledger.get(path, as_=role), 400, "validation_error")
    assert failures == [], "\n".join(failures)


async def test_bad_key_id_in_delete_is_a_validation_error(ledger: LedgerClient) -> None:
    before = await db_state(ledger)
    for raw in ("abc", "0", "-1", str(2**63), "1.5"):
        response = await ledger.client.delete(f"/v1/api-keys/{raw}", headers=ledger.headers("admin"))
        assert_problem(response, 400, "validation_error")
    assert_same_state(before, await db_state(ledger))


# Boundaries that are valid ---------------------------------------------------------------------------------------


async def test_largest_ids_and_amounts_are_accepted(ledger: LedgerClient) -> None:
    top = MAX_ID
    response = await ledger.put(f"/v1/tokens/{top}", {"user_id": top, "unlimited": False, "remaining": MAX_AMOUNT})
    assert response.status_code == 201, response.text
    assert response.json()["token_id"] == top
    assert response.json()["remaining"] == MAX_AMOUNT

    response = await ledger.post(
        "/v1/topups", {"user_id": top, "amount": MAX_AMOUNT, "reference": "max-topup"}, as_="admin"
    )
    assert response.status_code == 201, response.text
    assert response.json()["user"]["available"] == MAX_AMOUNT

    response = await ledger.post(
        "/v1/adjustments", {"user_id": top, "amount": -MAX_AMOUNT, "reference": "max-adjustment"}, as_="admin"
    )
    assert response.status_code == 201, response.text
    assert response.json()["user"]["available"] == 0
    response = await ledger.post(
        "/v1/adjustments", {"user_id": top, "amount": MAX_AMOUNT, "reference": "max-adjustment-2"}, as_="admin"
    )
    assert response.status_code == 201, response.text

    user = await ledger.user(top)
    assert user["user_id"] == top
    assert user["available"] == MAX_AMOUNT
    token = await ledger.token_view(top)
    assert token["remaining"] == MAX_AMOUNT

    response = await ledger.post(
        "/v1/consumptions",
        {
            "request_id": "max-consumption",
            "user_id": top,
            "token_id": top,
            "channel_id": top,
            "model": "gpt-4o",
            "prompt_tokens": MAX_AMOUNT,
            "completion_tokens": MAX_AMOUNT,
            "quota": MAX_AMOUNT,
        },
    )
    assert response.status_code == 201, response.text
    channel = await ledger.get(f"/v1/channels/{top}")
    assert channel.status_code == 200, channel.text
    assert channel.json()["used"] == MAX_AMOUNT
    assert (await ledger.user(top))["available"] == 0
    await ledger.assert_books_balance()


async def test_longest_keys_and_longest_expiry_are_accepted(ledger: LedgerClient) -> None:
    await ledger.fund(1, 1_000_000)
    await ledger.token(1, 1, remaining=1_000_000)
    request_id = (KEY_ALPHABET * 2)[:128]
    assert len(request_id) == 128

    response = await ledger.hold(request_id=request_id, amount=500, expires_in=86400)
    assert response.status_code == 201, response.text
    hold = response.json()
    assert hold["request_id"] == request_id
    created = datetime.fromisoformat(hold["created_at"])
    expires = datetime.fromisoformat(hold["expires_at"])
    assert 86390 <= (expires - created).total_seconds() <= 86410

    response = await ledger.get(f"/v1/holds/{request_id}")
    assert response.status_code == 200, response.text
    assert response.json()["request_id"] == request_id
    response = await ledger.post(
        f"/v1/holds/{request_id}/settle", {"channel_id": 1, "prompt_tokens": 10, "completion_tokens": 0}
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "settled"

    response = await ledger.hold(request_id="shortest-expiry", amount=500, expires_in=1)
    assert response.status_code == 201, response.text
    response = await ledger.hold(request_id="z", amount=0)
    assert response.status_code == 201, response.text

    reference = (KEY_ALPHABET[::-1] * 2)[:128]
    response = await ledger.post("/v1/topups", {"user_id": 1, "amount": 1, "reference": reference}, as_="admin")
    assert response.status_code == 201, response.text
    stored = await ledger.count("SELECT count(*) FROM entries WHERE reference = $1", reference)
    assert stored == 1
    await ledger.assert_books_balance()


async def test_computed_amount_over_the_limit_is_refused_not_a_server_error(ledger: LedgerClient) -> None:
    """Token counts within range whose priced estimate or charge would exceed 10^15 are a 4xx, never a 500."""
    await ledger.fund(1, 1_000_000)
    await ledger.token(1, 1)
    before = await db_state(ledger)
    response = await ledger.hold(request_id="huge-estimate", model="gpt-4", prompt_tokens=MAX_AMOUNT, max_tokens=0)
    assert 400 <= response.status_code < 500, response.text
    assert_problem(response, response.status_code)
    response = await ledger.post(
        "/v1/consumptions",
        {
            "request_id": "huge-charge",
            "user_id": 1,
            "token_id": 1,
            "channel_id": 1,
            "model": "gpt-4",
            "prompt_tokens": MAX_AMOUNT,
            "completion_tokens": MAX_AMOUNT,
        },
    )
    assert 400 <= response.status_code < 500, response.text
    assert_problem(response, response.status_code)
    assert_same_state(before, await db_state(ledger))


# Routing ---------------------------------------------------------------------------------------------------------


UNKNOWN_ROUTES = ["/v1/nothing-here", "/nothing-here", "/v1/holds/x/cancel", "/v2/holds", "/v1/users/1/2"]


async def test_unknown_route_is_a_404_problem(ledger: LedgerClient) -> None:
    failures: list[str] = []
    for path in UNKNOWN_ROUTES:
        # Outside /v1 no key is needed, so even an anonymous caller learns the route does not exist.
        for role in ("admin",) if path.startswith("/v1/") else ("admin", None):
            failures += problem_failures(f"{path} as {role}", await ledger.get(path, as_=role), 404)
    assert failures == [], "\n".join(failures)


WRONG_METHODS = [
    ("DELETE", "/v1/holds"),
    ("GET", "/v1/topups"),
    ("GET", "/v1/adjustments"),
    ("GET", "/v1/consumptions"),
    ("PATCH", "/v1/tokens/1"),
    ("POST", "/v1/users/1"),
    ("PUT", "/v1/holds/x/settle"),
    ("DELETE", "/v1/pricing"),
    ("POST", "/health"),
]


async def test_wrong_method_is_a_405_problem(ledger: LedgerClient) -> None:
    before = await db_state(ledger)
    failures: list[str] = []
    for method, path in WRONG_METHODS:
        response = await ledger.client.request(method, path, headers=ledger.headers("admin"), json={})
        failures += problem_failures(f"{method} {path}", response, 405)
    assert failures == [], "\n".join(failures)
    assert_same_state(before, await db_state(ledger))
