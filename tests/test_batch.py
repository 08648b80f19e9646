"""POST /v1/batch (contract section 9): many operations, one transaction, each answered as its single call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support import LedgerClient


def hold(request_id: str, user: int = 1, **extra: Any) -> dict[str, Any]:
    body = {"user_id": user, "token_id": user, "model": "gpt-4o", "prompt_tokens": 100, "max_tokens": 100, **extra}
    return {"op": "hold", "request_id": request_id, "body": body}


def settle(request_id: str, completion: int = 10) -> dict[str, Any]:
    body = {"channel_id": 1, "prompt_tokens": 100, "completion_tokens": completion}
    return {"op": "settle", "request_id": request_id, "body": body}


async def batch(ledger: LedgerClient, operations: list[dict[str, Any]], atomic: bool = False) -> list[dict[str, Any]]:
    response = await ledger.post("/v1/batch", {"operations": operations, "atomic": atomic})
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    assert len(results) == len(operations)
    return results


@pytest.fixture
async def funded(ledger: LedgerClient) -> LedgerClient:
    for user in (1, 2):
        await ledger.fund(user, 10_000)
        await ledger.token(user, user)
    return ledger


async def test_each_result_is_what_the_single_call_answers(funded: LedgerClient) -> None:
    operations = [
        hold("b1"),
        hold("b2"),
        hold("big", amount=10**6),  # refused: the user has 10,000
        settle("b1", completion=300),
        {"op": "refund", "request_id": "b2", "body": {"reason": "upstream"}},
        {
            "op": "consume",
            "request_id": "b3",
            "body": {
                "user_id": 2,
                "token_id": 2,
                "channel_id": 2,
                "model": "gpt-4o",
                "prompt_tokens": 10,
                "completion_tokens": 10,
            },
        },
        settle("missing"),
    ]
    results = await batch(funded, operations)
    assert [r["status"] for r in results] == [201, 201, 403, 200, 200, 201, 404]
    assert results[2]["body"]["code"] == "insufficient_user_quota"
    assert results[6]["body"] == {
        "type": "urn:ledger:problem:hold_not_found",
        "title": "No hold with this request_id",
        "status": 404,
        "detail": "no hold with request_id 'missing'",
        "code": "hold_not_found",
    }
    # The same calls made singly now are replays of what the batch did: the same bodies.
    assert (await funded.get("/v1/holds/b1")).json()["status"] == "settled"
    single = await funded.post("/v1/holds/b1/settle", operations[3]["body"])
    assert (single.status_code, single.json()) == (200, results[3]["body"])
    single = await funded.post("/v1/holds", {"request_id": "b2", **operations[1]["body"]})
    assert single.json()["request_id"] == results[1]["body"]["request_id"] == "b2"
    assert (await funded.user(1))["available"] == 10_000 - 3250  # (100 + 300 x 4) x 2.5
    await funded.assert_books_balance()


async def test_the_same_batch_again_is_all_replays(funded: LedgerClient) -> None:
    operations = [hold("r1"), hold("r2"), settle("r1")]
    first = await batch(funded, operations)
    before = await funded.count("SELECT count(*) FROM postings")
    again = await batch(funded, operations)
    assert [r["status"] for r in again] == [200, 200, 200]
    assert [r["body"] for r in again][1:] == [r["body"] for r in first][1:]
    assert again[0]["body"]["status"] == "settled"  # the hold as it stands now
    assert await funded.count("SELECT count(*) FROM postings") == before


async def test_atomic_batches_apply_all_or_nothing(funded: LedgerClient) -> None:
    applied = await batch(funded, [hold("a1"), hold("a2"), settle("a1")], atomic=True)
    assert [r["status"] for r in applied] == [201, 201, 200]
    before = (await funded.count("SELECT count(*) FROM entries"), await funded.count("SELECT count(*) FROM requests"))
    refused = await batch(funded, [hold("a3"), hold("a4", amount=10**6), settle("a2")], atomic=True)
    assert [r["status"] for r in refused] == [424, 403, 424]
    assert refused[1]["body"]["code"] == "insufficient_user_quota"
    assert {refused[0]["body"]["code"], refused[2]["body"]["code"]} == {"batch_aborted"}
    assert "operation 1 (hold a4)" in refused[0]["body"]["detail"]
    after = (await funded.count("SELECT count(*) FROM entries"), await funded.count("SELECT count(*) FROM requests"))
    assert after == before
    invalid = await batch(funded, [hold("a5"), {"op": "settle", "request_id": "a2", "body": {"channel_id": 0}}], True)
    assert [r["status"] for r in invalid] == [424, 400]
    assert await funded.count("SELECT count(*) FROM requests WHERE request_id = 'a5'") == 0


async def test_a_malformed_operation_body_is_answered_alone(funded: LedgerClient) -> None:
    results = await batch(
        funded,
        [
            hold("ok1"),
            {"op": "hold", "request_id": "bad", "body": {"user_id": "1"}},
            {"op": "hold", "request_id": "mismatch", "body": {**hold("x")["body"], "request_id": "other"}},
            hold("ok2"),
        ],
    )
    assert [r["status"] for r in results] == [201, 400, 400, 201]
    assert {results[1]["body"]["code"], results[2]["body"]["code"]} == {"validation_error"}


@pytest.mark.parametrize(
    "body",
    [
        {"operations": []},
        {"operations": [hold(f"n{i}") for i in range(1001)]},
        {"operations": [{"op": "transfer", "request_id": "x", "body": {}}]},
        {"operations": [{"op": "hold", "request_id": "bad id", "body": {}}]},
        {"operations": [hold("u")], "extra": 1},
    ],
)
async def test_malformed_batches_are_refused_whole(ledger: LedgerClient, body: dict[str, Any]) -> None:
    response = await ledger.post("/v1/batch", body)
    assert (response.status_code, response.json()["code"]) == (400, "validation_error")
    assert await ledger.count("SELECT count(*) FROM requests") == 0


async def test_concurrent_batches_over_the_same_users_do_not_deadlock(ledger: LedgerClient) -> None:
    users = range(1, 6)
    for user in users:
        await ledger.fund(user, 10**7)
        await ledger.token(user, user)
    batches = []
    for b in range(8):
        order = list(users) if b % 2 else list(reversed(users))
        batches.append([hold(f"c{b}-{user}-{i}", user=user) for i in range(4) for user in order])
    results = await asyncio.gather(*(batch(ledger, operations) for operations in batches))
    assert {r["status"] for rs in results for r in rs} == {201}
    assert await ledger.count("SELECT count(*) FROM requests") == 8 * 5 * 4
    await ledger.assert_books_balance()


async def test_batches_need_a_writing_role(ledger: LedgerClient) -> None:
    response = await ledger.post("/v1/batch", {"operations": [hold("x")]}, as_="auditor")
    assert (response.status_code, response.json()["code"]) == (403, "forbidden")


CONSUMED = {"user_id": 1, "token_id": 1, "channel_id": 1, "model": "gpt-4o", "prompt_tokens": 1, "completion_tokens": 1}
SETTLED = {"channel_id": 1, "prompt_tokens": 0, "completion_tokens": 0}


async def test_refusals_write_nothing_even_without_a_savepoint(funded: LedgerClient) -> None:
    """Batches rely on every operation refusing before its first write: a batch of refusals leaves no trace."""
    await batch(funded, [hold("taken"), hold("done"), settle("done"), hold("gone")])
    await batch(funded, [{"op": "refund", "request_id": "gone", "body": {}}])
    await funded.put("/v1/tokens/9", {"user_id": 2, "unlimited": True})
    counts = (
        "SELECT (SELECT count(*) FROM entries) * 1000000 + (SELECT count(*) FROM postings) * 1000"
        " + (SELECT count(*) FROM requests)"
    )
    before = await funded.count(counts)
    snapshot = await funded.conn.fetch("SELECT request_id, status, charged FROM requests ORDER BY request_id")
    refusals = [
        hold("poor", amount=10**6),  # insufficient_user_quota
        hold("no-token", token_id=404),  # token_not_found
        hold("not-mine", token_id=9),  # token_user_mismatch
        hold("taken", prompt_tokens=1),  # idempotency_conflict
        settle("nothing-here"),  # hold_not_found
        settle("done", completion=999),  # hold_already_settled
        settle("gone"),  # hold_already_refunded
        {"op": "refund", "request_id": "done", "body": {}},  # hold_already_settled
        {"op": "consume", "request_id": "taken", "body": CONSUMED},  # idempotency_conflict
        {"op": "settle", "request_id": "taken", "body": {**SETTLED, "quota": 10**15 + 1}},  # validation_error
    ]
    results = await batch(funded, refusals)
    assert all(r["status"] >= 400 for r in results), results
    assert await funded.count(counts) == before
    assert await funded.conn.fetch("SELECT request_id, status, charged FROM requests ORDER BY request_id") == snapshot
