"""Hostile input: oversized and deep bodies, wrong content types, Unicode and control characters, rate limits."""

from __future__ import annotations

import asyncio
import json

import pytest

from ledger_service.settings import Settings
from tests.support import ADMIN_SECRET, LedgerClient, assert_problem

BODY_LIMIT = 4096


@pytest.fixture
def settings(database_url: str) -> Settings:
    """This module's service: a small body limit and a per-key rate limit, to exercise both."""
    return Settings(
        database_url=database_url,
        admin_key=ADMIN_SECRET,
        background_tasks=False,
        max_body_bytes=BODY_LIMIT,
        rate_limit_per_second=0.5,
        rate_limit_burst=40,
    )


async def counts(ledger: LedgerClient) -> tuple[int, int]:
    return (await ledger.count("SELECT count(*) FROM entries"), await ledger.count("SELECT count(*) FROM requests"))


async def test_an_oversized_body_is_refused_with_413(ledger: LedgerClient) -> None:
    before = await counts(ledger)
    body = {"user_id": 1, "amount": 5, "reference": "big", "note": "x" * (BODY_LIMIT * 2)}
    response = await ledger.post("/v1/topups", body, as_="admin")
    assert_problem(response, 413, "payload_too_large")
    assert await counts(ledger) == before


async def test_deep_and_wide_json_is_refused_with_400(ledger: LedgerClient) -> None:
    before = await counts(ledger)
    headers = {**ledger.headers("admin"), "content-type": "application/json"}
    deep = b"[" * 1500 + b"]" * 1500  # deeper than any decoder recurses, smaller than the body limit
    response = await ledger.client.post("/v1/topups", content=deep, headers=headers)
    assert_problem(response, 400, "validation_error")
    wide = json.dumps({f"k{i}": i for i in range(400)}).encode()[: BODY_LIMIT - 10] + b"}"
    response = await ledger.client.post("/v1/topups", content=wide, headers=headers)
    assert_problem(response, 400, "validation_error")
    assert await counts(ledger) == before


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml", None],
)
async def test_bodies_must_be_declared_as_json(ledger: LedgerClient, content_type: str | None) -> None:
    before = await counts(ledger)
    body = json.dumps({"user_id": 1, "amount": 5, "reference": "typed"}).encode()
    headers = ledger.headers("admin")
    if content_type is not None:
        headers["content-type"] = content_type
    response = await ledger.client.post("/v1/topups", content=body, headers=headers)
    assert_problem(response, 415, "unsupported_media_type")
    assert await counts(ledger) == before
    # Declared as JSON (with parameters, or as a +json type), the same body is accepted.
    for good in ("application/json; charset=utf-8", "application/vnd.ledger+json"):
        response = await ledger.client.post(
            "/v1/topups",
            content=json.dumps({"user_id": 1, "amount": 5, "reference": f"typed-{good[-4:]}"}).encode(),
            headers={**ledger.headers("admin"), "content-type": good},
        )
        assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "request_id",
    ["réservé", "日本語", "emoji-🙂", "tab\there", "new\nline", "nul\x00byte", "bell\x07", "zero\u200bwidth", "", " "],
)
async def test_request_ids_outside_the_alphabet_are_refused(ledger: LedgerClient, request_id: str) -> None:
    await ledger.fund(1, 10_000)
    await ledger.token(1, 1)
    before = await counts(ledger)
    response = await ledger.hold(request_id=request_id)
    assert_problem(response, 400, "validation_error")
    assert await counts(ledger) == before


@pytest.mark.parametrize(
    "note",
    [
        "Rückerstattung für Kunde #42",
        "返金 🙂 emoji",
        "עברית RTL",
        "e\u0301 combining",
        "tabs\tand\nnewlines",
        "'; DROP",
    ],
)
async def test_notes_keep_any_unicode_exactly(ledger: LedgerClient, note: str) -> None:
    response = await ledger.post("/v1/topups", {"user_id": 1, "amount": 5, "reference": "n", "note": note}, as_="admin")
    assert response.status_code == 201, response.text
    entry = (await ledger.get(f"/v1/entries/{response.json()['entry']['id']}", as_="auditor")).json()
    assert entry["details"]["note"] == note


async def test_a_nul_in_a_note_is_refused(ledger: LedgerClient) -> None:
    response = await ledger.post(
        "/v1/topups", {"user_id": 1, "amount": 5, "reference": "nul", "note": "a\x00b"}, as_="admin"
    )
    assert_problem(response, 400, "validation_error")
    assert await ledger.count("SELECT count(*) FROM entries") == 0


async def test_unknown_query_parameters_are_refused(ledger: LedgerClient) -> None:
    response = await ledger.get("/v1/entries?user=1", as_="auditor")  # a misspelt filter would widen the query
    assert_problem(response, 400, "validation_error")
    response = await ledger.get("/v1/users/1?verbose=1")
    assert_problem(response, 400, "validation_error")


async def test_a_key_over_its_rate_gets_429_and_others_do_not(ledger: LedgerClient) -> None:
    # The burst of 40 covers the set-up calls; then the relay key spends the rest at once.
    responses = await asyncio.gather(*(ledger.get("/v1/users/1") for _ in range(45)))
    limited = [r for r in responses if r.status_code == 429]
    assert limited, "no request was limited"
    assert len(limited) < 45
    for response in limited:
        assert_problem(response, 429, "rate_limited")
        assert int(response.headers["retry-after"]) >= 1
    assert (await ledger.get("/v1/users/1", as_="auditor")).status_code == 200  # a key of its own, a bucket of its own
