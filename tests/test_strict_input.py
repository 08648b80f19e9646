"""Strict input (hostile review, issue 14): bytes that are not UTF-8, duplicate JSON keys, repeated query parameters
and headers, invisible characters in names, loose instants and loose ratio strings are refused with 400 and change
nothing; none is a 500."""

from __future__ import annotations

import re
import sys
import unicodedata
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import pytest

from ledger_service.api.bodies import has_duplicate_keys
from ledger_service.domain.operations import INVISIBLE
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


# Item 9: duplicate keys, repeated query parameters, a repeated Authorization header ------------------------------


def with_duplicate(endpoint: Endpoint) -> bytes:
    """The route's valid body with its first field written twice (same value: still two readings of one body)."""
    field, value = next(iter(endpoint.body.items()))
    return b"{" + dumps(field) + b": " + dumps(value) + b", " + dumps(endpoint.body)[1:]


async def test_a_key_written_twice_is_refused_on_every_route(world: LedgerClient) -> None:
    await refused_everywhere(world, {endpoint.name: with_duplicate(endpoint) for endpoint in BODY_ROUTES})


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_id": 1, "amount": 1, "amount": 1000, "reference": "dup"}',
        b'{"user_id": 1, "amount": 1, "\\u0061mount": 1000, "reference": "dup"}',  # one key, spelt two ways
        b'{"user_id": 1, "amount": 1, "reference": "dup", "note": "a\\nb", "note": "c"}',
    ],
)
async def test_a_topup_naming_a_key_twice_posts_nothing(ledger: LedgerClient, body: bytes) -> None:
    before = await db_state(ledger)
    response = await send(ledger, "POST", "/v1/topups", body, "admin")
    assert_problem(response, 400, "validation_error")
    assert "twice" in response.json()["detail"]
    assert_same_state(before, await db_state(ledger))


async def test_a_batch_repeating_a_key_inside_an_operation_is_refused(world: LedgerClient) -> None:
    settle = b'{"channel_id": 1, "channel_id": 2, "prompt_tokens": 1, "completion_tokens": 1}'
    body = b'{"operations": [{"op": "settle", "request_id": "open-hold-1", "body": ' + settle + b"}]}"
    before = await db_state(world)
    assert_problem(await send(world, "POST", "/v1/batch", body, "relay"), 400, "validation_error")
    assert_same_state(before, await db_state(world))
    # The same keys in different objects are no duplicates: both operations are applied.
    operations = [
        {"op": "settle", "request_id": request_id, "body": SETTLE.body} for request_id in ("open-hold-1", "open-hold-2")
    ]
    response = await send(world, "POST", "/v1/batch", dumps({"operations": operations}), "relay")
    assert response.status_code == 200, response.text
    assert [result["status"] for result in response.json()["results"]] == [200, 200]


async def test_a_repeated_query_parameter_is_refused(ledger: LedgerClient) -> None:
    response = await ledger.get("/v1/entries?user_id=42&user_id=43", as_="auditor")
    assert_problem(response, 400, "validation_error")
    assert "repeated query parameters: user_id" in response.json()["detail"]
    assert (await ledger.get("/v1/entries?user_id=42", as_="auditor")).status_code == 200


async def test_a_repeated_authorization_header_is_refused(ledger: LedgerClient) -> None:
    before = await db_state(ledger)
    admin = ledger.headers("admin")["Authorization"]
    for second in (admin, ledger.headers("auditor")["Authorization"]):
        headers = [("Authorization", admin), ("Authorization", second)]
        response = await ledger.client.post(
            "/v1/topups", json={"user_id": 1, "amount": 5, "reference": "two-keys"}, headers=headers
        )
        assert_problem(response, 400, "validation_error")
    assert_same_state(before, await db_state(ledger))


@pytest.mark.parametrize(
    ("body", "duplicate"),
    [
        (b'{"a": "x:y", "b": {"c": ":", "d": [":", {"e": 1}]}}', False),  # colons inside strings are no keys
        (b'{"a" : 1 ,\n "b"\t:\r2}', False),
        (b'{"a": 1, "b": {"a": 1}}', False),  # the same key in two objects
        (b'[{"a": 1}, {"a": 2}]', False),
        (b'{"k:": 1, "k": 2}', False),
        (b'{"a": "\\u003a", "b": 1}', False),
        (b'{"a": 1, "b": 2, "a": 3}', True),
        (b'{"x": [{"a": 1, "a": 1}]}', True),
        (b'{"a": "x:y", "a" :"x:y"}', True),
        (b'{"a": 1, "\\u0061": 2}', True),
        (b'{"\\u003a": 1, "\\u003a": 2}', True),
        (b'{"a": 1e400, "b": 1.5, "c": 100000000000000000000000000000, "b": 2}', True),
    ],
)
def test_duplicate_key_detection(body: bytes, duplicate: bool) -> None:
    assert has_duplicate_keys(body) is duplicate


# Item 5: invisible characters in names, broken percent-encoding in paths -----------------------------------------

REFUSED_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}


