"""Idempotency (contract section 4): the same call again returns the original result and posts nothing; the same
key with a different body is a conflict. request_id keys holds and consumptions; reference keys funding."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import LedgerClient

REPLAYED = "idempotent-replayed"


async def posting_count(ledger: LedgerClient) -> int:
    return await ledger.count("SELECT count(*) FROM postings")


@pytest.fixture
async def funded(ledger: LedgerClient) -> LedgerClient:
    await ledger.fund(1, 100_000)
    await ledger.token(1, 1, remaining=50_000)
    return ledger


HOLD: dict[str, Any] = {"request_id": "h1", "user_id": 1, "token_id": 1, "model": "gpt-4o", "prompt_tokens": 100}


async def test_a_repeated_hold_is_replayed(funded: LedgerClient) -> None:
    first = await funded.post("/v1/holds", HOLD)
    assert first.status_code == 201
    assert REPLAYED not in first.headers
    before = await posting_count(funded)
    # Same body, other key order, optional fields spelled out with their defaults: still the same request.
    again = await funded.post("/v1/holds", {"max_tokens": 0, "group": "default", **dict(reversed(HOLD.items()))})
    assert again.status_code == 200
    assert again.headers[REPLAYED] == "true"
    assert again.json() == first.json()
    assert await posting_count(funded) == before


async def test_a_hold_key_reused_for_something_else_conflicts(funded: LedgerClient) -> None:
    await funded.post("/v1/holds", HOLD)
    for body in ({**HOLD, "prompt_tokens": 101}, {**HOLD, "expires_in": 60}, {**HOLD, "amount": 5}):
        response = await funded.post("/v1/holds", body)
        assert (response.status_code, response.json()["code"]) == (409, "idempotency_conflict")
    consumption = {**HOLD, "channel_id": 1, "completion_tokens": 0}
    response = await funded.post("/v1/consumptions", consumption)
    assert (response.status_code, response.json()["code"]) == (409, "idempotency_conflict")
    assert await funded.count("SELECT count(*) FROM entries WHERE request_id = 'h1'") == 1


async def test_a_refused_hold_leaves_no_key_behind(funded: LedgerClient) -> None:
    await funded.token(2, 1)  # unlimited: only the user's quota limits this hold
    big = {**HOLD, "request_id": "big", "token_id": 2, "amount": 10**6}
    refused = await funded.post("/v1/holds", big)
    assert refused.json()["code"] == "insufficient_user_quota"
    await funded.fund(1, 10**6)
    assert (await funded.post("/v1/holds", big)).status_code == 201


async def test_settle_and_refund_replays(funded: LedgerClient) -> None:
    await funded.post("/v1/holds", HOLD)
    settle = {"channel_id": 2, "prompt_tokens": 100, "completion_tokens": 10}
    first = await funded.post("/v1/holds/h1/settle", settle)
    before = await posting_count(funded)
    again = await funded.post("/v1/holds/h1/settle", dict(reversed(settle.items())))
    assert (again.status_code, again.headers[REPLAYED]) == (200, "true")
    assert again.json() == first.json()
    assert await posting_count(funded) == before

    await funded.post("/v1/holds", {**HOLD, "request_id": "h2"})
    first = await funded.post("/v1/holds/h2/refund", {"reason": "timeout"})
    assert REPLAYED not in first.headers
    again = await funded.post("/v1/holds/h2/refund", {"reason": "timeout"})
    assert (again.status_code, again.headers[REPLAYED], again.json()) == (200, "true", first.json())
    other = await funded.post("/v1/holds/h2/refund", {"reason": "something else"})
    assert (other.status_code, other.json()["code"]) == (409, "idempotency_conflict")
    assert await funded.count("SELECT count(*) FROM entries WHERE request_id = 'h2' AND kind = 'refund'") == 1


async def test_consumption_replay(funded: LedgerClient) -> None:
    body = {"request_id": "c", "user_id": 1, "token_id": 1, "channel_id": 3, "model": "gpt-4o",
            "prompt_tokens": 10, "completion_tokens": 10}  # fmt: skip
    first = await funded.post("/v1/consumptions", body)
    again = await funded.post("/v1/consumptions", body)
    assert (first.status_code, again.status_code, again.headers[REPLAYED]) == (201, 200, "true")
    assert again.json() == first.json()
    conflict = await funded.post("/v1/consumptions", {**body, "completion_tokens": 11})
    assert conflict.json()["code"] == "idempotency_conflict"
    assert await funded.count("SELECT count(*) FROM entries WHERE kind = 'consume'") == 1


@pytest.mark.parametrize("path", ["/v1/topups", "/v1/adjustments"])
async def test_funding_replays_by_reference(ledger: LedgerClient, path: str) -> None:
    body = {"user_id": 1, "amount": 500, "reference": "pay-1", "note": "invoice 7"}
    first = await ledger.post(path, body, as_="admin")
    assert first.status_code == 201, first.text
    again = await ledger.post(path, body, as_="admin")
    assert (again.status_code, again.headers[REPLAYED]) == (200, "true")
    assert again.json()["entry"] == first.json()["entry"]
    assert (await ledger.user(1))["available"] == 500
    for other in ({**body, "amount": 501}, {**body, "note": None}, {**body, "user_id": 2}):
        response = await ledger.post(path, other, as_="admin")
        assert (response.status_code, response.json()["code"]) == (409, "idempotency_conflict")
    # References are one key space: a top-up's reference cannot be reused by an adjustment, or the reverse.
    other_path = "/v1/adjustments" if path == "/v1/topups" else "/v1/topups"
    response = await ledger.post(other_path, body, as_="admin")
    assert (response.status_code, response.json()["code"]) == (409, "idempotency_conflict")
    assert await ledger.count("SELECT count(*) FROM entries WHERE reference = 'pay-1'") == 1


async def test_token_puts_are_naturally_idempotent(ledger: LedgerClient) -> None:
    body = {"user_id": 1, "unlimited": False, "remaining": 700}
    assert (await ledger.put("/v1/tokens/1", body)).status_code == 201
    again = await ledger.put("/v1/tokens/1", body)
    assert (again.status_code, again.json()["remaining"]) == (200, 700)
    assert await ledger.count("SELECT count(*) FROM entries WHERE kind = 'allowance'") == 1