def test_the_invisible_class_covers_unicode_control_and_format_characters() -> None:
    """Every Cc, Cf, Zl and Zp code point of this Python's Unicode is refused; every refused one is of those
    categories, or unassigned here (the list follows a newer Unicode). A Unicode that adds a Cf fails this."""
    invisible = re.compile(f"[{INVISIBLE}]")
    missing, extra = [], []
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        category = unicodedata.category(char)
        refused = invisible.match(char) is not None
        if category in REFUSED_CATEGORIES and not refused:
            missing.append(f"U+{code:04X}")
        elif refused and category not in REFUSED_CATEGORIES | {"Cn"}:
            extra.append(f"U+{code:04X} {category}")
    assert (missing, extra) == ([], [])


INVISIBLE_NAMES = {
    "nel-U+0085": "gpt\u00854o",
    "csi-U+009B": "gpt\u009b4o",
    "rlo-U+202E": "gpt\u202e4o",
    "zwsp-U+200B": "gpt\u200b4o",
    "bom-U+FEFF": "\ufeffgpt-4o",
    "soft-hyphen-U+00AD": "gpt\u00ad4o",
    "tag-U+E0041": "gpt\U000e00414o",
    "line-separator-U+2028": "gpt\u20284o",
    "paragraph-separator-U+2029": "gpt\u20294o",
    "tab": "gpt\t4o",
}


async def test_names_with_invisible_characters_are_refused(world: LedgerClient) -> None:
    hold = {**world_bodies()["holds"], "request_id": "invisible-hold"}
    consumption = {**world_bodies()["consumptions"], "request_id": "invisible-consumption"}
    before = await db_state(world)
    failures = []
    for label, name in INVISIBLE_NAMES.items():
        encoded = quote(name, safe="")
        attempts = [
            ("POST", "/v1/holds", {**hold, "model": name}, "relay"),
            ("POST", "/v1/holds", {**hold, "group": name}, "relay"),
            ("POST", "/v1/consumptions", {**consumption, "model": name}, "relay"),
            ("POST", "/v1/api-keys", {"name": name, "role": "auditor"}, "admin"),
            ("PUT", f"/v1/pricing/models/{encoded}", {"model_ratio": "1"}, "admin"),
            ("PUT", f"/v1/pricing/groups/{encoded}", {"group_ratio": "1"}, "admin"),
            (
                "POST",
                "/v1/batch",
                {"operations": [{"op": "hold", "request_id": "b1", "body": {**hold, "model": name}}]},
                "relay",
            ),
        ]
        for method, path, body, role in attempts:
            response = await send(world, method, path, dumps(body), role)
            batch_refusal = (
                path == "/v1/batch" and response.status_code == 200 and response.json()["results"][0]["status"] == 400
            )
            if not batch_refusal and (response.status_code != 400 or response.json().get("code") != "validation_error"):
                failures.append(f"{label} {method} {path}: {response.status_code} {response.text[:150]}")
    assert failures == []
    assert_same_state(before, await db_state(world))


def world_bodies() -> dict[str, dict[str, Any]]:
    return {endpoint.name: endpoint.body for endpoint in ENDPOINTS}


async def test_names_in_any_script_are_still_accepted(ledger: LedgerClient) -> None:
    for name in ("модель-ü", "模型 v2", "gpt-4o (β)", "עברית", "e\u0301"):
        response = await ledger.put(f"/v1/pricing/models/{quote(name, safe='')}", {"model_ratio": "1"}, as_="admin")
        assert response.status_code == 201, response.text
        assert name in (await ledger.get("/v1/pricing")).json()["models"]


@pytest.mark.parametrize("raw", ["%E9", "%zz", "a%ZZb", "%", "a%4", "%C3", "%ED%A0%80", "%FF%FE"])
async def test_broken_percent_encoding_in_a_path_is_refused(ledger: LedgerClient, raw: str) -> None:
    before = await db_state(ledger)
    for method, path, body, role in (
        ("PUT", f"/v1/pricing/models/{raw}", {"model_ratio": "1"}, "admin"),
        ("PUT", f"/v1/pricing/groups/{raw}", {"group_ratio": "1"}, "admin"),
        ("GET", f"/v1/holds/{raw}", None, "relay"),
        ("POST", f"/v1/holds/{raw}/refund", None, "relay"),
        ("GET", f"/v1/accounts/{raw}", None, "auditor"),
    ):
        response = await send(ledger, method, path, None if body is None else dumps(body), role)
        assert_problem(response, 400, "validation_error")
    assert_same_state(before, await db_state(ledger))


# Item 7: instants ------------------------------------------------------------------------------------------------

INSTANT_ROUTES = [
    ("/v1/entries", ("from", "to")),
    ("/v1/reports/usage", ("from", "to")),
    ("/v1/accounts/user:1", ("as_of",)),
    ("/v1/reports/trial-balance", ("as_of",)),
]
BAD_INSTANTS = [
    "0001-01-01T00:00:00+23:59",  # before year 1 in UTC
    "9999-12-31T23:59:59-23:59",  # after year 9999 in UTC
    "20260101T000000Z",  # ISO 8601 basic form
    "2026-W01-1",  # week date
    "2026-001T00:00:00Z",  # ordinal date
    "2026-03-01",
    "2026-03-01T00:00:00",  # no offset
    "2026-03-01 00:00:00Z",
    "2026-03-01T00:00Z",
    "2026-03-01T00:00:00.1234567Z",
    "2026-03-01T00:00:00+0100",
    "2026-03-01T00:00:00+24:00",
    "2026-02-30T00:00:00Z",
    "2026-03-01T24:00:00Z",
    "2026-03-01T00:00:60Z",
    "２０２６-03-01T00:00:00Z",  # fullwidth digits
    " 2026-03-01T00:00:00Z",
]
GOOD_INSTANTS = [
    "2026-03-01T00:00:00Z",
    "2026-03-01t01:00:00.5+01:00",
    "2026-03-01T00:00:00.123456z",
    "2026-02-28T20:00:00-04:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
]


async def test_instants_outside_rfc3339_or_utc_are_refused(ledger: LedgerClient) -> None:
    failures = []
    for path, names in INSTANT_ROUTES:
        for name in names:
            for instant in BAD_INSTANTS:
                response = await ledger.get(f"{path}?{name}={quote(instant)}", as_="auditor")
                if response.status_code != 400 or response.json().get("code") != "validation_error":
                    failures.append(f"{path}?{name}={instant}: {response.status_code} {response.text[:120]}")
            for instant in GOOD_INSTANTS:
                response = await ledger.get(f"{path}?{name}={quote(instant)}", as_="auditor")
                if response.status_code != 200:
                    failures.append(f"{path}?{name}={instant} (valid): {response.status_code} {response.text[:120]}")
    assert failures == [], "\n".join(failures)


async def test_an_instant_with_an_offset_means_the_same_moment_in_utc(ledger: LedgerClient) -> None:
    await ledger.fund(1, 100)
    created = datetime.fromisoformat((await ledger.get("/v1/entries", as_="auditor")).json()["items"][0]["created_at"])
    just_after = (created + timedelta(microseconds=1)).astimezone(timezone(timedelta(hours=-5)))
    for name, expected in (("to", 1), ("from", 0)):
        instant = just_after.isoformat(timespec="microseconds")
        response = await ledger.get(f"/v1/entries?{name}={quote(instant)}", as_="auditor")
        assert response.status_code == 200, response.text
        assert len(response.json()["items"]) == expected, (name, instant)


# Item 8: ratios --------------------------------------------------------------------------------------------------

LOOSE_RATIO_STRINGS = {
    "underscore": "2_5",
    "arabic-indic-digits": "\u0661\u0662",
    "fullwidth-digit": "\uff12",
    "spaces": " 2.5 ",
    "trailing-newline": "2.5\n",
    "plus-sign": "+2.5",
    "leading-dot": ".5",
    "trailing-dot": "5.",
    "leading-zero": "02.5",
    "hex": "0x10",
    "bare-exponent": "1e",
    "zero-huge-exponent-string": "0E+1000",
}
LOOSE_RATIO_LITERALS = {"zero-huge-exponent": b"0e99999999", "zero-exponent-1000": b"0E+1000"}
RATIO_ROUTES = [
    ("/v1/pricing/models/strict-model", {"model_ratio": "1"}, ("model_ratio", "completion_ratio", "model_price")),
    ("/v1/pricing/groups/strict-group", {"group_ratio": "1"}, ("group_ratio",)),
]


async def test_ratios_outside_json_number_syntax_are_refused(ledger: LedgerClient) -> None:
    before = await db_state(ledger)
    failures = []
    for path, base, fields in RATIO_ROUTES:
        for field in fields:
            bodies = {label: dumps({**base, field: text}) for label, text in LOOSE_RATIO_STRINGS.items()}
            for label, literal in LOOSE_RATIO_LITERALS.items():
                bodies[label] = dumps({**base, field: "__literal__"}).replace(b'"__literal__"', literal)
            for label, body in bodies.items():
                response = await send(ledger, "PUT", path, body, "admin")
                if response.status_code != 400 or response.json().get("code") != "validation_error":
                    failures.append(f"{path} {field} {label}: {response.status_code} {response.text[:120]}")
    assert failures == [], "\n".join(failures)
    assert_same_state(before, await db_state(ledger))


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b'"2.50"', "2.50"),
        (b"2.50", "2.50"),
        (b'"1e9"', "1E+9"),
        (b"1E-30", "1E-30"),
        (b'"0"', "0"),
        (b"0.000001", "0.000001"),
    ],
)
async def test_ratios_in_json_number_syntax_are_kept_exactly(ledger: LedgerClient, sent: bytes, kept: str) -> None:
    body = b'{"group_ratio": ' + sent + b"}"
    response = await send(ledger, "PUT", "/v1/pricing/groups/exact", body, "admin")
    assert response.status_code == 201, response.text
    assert response.json()["group_ratio"] == kept
